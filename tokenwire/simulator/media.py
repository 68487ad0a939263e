"""Deterministic stand-ins for Dify's speech features and file kinds (pure: no I/O, no clock).

``transcript_of(audio)`` is what ``POST /audio-to-text`` answers for those bytes,
``speech_of(text)`` the "MP3" ``POST /text-to-audio`` returns, and :func:`file_category` the
size-limit class Dify puts an upload in (``system_parameters``: image, video, audio, other).
"""

from __future__ import annotations

import hashlib
from typing import Final, Literal

from tokenwire.simulator.scenarios import answer_tokens

__all__ = [
    "AUDIO_EXTENSIONS",
    "AUDIO_LIMIT_BYTES",
    "AUDIO_MIME_TYPES",
    "Category",
    "file_category",
    "speech_of",
    "suggested_questions",
    "transcript_of",
]

Category = Literal["image", "video", "audio", "document"]

AUDIO_LIMIT_BYTES: Final = 30 * 1024 * 1024
"""``/audio-to-text`` refuses more than 30 MB (413 ``audio_too_large``)."""
AUDIO_EXTENSIONS: Final = frozenset({"mp3", "m4a", "wav", "amr", "mpga"})
AUDIO_MIME_TYPES: Final = frozenset(
    {
        "audio/mp3",
        "audio/mpeg",
        "audio/mpga",
        "audio/m4a",
        "audio/mp4",
        "audio/x-m4a",
        "audio/wav",
        "audio/x-wav",
        "audio/wave",
        "audio/amr",
    }
)
_EXTENSIONS: Final[dict[Category, frozenset[str]]] = {
    "image": frozenset({"jpg", "jpeg", "png", "webp", "gif", "svg"}),
    "video": frozenset({"mp4", "mov", "mpeg", "webm"}),
    "audio": frozenset({"mp3", "m4a", "wav", "amr", "mpga"}),
}
_ID3: Final = b"ID3\x04\x00\x00\x00\x00\x00\x00"


def file_category(extension: str | None) -> Category:
    """Which of Dify's upload size limits applies to a file with this extension."""
    ext = (extension or "").lower()
    for category, extensions in _EXTENSIONS.items():
        if ext in extensions:
            return category
    return "document"


def transcript_of(audio: bytes) -> str:
    """The fake transcript of ``audio``: the same bytes always give the same words."""
    seed = hashlib.sha256(audio).hexdigest()
    return "".join(answer_tokens(seed, 6)).replace("\n", " ").strip()


def speech_of(text: str) -> bytes:
    """Fake MP3 bytes for ``text``: an ID3 header, then a digest per 32 characters."""
    chunks = [text[i : i + 32] for i in range(0, max(len(text), 1), 32)]
    return _ID3 + b"".join(hashlib.sha256(c.encode("utf-8")).digest() for c in chunks)


def suggested_questions(query: str) -> list[str]:
    """Three follow-ups to a message (``GET /messages/{id}/suggested``), stable per query."""
    topic = query.strip().split("\n")[0][:40] or "this"
    return [
        f"Can you tell me more about {topic}?",
        f"What are the limits of {topic}?",
        "How would I try this myself?",
    ]
