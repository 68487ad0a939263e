"""The pure rules of uploads (shared/uploads.py): limits from the app's /parameters and
TOKENWIRE_MAX_UPLOAD_BYTES, the push form reader split at every byte, Dify's body framing."""

from __future__ import annotations

import pytest

from shared.exceptions import BadParams, ErrorCode, FileRefused, InternalError, NotFound
from shared.uploads import (
    FormEvent,
    FormReader,
    StagedUpload,
    error_body,
    http_status,
    multipart_parts,
    upload_error,
    upload_limit,
)

MB = 1024 * 1024
PARAMS = {
    "file_upload": {"image": {"enabled": True}},
    "system_parameters": {
        "file_size_limit": 15,
        "image_file_size_limit": 10,
        "audio_file_size_limit": 50,
        "video_file_size_limit": 100,
    },
}


def test_the_apps_own_limit_per_category_applies_under_tokenwires() -> None:
    assert upload_limit("cat.PNG", "image/png", PARAMS, 100 * MB).max_bytes == 10 * MB
    assert upload_limit("notes.pdf", "application/pdf", PARAMS, 100 * MB).max_bytes == 15 * MB
    assert upload_limit("cat.png", "image/png", PARAMS, 1 * MB).max_bytes == 1 * MB
    # No system_parameters: Dify's defaults.
    assert upload_limit("clip.mp4", "video/mp4", {}, 500 * MB).max_bytes == 100 * MB


def test_types_nobody_takes_are_415() -> None:
    for name, mime in (("tool.exe", "application/x-msdownload"), ("noext", "text/plain")):
        with pytest.raises(FileRefused) as caught:
            upload_limit(name, mime, PARAMS, MB)
        assert caught.value.code is ErrorCode.UNSUPPORTED_FILE_TYPE
        assert caught.value.status == 415
    with pytest.raises(FileRefused):
        upload_limit("cat.png", "not a mime type", PARAMS, MB)


def test_an_apps_allowed_file_types_narrow_what_it_takes() -> None:
    only_images = {"file_upload": {"allowed_file_types": ["image"]}}
    upload_limit("cat.png", "image/png", only_images, MB)
    with pytest.raises(FileRefused):
        upload_limit("notes.pdf", "application/pdf", only_images, MB)
    custom = {
        "file_upload": {"allowed_file_types": ["custom"], "allowed_file_extensions": [".pdf"]}
    }
    upload_limit("notes.pdf", "application/pdf", custom, MB)
    with pytest.raises(FileRefused):
        upload_limit("notes.docx", "application/msword", custom, MB)


def test_audio_to_text_takes_audio_only_within_its_own_limit() -> None:
    limit = upload_limit("note.m4a", "audio/mp4", PARAMS, 100 * MB, target="audio")
    assert limit.max_bytes == 30 * MB
    with pytest.raises(FileRefused):
        upload_limit("cat.png", "image/png", PARAMS, MB, target="audio")


def test_the_limit_counts_bytes_as_they_come() -> None:
    limit = upload_limit("cat.png", "image/png", PARAMS, 10)
    limit.check(6)
    limit.check(4)
    with pytest.raises(FileRefused) as caught:
        limit.check(1)
    assert caught.value.code is ErrorCode.FILE_TOO_LARGE and caught.value.status == 413


def _form(boundary: str, data: bytes) -> bytes:
    return (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="app"\r\n\r\n'
            "sales\r\n"
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="a b.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


def _read(body: bytes, cut: list[int]) -> list[FormEvent]:
    reader = FormReader("multipart/form-data; boundary=XyZ")
    events: list[FormEvent] = []
    last = 0
    for at in [*cut, len(body)]:
        events += reader.feed(body[last:at])
        last = at
    return events + reader.feed_eof()


def test_the_form_reader_gives_the_same_fields_and_bytes_wherever_the_body_is_split() -> None:
    data = bytes(range(256)) * 3 + b"\r\n--XY not quite the boundary\r\n"
    body = _form("XyZ", data)
    for at in range(len(body)):
        events = _read(body, [at])
        kinds = [e.kind for e in events if e.kind != "data"]
        assert kinds == ["field", "file", "end"], at
        assert events[0].name == "app" and events[0].text == "sales"
        file = next(e for e in events if e.kind == "file")
        assert (file.name, file.filename, file.mime_type) == ("file", "a b.png", "image/png")
        assert b"".join(e.data for e in events if e.kind == "data") == data, at


def test_the_form_reader_refuses_what_is_not_a_form() -> None:
    with pytest.raises(BadParams):
        FormReader("application/json")
    with pytest.raises(BadParams):
        FormReader("multipart/form-data")  # no boundary
    reader = FormReader("multipart/form-data; boundary=XyZ")
    with pytest.raises(BadParams):
        reader.feed(b"--XyZ\r\n" + b"X-Long: " + b"a" * 10_000 + b"\r\n")


def test_difys_body_carries_the_connections_user_and_a_safe_filename() -> None:
    staged = StagedUpload(
        upload_id="u1",
        seqs=[1],
        size=3,
        filename='../evil"\r\nX-Injected: 1.png',
        mime_type="image/png",
        user="ada",
        app="default",
        target="files",
    )
    head, tail = multipart_parts("B", staged)
    assert b'name="user"\r\n\r\nada\r\n' in head
    assert b"\r\nX-Injected" not in head
    assert b'filename="evil___X-Injected: 1.png"' in head
    assert tail == b"\r\n--B--\r\n"
    assert StagedUpload.from_bytes(staged.to_bytes()) == staged
    with pytest.raises(InternalError):
        StagedUpload.from_bytes(b'{"upload_id": "u"}')


def test_difys_refusals_and_the_http_statuses() -> None:
    too_big = upload_error("files", 413, "file_too_large", "")
    assert too_big.code is ErrorCode.FILE_TOO_LARGE and http_status(too_big) == 413
    off = upload_error("audio", 400, "speech_to_text_disabled", "Speech to text is disabled.")
    assert off.code is ErrorCode.FEATURE_DISABLED and http_status(off) == 403
    down = upload_error("files", 503, None, "")
    assert down.retryable and http_status(down) == 503
    assert error_body(down)["retry_after_ms"] == 1000
    assert http_status(NotFound("x")) == 404
    assert error_body(FileRefused("too big")) == {
        "type": "error",
        "code": "file_too_large",
        "message": "too big",
        "retryable": False,
    }
