"""NATS credentials in the settings: one at a time, pairs complete, passed on to both clients."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from faststream.nats.security import NatsNKey, NatsToken, NatsUserPassword
from pydantic import ValidationError

from shared.natsedge import broker_security, credentials
from shared.settings import Settings


def test_no_credentials_by_default() -> None:
    settings = Settings()
    assert credentials(settings) == {} and broker_security(settings) is None


def test_user_and_password_reach_nats_py_and_faststream() -> None:
    settings = Settings(nats_user="gw", nats_password="pw")
    assert credentials(settings) == {"user": "gw", "password": "pw"}
    security = broker_security(settings)
    assert isinstance(security, NatsUserPassword)
    assert "pw" not in repr(settings), "the password must not show in the settings' repr"


def test_token_and_nkey(tmp_path: Path) -> None:
    assert credentials(Settings(nats_token="t0k")) == {"token": "t0k"}
    assert isinstance(broker_security(Settings(nats_token="t0k")), NatsToken)
    seed = tmp_path / "user.nk"
    seed.write_text("SUAM...")
    assert credentials(Settings(nats_nkey_seed_file=seed)) == {"nkeys_seed": str(seed)}
    assert isinstance(broker_security(Settings(nats_nkey_seed_file=seed)), NatsNKey)
    creds = tmp_path / "user.creds"
    assert credentials(Settings(nats_creds_file=creds)) == {"user_credentials": str(creds)}


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"nats_user": "gw"}, "go together"),
        ({"nats_password": "pw"}, "go together"),
        ({"nats_token": "t", "nats_user": "gw", "nats_password": "pw"}, "one NATS credential"),
        ({"nats_token": "t", "nats_creds_file": "/x.creds"}, "one NATS credential"),
        ({"nats_tls_cert_file": "/c.pem"}, "go together"),
    ],
)
def test_contradictions_are_refused_at_start(fields: dict[str, str], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        Settings(**fields)  # type: ignore[arg-type]


def test_a_ca_file_makes_a_verifying_tls_context(tmp_path: Path) -> None:
    import certifi  # any bundle of CA certificates will do

    settings = Settings(nats_tls_ca_file=Path(certifi.where()))
    context = credentials(settings)["tls"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode is ssl.CERT_REQUIRED
