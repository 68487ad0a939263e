"""Who is on the other end of a WebSocket: the user Dify will see.

``none`` (for ``tokenwire dev``, or with ``TOKENWIRE_ALLOW_INSECURE=1``) takes the ``user``
query parameter, else a fresh random id. ``jwt`` verifies a token with PyJWT and takes its
``sub``. The token comes in ``Authorization: Bearer`` or as a ``bearer.<jwt>`` entry of
``Sec-WebSocket-Protocol`` (what browsers can send). The token itself is never logged.
"""

from __future__ import annotations

import re
import secrets
from typing import Protocol

import jwt
from starlette.websockets import WebSocket

from shared.exceptions import Unauthorized
from shared.settings import Settings

__all__ = ["Authenticator", "JwtAuth", "NoAuth", "authenticator_for", "bearer_token"]

_USER_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_ALGORITHMS_BY_KEY = ["RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA", "PS256"]


class Authenticator(Protocol):
    def user_for(self, ws: WebSocket) -> str:
        """The user of this connection, or raise :class:`Unauthorized`."""
        ...


class NoAuth:
    """Trust the ``user`` query parameter (development only)."""

    def user_for(self, ws: WebSocket) -> str:
        user = ws.query_params.get("user")
        if user is None:
            return "anon-" + secrets.token_hex(8)
        if not _USER_RE.fullmatch(user):
            raise Unauthorized("the user parameter must be 1-128 printable ASCII characters")
        return user


class JwtAuth:
    """Verify a JWT (HS256 secret, or a PEM public key) and take its ``sub``."""

    def __init__(self, settings: Settings) -> None:
        if settings.jwt_secret is not None:
            self.key: str = settings.jwt_secret.get_secret_value()
            self.algorithms = ["HS256", "HS384", "HS512"]
        elif settings.jwt_public_key:
            self.key = settings.jwt_public_key
            self.algorithms = _ALGORITHMS_BY_KEY
        else:
            raise ValueError(
                "TOKENWIRE_AUTH=jwt needs TOKENWIRE_JWT_SECRET or TOKENWIRE_JWT_PUBLIC_KEY"
            )
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer

    def user_for(self, ws: WebSocket) -> str:
        token = bearer_token(ws)
        if token is None:
            raise Unauthorized("a bearer token is required")
        return self.verify(token)

    def verify(self, token: str) -> str:
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["sub", "exp"], "verify_aud": self.audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"token refused: {type(exc).__name__}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not _USER_RE.fullmatch(sub):
            raise Unauthorized("token's sub must be 1-128 printable ASCII characters")
        return sub


def bearer_token(ws: WebSocket) -> str | None:
    """The token from the Authorization header or a ``bearer.<jwt>`` subprotocol entry."""
    header = ws.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    for entry in ws.headers.get("sec-websocket-protocol", "").split(","):
        proto = entry.strip()
        if proto.startswith("bearer."):
            return proto[7:] or None
    return None


def authenticator_for(settings: Settings) -> Authenticator:
    if settings.auth == "none":
        return NoAuth()
    return JwtAuth(settings)
