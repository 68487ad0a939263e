"""wss:// end to end: Debian's nginx runs deploy/nginx/tokenwire.conf in front of two gateways.

The certificate is self-signed, made at test time. Only the addresses, the certificate paths
and the log path of the deployed file are replaced (each replacement must apply, so the test
fails if the file drifts); a second run shortens nginx's read timeout to show that the
gateway's pings keep an idle WebSocket alive through it. A gateway serving TLS itself
(``tokenwire gateway --ssl-certfile --ssl-keyfile``) is checked too.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.settings import Settings
from tests.integration.stack import Proc, Stack
from tests.integration.wsclient import Client, answer_of, assert_seq_complete
from tokenwire.natsserver import NatsServer, free_port
from tokenwire.procs import spawn, stop_process
from tokenwire.simulator import expected_answer

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "tokenwire.conf"
SECRET = "nginx-test-secret-" + uuid.uuid4().hex
GATEWAY_ENV = {
    "TOKENWIRE_AUTH": "jwt",
    "TOKENWIRE_ALLOW_INSECURE": "0",
    "TOKENWIRE_JWT_SECRET": SECRET,
    # Short pings, so that the read-timeout check below takes seconds, not minutes.
    "TOKENWIRE_PING_INTERVAL_S": "1",
}


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        pytest.fail("nginx is not installed: apt-get install -y nginx-light")
    return found


def make_certificate(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def substitute(text: str, replacements: dict[str, str]) -> str:
    for pattern, value in replacements.items():
        text, count = re.subn(pattern, value, text)
        assert count >= 1, f"deploy/nginx/tokenwire.conf no longer has {pattern!r}"
    return text


@dataclass
class Nginx:
    folder: Path
    https_port: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self, site: str, binary: str) -> None:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        (self.folder / "tokenwire.conf").write_text(site)
        user = "user root;" if os.geteuid() == 0 else ""
        (self.folder / "nginx.conf").write_text(
            f"""
            {user}
            daemon off;
            worker_processes 1;
            pid {self.folder}/nginx.pid;
            error_log {self.folder}/error.log info;
            events {{ worker_connections 256; }}
            http {{
                client_body_temp_path {self.folder}/body;
                proxy_temp_path {self.folder}/proxy;
                fastcgi_temp_path {self.folder}/fastcgi;
                uwsgi_temp_path {self.folder}/uwsgi;
                scgi_temp_path {self.folder}/scgi;
                access_log off;
                include {self.folder}/tokenwire.conf;
            }}
            """
        )
        args = [binary, "-p", str(self.folder), "-c", str(self.folder / "nginx.conf")]
        args += ["-e", str(self.folder / "error.log")]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stderr
        self.proc = spawn(
            args, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                httpx.get(f"https://127.0.0.1:{self.https_port}/", verify=False, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError((self.folder / "error.log").read_text())

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=5.0)


@dataclass
class Site:
    stack: Stack
    gateways: list[Proc]
    cert: Path
    key: Path
    nginx: Nginx
    workdir: Path

    @property
    def wss(self) -> str:
        return f"wss://localhost:{self.nginx.https_port}/v1/ws"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


def site_config(
    cert: Path, key: Path, folder: Path, ports: list[int], https: int, http: int
) -> str:
    return substitute(
        CONFIG.read_text(),
        {
            r"server 127\.0\.0\.1:8001": f"server 127.0.0.1:{ports[0]}",
            r"server 127\.0\.0\.1:8002": f"server 127.0.0.1:{ports[1]}",
            r"listen 443 ssl;": f"listen 127.0.0.1:{https} ssl;",
            r"listen 80;": f"listen 127.0.0.1:{http};",
            r"/etc/ssl/tokenwire/fullchain\.pem": str(cert),
            r"/etc/ssl/tokenwire/privkey\.pem": str(key),
            r"/var/log/nginx/tokenwire\.access\.log": str(folder / "access.log"),
        },
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    binary = nginx_binary()
    workdir = tmp_path_factory.mktemp("nginx")
    cert, key = make_certificate(workdir)
    server = NatsServer(workdir / "nats", stop_grace=5.0)
    server.start()
    stack = Stack(nats_url=server.url, workdir=workdir)
    nginx = Nginx(workdir / "nginx", free_port())
    try:
        stack.simulator()
        stack.worker()
        gateways = [stack.gateway(f"gateway-{n}", **GATEWAY_ENV) for n in (1, 2)]
        ports = [g.port for g in gateways]  # type: ignore[attr-defined]
        nginx.start(
            site_config(cert, key, nginx.folder, ports, nginx.https_port, free_port()), binary
        )
        yield Site(stack, gateways, cert, key, nginx, workdir)
    except BaseException:
        print(stack.logs())
        raise
    finally:
        nginx.stop()
        stack.close()
        server.stop()


def bearer(sub: str) -> dict[str, dict[str, str]]:
    claims = {"sub": sub, "exp": int(time.time()) + 600}
    return {"additional_headers": {"Authorization": f"Bearer {jwt.encode(claims, SECRET)}"}}


async def test_a_full_answer_streams_through_nginx_over_wss(site: Site) -> None:
    sub = f"tls-{uuid.uuid4().hex[:6]}"
    query = f"over TLS {uuid.uuid4().hex[:6]}"
    slow = f"streamed, not buffered {uuid.uuid4().hex[:6]}"
    async with Client(site.wss, ssl=site.tls(), **bearer(sub)) as client:
        assert client.hello["user"] == sub
        frames = await client.finish(await client.chat(query), timeout=60)
        # 30 tokens 100 ms apart: the first delta must arrive while the answer still streams.
        rid = await client.chat(slow, inputs={"tw_sim": {"tokens": 30, "delay_ms": 100}})
        await client.wait_for(rid, "delta", timeout=30)
        assert "end" not in [f["type"] for f in client.frames[rid]]
        streamed = await client.finish(rid, timeout=60)
    assert_seq_complete(frames)
    assert answer_of(frames) == expected_answer(query, 40)
    assert answer_of(streamed) == expected_answer(slow, 30)


async def test_both_gateways_serve_and_one_can_die(site: Site) -> None:
    clients = [Client(site.wss, ssl=site.tls(), **bearer(f"lb-{n}")) for n in range(4)]
    for client in clients:
        await client.connect()
    rids = [await c.chat(f"balanced {n}") for n, c in enumerate(clients)]
    for client, rid in zip(clients, rids, strict=True):
        assert (await client.finish(rid, timeout=60))[-1]["type"] == "end"
        await client.close()
    # least_conn spread them: both gateways hold connections' answers in their logs.
    for gateway in site.gateways:
        assert "chat accepted" in gateway.log_text(), gateway.name

    site.gateways[0].kill()
    for n in range(3):  # nginx skips the dead gateway (proxy_next_upstream error)
        async with Client(site.wss, ssl=site.tls(), **bearer(f"after-{n}")) as client:
            frames = await client.finish(await client.chat(f"after the kill {n}"), timeout=60)
            assert frames[-1]["type"] == "end"


async def test_pings_keep_an_idle_socket_open_through_nginx(site: Site, tmp_path: Path) -> None:
    ping = Settings().ping_interval_s + Settings().pong_timeout_s
    deployed = int(re.search(r"proxy_read_timeout (\d+)s;", CONFIG.read_text()).group(1))  # type: ignore[union-attr]
    assert deployed > ping, "nginx would cut idle WebSockets before a ping could show life"
    # Now a copy with a 3 s read timeout, and gateways that ping every second.
    short = Nginx(tmp_path / "nginx", free_port())
    alive = [g.port for g in site.gateways if g.alive]  # type: ignore[attr-defined]
    config = site_config(
        site.cert, site.key, short.folder, [*alive, *alive][:2], short.https_port, free_port()
    )
    short.start(
        substitute(config, {r"proxy_read_timeout 75s;": "proxy_read_timeout 3s;"}), nginx_binary()
    )
    try:
        url = f"wss://localhost:{short.https_port}/v1/ws"
        async with Client(url, ssl=site.tls(), **bearer("idle-tls")) as client:
            await asyncio.sleep(6)  # twice the read timeout, with nothing sent either way
            assert not client.closed.is_set()
            frames = await client.finish(await client.chat("still there"), timeout=60)
            assert frames[-1]["type"] == "end"
    finally:
        short.stop()


async def test_the_gateway_serves_wss_itself(site: Site) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENWIRE_", "DIFY_"))}
    env |= GATEWAY_ENV | {"TOKENWIRE_NATS_URL": site.stack.nats_url, "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "-m",
        "tokenwire",
        "gateway",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    argv += ["--ssl-certfile", str(site.cert), "--ssl-keyfile", str(site.key)]
    proc = Proc("gateway-tls", argv, env, site.workdir / "gateway-tls.log")
    site.stack.procs.append(proc)
    proc.start()
    deadline = time.monotonic() + 30
    while True:
        try:
            if (
                httpx.get(
                    f"https://localhost:{port}/readyz", verify=site.tls(), timeout=1
                ).status_code
                == 200
            ):
                break
        except httpx.HTTPError:
            pass
        assert proc.alive and time.monotonic() < deadline, proc.tail()
        await asyncio.sleep(0.2)
    query = f"direct TLS {uuid.uuid4().hex[:6]}"
    async with Client(
        f"wss://localhost:{port}/v1/ws", ssl=site.tls(), **bearer("direct")
    ) as client:
        frames = await client.finish(await client.chat(query), timeout=60)
    assert answer_of(frames) == expected_answer(query, 40)
    proc.stop()


def test_nginx_logs_no_query_strings(site: Site) -> None:
    secretish = f"access_token=leak-{uuid.uuid4().hex}"
    httpx.get(
        f"https://localhost:{site.nginx.https_port}/v1/ws?{secretish}", verify=site.tls(), timeout=5
    )
    log = (site.nginx.folder / "access.log").read_text()
    assert "/v1/ws" in log and "leak-" not in log
