"""tokenwire against a locked-down NATS: each kind of credential, and TLS with a CA of its own.

For each: a nats-server with authorization on (and TLS, verifying the client's certificate, in
the TLS case), a gateway and a worker given the matching TOKENWIRE_NATS_* settings, and a chat
answered exactly through them. A connection without the credential is refused by the server,
so the answer proves the credential was used. A gateway with a wrong password never becomes
ready (its log says why), and no secret reaches its log.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import nats.errors
import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.conftest import FAST
from tests.integration.stack import Stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.natsserver import NatsServer, free_port
from tokenwire.simulator import expected_final_answer

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-" + "p" * 20
TOKEN = "tok-" + "t" * 24


@dataclass
class Locked:
    server_config: str
    env: dict[str, str]  # what gateway and worker are given
    scheme: str = "nats"


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def tls_setup(folder: Path) -> tuple[str, dict[str, str]]:
    """A CA, a server certificate and a client certificate; the server verifies clients."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("tokenwire test CA", ca_key, None, ca=True)
    ca_path, _ = _write(folder / "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert, server_key_path = _write(
        folder / "server",
        _cert("127.0.0.1", server_key, ("tokenwire test CA", ca_key), ca=False),
        server_key,
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert, client_key_path = _write(
        folder / "client",
        _cert("tokenwire-client", client_key, ("tokenwire test CA", ca_key), ca=False),
        client_key,
    )
    config = (
        "tls {\n"
        f'  cert_file: "{server_cert}"\n  key_file: "{server_key_path}"\n'
        f'  ca_file: "{ca_path}"\n  verify: true\n'
        "}\n"
    )
    env = {
        "TOKENWIRE_NATS_TLS_CA_FILE": ca_path,
        "TOKENWIRE_NATS_TLS_CERT_FILE": client_cert,
        "TOKENWIRE_NATS_TLS_KEY_FILE": client_key_path,
    }
    return config, env


def locked(kind: str, folder: Path) -> Locked:
    if kind == "user_password":
        return Locked(
            f'authorization {{ users: [{{ user: "tokenwire", password: "{PASSWORD}" }}] }}',
            {"TOKENWIRE_NATS_USER": "tokenwire", "TOKENWIRE_NATS_PASSWORD": PASSWORD},
        )
    if kind == "token":
        return Locked(f'authorization {{ token: "{TOKEN}" }}', {"TOKENWIRE_NATS_TOKEN": TOKEN})
    if kind == "nkey":
        seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
        public = nkeys.from_seed(bytearray(seed)).public_key.decode()
        seed_file = folder / "user.nk"
        seed_file.write_bytes(seed)
        return Locked(
            f'authorization {{ users: [{{ nkey: "{public}" }}] }}',
            {"TOKENWIRE_NATS_NKEY_SEED_FILE": str(seed_file)},
        )
    if kind == "tls_and_password":
        tls, env = tls_setup(folder)
        auth = locked("user_password", folder)
        return Locked(tls + auth.server_config, env | auth.env, scheme="tls")
    raise AssertionError(kind)


@pytest.fixture(params=["user_password", "token", "nkey", "tls_and_password"])
def locked_stack(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Stack, Locked, NatsServer]]:
    setup = locked(request.param, tmp_path)
    server = NatsServer(tmp_path / "nats", extra_config=setup.server_config, stop_grace=5.0)
    server.start()
    url = server.url.replace("nats://", f"{setup.scheme}://", 1)
    stack = Stack(nats_url=url, workdir=tmp_path, env_extra=FAST | setup.env)
    try:
        stack.simulator()
        stack.worker()
        stack.gateway()
        yield stack, setup, server
    except BaseException:
        print(stack.logs())
        print(server.last_log_lines(30))
        raise
    finally:
        stack.close()
        server.stop()


async def test_a_chat_is_answered_through_a_locked_down_nats(
    locked_stack: tuple[Stack, Locked, NatsServer],
) -> None:
    stack, setup, server = locked_stack
    # Without the credential the server refuses the connection: authorization is really on.
    with pytest.raises((nats.errors.Error, OSError, asyncio.TimeoutError)):
        await nats.connect(
            server.url.replace("nats://", f"{setup.scheme}://", 1),
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
        )
    question = "Is NATS locked?"
    async with Client(stack.ws_url(user="alice")) as client:
        rid = await client.chat(question)
        frames = await client.finish(rid, timeout=30)
    assert frames[-1]["type"] == "end", frames
    assert_seq_complete(frames)
    assert answer_of(frames) == expected_final_answer(question, tokens=40)
    for proc in stack.procs:
        text = proc.log_text()
        for secret in (PASSWORD, TOKEN):
            assert secret not in text, f"{proc.name} logged a NATS secret"


def test_a_wrong_password_keeps_the_gateway_unready(tmp_path: Path) -> None:
    setup = locked("user_password", tmp_path)
    server = NatsServer(tmp_path / "nats", extra_config=setup.server_config, stop_grace=5.0)
    server.start()
    wrong = "wrong-" + PASSWORD
    stack = Stack(
        nats_url=server.url,
        workdir=tmp_path,
        env_extra={"TOKENWIRE_NATS_USER": "tokenwire", "TOKENWIRE_NATS_PASSWORD": wrong},
    )
    port = free_port()
    readyz = f"http://127.0.0.1:{port}/readyz"
    try:
        # Started without waiting for health: it must never become ready.
        args = ["gateway", "--host", "127.0.0.1", "--port", str(port)]
        proc = stack._proc("gateway", args, None).start()
        seen: set[int | None] = set()
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and 200 not in seen:
            try:
                seen.add(httpx.get(readyz, timeout=1).status_code)
            except httpx.HTTPError:
                seen.add(None)
            time.sleep(0.2)
        assert proc.alive, proc.tail()  # it keeps trying, as when NATS is not up yet
        assert 200 not in seen, (seen, proc.tail())
        log = proc.log_text()
        assert "Authorization Violation" in log, log  # the operator sees why
        assert wrong not in log
    finally:
        stack.close()
        server.stop()
