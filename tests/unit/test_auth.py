"""Token checks (gateway/auth.py): which tokens prove a user, from where, and which origins pass."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import time
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from starlette.types import Message
from starlette.websockets import WebSocket

from gateway.auth import (
    JwtAuth,
    NoAuth,
    authenticator_for,
    handshake_token,
    origin_allowed,
)
from shared.exceptions import ErrorCode, TokenExpired, Unauthorized
from shared.settings import Settings

SECRET = "s3cret-for-tests-" + "x" * 32


def settings(**values: Any) -> Settings:
    return Settings(**values)


def hs_token(claims: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers or None)


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(time.time()) + 600, "aud": "tokenwire"} | extra


def pem(public_key: Any) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def ws_with(headers: dict[str, str], query: str = "") -> WebSocket:
    scope = {
        "type": "websocket",
        "path": "/v1/ws",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }

    async def receive() -> Message:
        raise AssertionError("not used")

    async def send(message: Message) -> None:
        raise AssertionError("not used")

    return WebSocket(scope, receive, send)


# --- HS256 --------------------------------------------------------------------------------


async def test_a_good_token_proves_its_sub_until_exp() -> None:
    auth = JwtAuth(settings(jwt_secret=SECRET))
    exp = int(time.time()) + 600
    identity = await auth.verify(hs_token(claims(exp=exp)))
    assert identity.user == "alice" and identity.expires_at == exp


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (hs_token(claims(), secret="another-secret-of-enough-length-0123456789"), "bad signature"),
        (hs_token(claims(aud="someone-else")), "wrong audience"),
        (hs_token({"sub": "alice"}), "exp claim is missing"),  # a connection must end
        (hs_token({"exp": int(time.time()) + 60}), "sub claim is missing"),
        (hs_token(claims(sub="")), "sub"),
        (hs_token(claims(sub="with space")), "sub"),
        (hs_token(claims(nbf=int(time.time()) + 3600)), "not valid yet"),
        ("not-a-jwt", "malformed"),
        ("a.b.c", "malformed"),
        (jwt.encode(claims(), None, algorithm="none"), "algorithm"),
    ],
)
async def test_bad_tokens_are_refused_with_a_reason(token: str, reason: str) -> None:
    auth = JwtAuth(settings(jwt_secret=SECRET, jwt_audience="tokenwire"))
    with pytest.raises(Unauthorized, match=reason) as refused:
        await auth.verify(token)
    assert refused.value.code is ErrorCode.UNAUTHORIZED
    assert token not in str(refused.value)


async def test_an_expired_token_has_its_own_code() -> None:
    auth = JwtAuth(settings(jwt_secret=SECRET))
    with pytest.raises(TokenExpired) as refused:
        await auth.verify(hs_token(claims(exp=int(time.time()) - 5)))
    assert refused.value.code is ErrorCode.TOKEN_EXPIRED


async def test_audience_and_issuer_are_checked_when_set() -> None:
    auth = JwtAuth(settings(jwt_secret=SECRET, jwt_audience="tw", jwt_issuer="https://idp"))
    good = hs_token(claims(aud="tw", iss="https://idp"))
    assert (await auth.verify(good)).user == "alice"
    with pytest.raises(Unauthorized, match="wrong issuer"):
        await auth.verify(hs_token(claims(aud="tw", iss="https://evil")))
    with pytest.raises(Unauthorized, match="aud claim is missing"):
        await auth.verify(hs_token({"sub": "alice", "exp": time.time() + 60, "iss": "https://idp"}))


async def test_leeway_tolerates_a_little_clock_skew() -> None:
    auth = JwtAuth(settings(jwt_secret=SECRET, jwt_leeway_s=30))
    exp = int(time.time()) - 5
    assert (await auth.verify(hs_token(claims(exp=exp)))).expires_at == exp + 30


def test_short_secrets_and_missing_keys_stop_the_start() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        JwtAuth(settings(jwt_secret="short"))
    with pytest.raises(ValueError, match="TOKENWIRE_JWT_SECRET"):
        authenticator_for(settings(auth="jwt"))
    assert isinstance(authenticator_for(settings(auth="none")), NoAuth)


# --- public keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("private_key", "algorithm"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "PS256"),
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    ],
)
async def test_pem_public_keys(private_key: Any, algorithm: str) -> None:
    auth = JwtAuth(settings(jwt_public_key=pem(private_key.public_key())))
    token = jwt.encode(claims(), private_key, algorithm=algorithm)
    assert (await auth.verify(token)).user == "alice"
    # The same claims signed by another key are refused.
    if algorithm == "EdDSA":
        stranger: Any = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "ES256":
        stranger = ec.generate_private_key(ec.SECP256R1())
    else:
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(Unauthorized, match="bad signature"):
        await auth.verify(jwt.encode(claims(), stranger, algorithm=algorithm))


async def test_a_public_key_cannot_be_used_as_an_hmac_secret() -> None:
    """Algorithm confusion: an HS256 token 'signed' with the public PEM must not pass."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = pem(private_key.public_key())
    auth = JwtAuth(settings(jwt_public_key=public_pem))

    # PyJWT itself refuses to HMAC with a PEM; build the forgery by hand.
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    mac = hmac.new(public_pem.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    with pytest.raises(Unauthorized, match="algorithm"):
        await auth.verify(f"{head}.{body}.{b64(mac)}")


async def test_a_certificate_and_a_key_file_work_too(tmp_path: Any) -> None:
    private_key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2100, 1, 1))
        .sign(private_key, hashes.SHA256())
    )
    path = tmp_path / "idp.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    auth = JwtAuth(settings(jwt_public_key=str(path)))
    assert (await auth.verify(jwt.encode(claims(), private_key, algorithm="ES384"))).user == "alice"


