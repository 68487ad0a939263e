from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from shared.settings import Settings
from shared.subjects import gateway_frames, request_frames, request_key

TOKEN = re.compile(r"^[0-9a-f]+$")


@given(st.text(min_size=1), st.text(min_size=1))
def test_request_key_is_subject_safe_and_user_scoped(user: str, rid: str) -> None:
    key = request_key(user, rid)
    assert TOKEN.match(key)
    assert key != request_key(user + "x", rid)
    assert key == request_key(user, rid)


def test_frame_subjects_nest_under_the_gateway() -> None:
    subject = request_frames("gw1", "c1", "k", partitions=1)
    assert subject == "tw.frames.0.gw1.c1.k"
    # The gateway hears the stream's republish of the subject (tw.frames.X -> tw.live.X).
    assert gateway_frames("gw1") == "tw.live.*.gw1.>"


def test_settings_read_contract_names(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DIFY_API_URL", "http://dify.local/v1/")
    monkeypatch.setenv("DIFY_API_KEY", "app-secret")
    monkeypatch.setenv("TOKENWIRE_NATS_URL", "nats://n:4222")
    monkeypatch.setenv("TOKENWIRE_AUTH", "none")
    s = Settings()
    assert s.dify_api_url == "http://dify.local/v1"
    assert s.dify_api_key is not None and s.dify_api_key.get_secret_value() == "app-secret"
    assert "app-secret" not in repr(s)
    assert s.nats_url == "nats://n:4222" and s.auth == "none"
