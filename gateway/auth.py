"""Who is on the other end of a WebSocket: the user Dify will see, and until when.

``none`` (for ``tokenwire dev``, or with ``TOKENWIRE_ALLOW_INSECURE=1``) takes the ``user``
query parameter, else a fresh random id. ``jwt`` verifies a token with PyJWT and takes its
``sub``; the token's ``exp`` (required) bounds the connection's life. Keys: an HMAC secret
(``TOKENWIRE_JWT_SECRET``, HS256/384/512), a PEM public key or certificate
(``TOKENWIRE_JWT_PUBLIC_KEY``, the algorithms that fit its type), or a JWKS URL
(``TOKENWIRE_JWT_JWKS_URL``, cached, re-read when a token names an unknown ``kid``).

A token travels in ``Authorization: Bearer``, in a ``bearer.<jwt>`` entry of
``Sec-WebSocket-Protocol`` (what browsers can send), in the query string only when
``TOKENWIRE_ALLOW_QUERY_TOKEN`` is set, or in a first ``auth`` frame (see gateway/admission.py).
The token itself is never logged nor echoed: refusals name the reason, not the token.
The upload endpoints (gateway/uploads.py) authenticate an HTTP request the same way.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from starlette.requests import HTTPConnection

from shared.exceptions import InternalError, TokenExpired, Unauthorized
from shared.settings import Settings

__all__ = [
    "Authenticator",
    "Identity",
    "JwtAuth",
    "NoAuth",
    "authenticator_for",
    "handshake_token",
    "origin_allowed",
]

log = logging.getLogger("tokenwire.gateway")

_USER_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_HMAC_ALGORITHMS = ["HS256", "HS384", "HS512"]
_RSA_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# Shorter HMAC secrets can be brute-forced from one token (RFC 7518 §3.2: at least the hash size).
MIN_SECRET_BYTES = 32
QUERY_TOKEN_PARAM = "access_token"


@dataclass(frozen=True, slots=True)
class Identity:
    """The user of a connection; ``expires_at`` (Unix seconds) ends it, None never does."""

    user: str
    expires_at: float | None = None


class Authenticator(Protocol):
    requires_token: bool

    def anonymous(self, ws: HTTPConnection) -> Identity:
        """The identity of a connection that brings no token (NoAuth only)."""
        ...

    async def verify(self, token: str) -> Identity:
        """The identity a token proves, or raise :class:`Unauthorized`/:class:`TokenExpired`."""
        ...

    async def close(self) -> None: ...


class NoAuth:
    """Trust the ``user`` query parameter (development only)."""

    requires_token = False

    def anonymous(self, ws: HTTPConnection) -> Identity:
        user = ws.query_params.get("user")
        if user is None:
            return Identity("anon-" + secrets.token_hex(8))
        if not _USER_RE.fullmatch(user):
            raise Unauthorized("the user parameter must be 1-128 printable ASCII characters")
        return Identity(user)

    async def verify(self, token: str) -> Identity:
        raise Unauthorized("this gateway runs without authentication and takes no tokens")

    async def close(self) -> None:
        return None


class _KeySource(Protocol):
    async def key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        """The verification key for a token with this (unverified) header, and its algorithms."""
        ...

    async def close(self) -> None: ...


class _StaticKey:
    def __init__(self, key: Any, algorithms: list[str]) -> None:
        self.key = key
        self.algorithms = algorithms

    async def key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        return self.key, self.algorithms

    async def close(self) -> None:
        return None


def _public_key(text: str) -> _StaticKey:
    """A PEM public key or certificate (the text, or a path to it); algorithms from its type."""
    pem = text.replace("\\n", "\n").strip()
    if not pem.startswith("-----BEGIN"):
        pem = Path(pem).read_text()
    data = pem.encode()
    key: Any = (
        x509.load_pem_x509_certificate(data).public_key()
        if b"CERTIFICATE" in data.split(b"\n", 1)[0]
        else load_pem_public_key(data)
    )
    if isinstance(key, rsa.RSAPublicKey):
        return _StaticKey(key, _RSA_ALGORITHMS)
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
        return _StaticKey(key, [_EC_ALGORITHMS[key.curve.name]])
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return _StaticKey(key, ["EdDSA"])
    raise ValueError("TOKENWIRE_JWT_PUBLIC_KEY: unsupported key type (RSA, EC P-256/384/521, Ed)")


class _JwksKeys:
    """Keys from a JWKS URL: cached ``cache_s``; an unknown ``kid`` re-reads the set, at most
    every ``min_refresh_s`` (so random ``kid`` values cannot hammer the key server)."""

    def __init__(
        self,
        url: str,
        cache_s: float,
        min_refresh_s: float,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self.cache_s = cache_s
        self.min_refresh_s = min_refresh_s
        self.keys: dict[str | None, jwt.PyJWK] = {}
        self.fetched_at = -float("inf")
        self.attempted_at = -float("inf")
        self._lock = asyncio.Lock()
        self._client = client or httpx.AsyncClient(timeout=5.0, follow_redirects=False)

    async def key_for(self, header: dict[str, Any]) -> tuple[Any, list[str]]:
        kid = header.get("kid")
        if not isinstance(kid, str | None):
            raise Unauthorized("token refused: bad kid")
        await self._refresh(unknown_kid=False)
        jwk = self._lookup(kid)
        if jwk is None:
            await self._refresh(unknown_kid=True)
            jwk = self._lookup(kid)
        if not self.keys:
            raise InternalError("no JWKS signing keys could be read")
        if jwk is None:
            raise Unauthorized("token refused: unknown signing key")
        return jwk.key, [jwk.algorithm_name]

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self.keys) == 1:
            return next(iter(self.keys.values()))
        return self.keys.get(kid)

    async def _refresh(self, *, unknown_kid: bool) -> None:
        async with self._lock:
            now = time.monotonic()
            if now - self.attempted_at < self.min_refresh_s:
                return  # just tried (maybe for another connection)
            if not unknown_kid and now - self.fetched_at < self.cache_s:
                return
            self.attempted_at = now
            try:
                response = await self._client.get(self.url)
                response.raise_for_status()
                jwks = jwt.PyJWKSet.from_dict(response.json())
            except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
                # Keep serving the keys we have.
                log.warning("cannot read the JWKS", extra={"error": type(exc).__name__})
                return
            self.keys = {k.key_id: k for k in jwks.keys if k.public_key_use in (None, "sig")}
            self.fetched_at = now

    async def close(self) -> None:
        await self._client.aclose()


class JwtAuth:
    """Verify a JWT and take its ``sub``; ``exp`` is required, ``aud``/``iss`` when set."""

    requires_token = True

    def __init__(self, settings: Settings, http_client: httpx.AsyncClient | None = None) -> None:
        self.source: _KeySource
        if settings.jwt_secret is not None:
            secret = settings.jwt_secret.get_secret_value()
            if len(secret.encode()) < MIN_SECRET_BYTES:
                raise ValueError(
                    f"TOKENWIRE_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes long"
                )
            self.source = _StaticKey(secret, _HMAC_ALGORITHMS)
        elif settings.jwt_public_key:
            self.source = _public_key(settings.jwt_public_key)
        elif settings.jwt_jwks_url:
            self.source = _JwksKeys(
                settings.jwt_jwks_url,
                settings.jwks_cache_s,
                settings.jwks_min_refresh_s,
                http_client,
            )
        else:
            raise ValueError(
                "TOKENWIRE_AUTH=jwt needs TOKENWIRE_JWT_SECRET, TOKENWIRE_JWT_PUBLIC_KEY "
                "or TOKENWIRE_JWT_JWKS_URL"
            )
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self.leeway = settings.jwt_leeway_s

    def anonymous(self, ws: HTTPConnection) -> Identity:
        raise Unauthorized("a bearer token is required")

    async def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("token refused: malformed") from None
        key, algorithms = await self.source.key_for(header)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={
                    "require": ["sub", "exp"],
                    "verify_aud": self.audience is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired("token expired: get a fresh one") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"token refused: {_reason(exc)}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not _USER_RE.fullmatch(sub):
            raise Unauthorized("token refused: sub must be 1-128 printable ASCII characters")
        return Identity(sub, float(claims["exp"]) + self.leeway)

    async def close(self) -> None:
        await self.source.close()


def _reason(exc: jwt.PyJWTError) -> str:
    """A refusal reason that names the check, never the token or a key."""
    reasons: list[tuple[type[jwt.PyJWTError], str]] = [
        (jwt.InvalidAudienceError, "wrong audience"),
        (jwt.InvalidIssuerError, "wrong issuer"),
        (jwt.InvalidSignatureError, "bad signature"),
        (jwt.ImmatureSignatureError, "not valid yet"),
        (jwt.InvalidAlgorithmError, "algorithm not allowed"),
        (jwt.DecodeError, "malformed"),
    ]
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the {exc.claim} claim is missing"
    for kind, reason in reasons:
        if isinstance(exc, kind):
            return reason
    return type(exc).__name__


def handshake_token(ws: HTTPConnection, *, allow_query: bool) -> str | None:
    """The token the handshake carries: Authorization header, ``bearer.`` subprotocol entry,
    or (only when allowed) the ``access_token`` query parameter."""
    header = ws.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    for entry in ws.headers.get("sec-websocket-protocol", "").split(","):
        proto = entry.strip()
        if proto.startswith("bearer."):
            return proto[7:] or None
    if allow_query:
        return ws.query_params.get(QUERY_TOKEN_PARAM) or None
    return None


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """Whether a handshake's ``Origin`` may open a connection.

    No Origin (not a browser) passes: the header only protects browsers from pages of other
    sites. With an allow-list, the origin must be on it (``*`` allows any); without one, only
    the gateway's own origin (the Origin's host:port is the Host header) passes.
    """
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if allowed:
        return "*" in allowed or origin in allowed
    _, sep, netloc = origin.partition("://")
    return bool(sep) and host is not None and netloc == host.strip().lower()


def authenticator_for(settings: Settings) -> Authenticator:
    if settings.auth == "none":
        return NoAuth()
    return JwtAuth(settings)