# --- JWKS ---------------------------------------------------------------------------------


class JwksServer:
    """A JWKS endpoint in memory that counts its fetches."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}
        self.fetches = 0
        self.down = False

    def add_key(self, kid: str) -> Any:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.keys[kid] = private_key
        return private_key

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        if self.down:
            return httpx.Response(503)
        jwks = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            jwks.append(jwk | {"kid": kid, "alg": "RS256", "use": "sig"})
        return httpx.Response(200, json={"keys": jwks})

    def auth(self, **values: Any) -> JwtAuth:
        client = httpx.AsyncClient(transport=httpx.MockTransport(self.handler))
        return JwtAuth(
            settings(jwt_jwks_url="https://idp.test/jwks.json", **values), http_client=client
        )

    def token(self, kid: str, **extra: Any) -> str:
        return jwt.encode(claims(**extra), self.keys[kid], algorithm="RS256", headers={"kid": kid})


async def test_jwks_keys_are_cached_and_reread_for_a_new_kid() -> None:
    idp = JwksServer()
    idp.add_key("k1")
    auth = idp.auth(jwks_min_refresh_s=0)
    for _ in range(3):
        assert (await auth.verify(idp.token("k1"))).user == "alice"
    assert idp.fetches == 1
    idp.add_key("k2")  # the IdP rotates its keys
    assert (await auth.verify(idp.token("k2"))).user == "alice"
    assert idp.fetches == 2
    await auth.close()


async def test_unknown_kids_cannot_hammer_the_key_server() -> None:
    idp = JwksServer()
    idp.add_key("k1")
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    auth = idp.auth(jwks_min_refresh_s=60)
    assert (await auth.verify(idp.token("k1"))).user == "alice"
    for n in range(20):
        token = jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": f"x{n}"})
        with pytest.raises(Unauthorized, match="unknown signing key"):
            await auth.verify(token)
    assert idp.fetches == 1
    await auth.close()


async def test_jwks_outage_keeps_the_known_keys() -> None:
    idp = JwksServer()
    idp.add_key("k1")
    auth = idp.auth(jwks_cache_s=0.01, jwks_min_refresh_s=0)
    assert (await auth.verify(idp.token("k1"))).user == "alice"
    idp.down = True
    time.sleep(0.02)
    assert (await auth.verify(idp.token("k1"))).user == "alice"
    assert idp.fetches == 2
    await auth.close()


# --- where the token comes from, and origins -------------------------------------------------


def test_the_token_comes_from_header_subprotocol_or_query_when_allowed() -> None:
    assert handshake_token(ws_with({"Authorization": "Bearer abc"}), allow_query=False) == "abc"
    offered = {"Sec-WebSocket-Protocol": "tokenwire.v1, bearer.a.b.c"}
    assert handshake_token(ws_with(offered), allow_query=False) == "a.b.c"
    query = ws_with({}, "access_token=q.r.s")
    assert handshake_token(query, allow_query=False) is None
    assert handshake_token(query, allow_query=True) == "q.r.s"
    assert handshake_token(ws_with({"Authorization": "Basic abc"}), allow_query=False) is None


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "ok"),
    [
        (None, "gw:8000", [], True),  # not a browser
        ("http://gw:8000", "gw:8000", [], True),  # the gateway's own page
        ("http://evil.example", "gw:8000", [], False),
        ("null", "gw:8000", [], False),
        ("https://app.example", "gw:8000", ["https://app.example"], True),
        ("https://APP.example/", "gw:8000", ["https://app.example"], True),
        ("https://app.example.evil", "gw:8000", ["https://app.example"], False),
        ("http://gw:8000", "gw:8000", ["https://app.example"], False),  # a list is exact
        ("https://anything", "gw", ["*"], True),
    ],
)
def test_origins(origin: str | None, host: str, allowed: list[str], ok: bool) -> None:
    assert origin_allowed(origin, host, allowed) is ok


def test_allowed_origins_is_a_comma_separated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENWIRE_ALLOWED_ORIGINS", "https://a.example/, http://B.example:8080")
    assert Settings().allowed_origins == ["https://a.example", "http://b.example:8080"]


def test_no_auth_takes_the_user_parameter() -> None:
    auth = NoAuth()
    assert auth.anonymous(ws_with({}, "user=bob")).user == "bob"
    assert auth.anonymous(ws_with({})).user.startswith("anon-")
    with pytest.raises(Unauthorized):
        auth.anonymous(ws_with({}, "user=a%20b"))
