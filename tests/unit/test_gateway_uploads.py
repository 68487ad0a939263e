"""The upload endpoints (gateway/uploads.py) with a fake bus: authenticated as the socket,
origin-checked, streamed into chunks, refused (413/415) before any worker is asked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from gateway.auth import JwtAuth, NoAuth
from gateway.uploads import Uploads
from shared.calls import decode_call, encode_reply, encode_reply_error
from shared.exceptions import NotFound
from shared.settings import Settings
from shared.uploads import CHUNK_BYTES, StagedUpload

SECRET = "upload-test-secret-0123456789abcdef0123"
PARAMETERS = {"system_parameters": {"image_file_size_limit": 1, "file_size_limit": 1}}


@dataclass
class FakeBus:
    chunks: dict[str, list[bytes]] = field(default_factory=dict)
    asked: list[StagedUpload] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)
    answer: bytes | None = None

    async def call(self, data: bytes, timeout_s: float) -> bytes:
        assert decode_call(data).method == "app.parameters"
        return encode_reply(PARAMETERS)

    async def request(self, subject: str, data: bytes, timeout_s: float, what: str) -> bytes:
        staged = StagedUpload.from_bytes(data)
        self.asked.append(staged)
        if self.answer is not None:
            return self.answer
        return encode_reply({"id": "f1", "name": staged.filename, "size": staged.size})

    async def stage_chunk(self, subject: str, data: bytes) -> int:
        self.chunks.setdefault(subject, []).append(data)
        return sum(len(c) for c in self.chunks.values())

    async def discard_chunks(self, subject: str) -> None:
        self.discarded.append(subject)


class FreeRate:
    async def take(self, user: str, request_id: str) -> None:
        return None


class AppClient:
    """Sync calls into the app through httpx's ASGI transport (no server, no thread)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    def __enter__(self) -> AppClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as http:
                return await http.post(url, **kwargs)

        return asyncio.run(go())


def client(settings: Settings, auth: Any) -> tuple[AppClient, FakeBus]:
    bus = FakeBus()
    uploads = Uploads(bus, settings, auth, FreeRate())  # type: ignore[arg-type]
    app = Starlette(
        routes=[
            Route("/v1/files", uploads.files, methods=["POST"]),
            Route("/v1/audio-to-text", uploads.audio_to_text, methods=["POST"]),
        ]
    )
    return AppClient(app), bus


@pytest.fixture
def jwt_client() -> Iterator[tuple[AppClient, FakeBus]]:
    settings = Settings(auth="jwt", jwt_secret=SECRET, allowed_origins=["https://ok.example"])
    test, bus = client(settings, JwtAuth(settings))
    with test:
        yield test, bus


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")


def test_a_bearer_token_names_the_user_and_the_file_is_staged_in_chunks(
    jwt_client: tuple[AppClient, FakeBus],
) -> None:
    test, bus = jwt_client
    data = bytes(range(256)) * (CHUNK_BYTES // 256 + 10)  # a bit over one chunk
    response = test.post(
        "/v1/files",
        headers={"Authorization": f"Bearer {token('ada')}", "Origin": "https://ok.example"},
        files={"file": ("big.txt", data, "text/plain")},
    )
    assert response.status_code == 201, response.text
    (staged,) = bus.asked
    assert (staged.user, staged.app, staged.target) == ("ada", "default", "files")
    (chunks,) = bus.chunks.values()
    assert b"".join(chunks) == data and len(chunks) == 2 and len(staged.seqs) == 2
    assert staged.size == len(data)


def test_no_token_or_a_foreign_origin_is_refused_before_anything(
    jwt_client: tuple[AppClient, FakeBus],
) -> None:
    test, bus = jwt_client
    files = {"file": ("a.png", b"x", "image/png")}
    response = test.post("/v1/files", files=files)
    assert response.status_code == 401 and response.json()["code"] == "unauthorized"
    response = test.post(
        "/v1/files",
        headers={"Authorization": f"Bearer {token('ada')}", "Origin": "https://evil.example"},
        files=files,
    )
    assert response.status_code == 403 and response.json()["type"] == "error"
    assert bus.asked == [] and bus.chunks == {}


def test_over_the_apps_limit_is_413_and_the_staged_chunks_are_deleted(
    jwt_client: tuple[AppClient, FakeBus],
) -> None:
    test, bus = jwt_client
    data = b"\0" * (1024 * 1024 + 1)  # the app's image limit is 1 MB
    response = test.post(
        "/v1/files",
        headers={"Authorization": f"Bearer {token('ada')}"},
        files={"file": ("big.png", data, "image/png")},
    )
    assert response.status_code == 413
    assert response.json() == {
        "type": "error",
        "code": "file_too_large",
        "message": response.json()["message"],
        "retryable": False,
    }
    assert bus.asked == [], "no worker was asked: Dify never saw a byte"
    assert bus.discarded == list(bus.chunks)


def test_a_type_nobody_takes_is_415_before_a_byte_is_staged(
    jwt_client: tuple[AppClient, FakeBus],
) -> None:
    test, bus = jwt_client
    response = test.post(
        "/v1/files",
        headers={"Authorization": f"Bearer {token('ada')}"},
        files={"file": ("run.exe", b"MZ" * 1000, "application/octet-stream")},
    )
    assert response.status_code == 415 and response.json()["code"] == "unsupported_file_type"
    assert bus.chunks == {} and bus.asked == []


def test_none_mode_takes_the_user_parameter_and_passes_the_workers_error_on() -> None:
    test, bus = client(Settings(auth="none", allow_insecure=True), NoAuth())
    bus.answer = encode_reply_error(NotFound("no such app"))
    with test:
        response = test.post(
            "/v1/audio-to-text",
            params={"user": "bob", "app": "sales"},
            files={"file": ("note.mp3", b"ID3" + b"\0" * 100, "audio/mpeg")},
        )
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    (staged,) = bus.asked
    assert (staged.user, staged.app, staged.target) == ("bob", "sales", "audio")


def test_the_app_field_must_come_before_the_file() -> None:
    test, bus = client(Settings(auth="none", allow_insecure=True), NoAuth())
    body = (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\nxx\r\n"
        b'--B\r\nContent-Disposition: form-data; name="app"\r\n\r\nsales\r\n--B--\r\n'
    )
    with test:
        response = test.post(
            "/v1/files",
            params={"user": "bob"},
            headers={"Content-Type": "multipart/form-data; boundary=B"},
            content=body,
        )
    assert response.status_code == 400 and response.json()["code"] == "bad_params"
    assert bus.asked == []
