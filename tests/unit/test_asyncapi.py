"""The AsyncAPI documents in docs/ against the code they describe, both directions.

docs/asyncapi-websocket.yaml is written by hand; these tests make it impossible to add a
frame, a field, an error code or a close code to the code without documenting it (or to
document one that does not exist). docs/asyncapi-nats.yaml must name every subject, stream,
consumer and bucket of shared/subjects.py and carry the job exactly as shared/jobs.py has it.
Both documents are validated against the official AsyncAPI 3.0.0 JSON Schema, which the
npm package @asyncapi/specs ships (``npm ci --prefix deploy``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal

import jsonschema
import pytest
import yaml

from shared import subjects
from shared.exceptions import CloseCode, ClosePolicy, ErrorCode
from shared.frames import ClientFrame, ErrorFrame, FileRef, ServerFrame, encode
from shared.jobs import Job

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
WS_DOC = DOCS / "asyncapi-websocket.yaml"
NATS_DOC = DOCS / "asyncapi-nats.yaml"
ASYNCAPI_SCHEMA = ROOT / "deploy/node_modules/@asyncapi/specs/schemas/3.0.0-without-$id.json"

SERVER_CLASSES: tuple[type[Any], ...] = typing.get_args(ServerFrame)
CLIENT_MODELS: tuple[type[Any], ...] = typing.get_args(ClientFrame)


@cache
def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def resolve(node: dict[str, Any], doc_path: Path) -> dict[str, Any]:
    """Follow ``$ref`` (local or to a sibling document) until a schema object is reached."""
    while "$ref" in node:
        ref = node["$ref"]
        file_part, _, pointer = ref.partition("#")
        path = (doc_path.parent / file_part).resolve() if file_part else doc_path
        target: Any = load(path)
        for part in pointer.strip("/").split("/"):
            target = target[part]
        node, doc_path = target, path
    return node


def doc_types(prop: dict[str, Any], doc_path: Path) -> set[str]:
    schema = resolve(prop, doc_path)
    kind = schema.get("type")
    if kind is None and "const" in schema:
        return {_json_type_of(schema["const"])}
    if kind is None and "enum" in schema:
        return {_json_type_of(v) for v in schema["enum"]}
    return {kind} if isinstance(kind, str) else set(kind or ())


def _json_type_of(value: Any) -> str:
    return {str: "string", bool: "boolean", int: "integer", type(None): "null"}[type(value)]


def python_types(tp: Any) -> set[str]:
    """JSON types of a Python annotation, as orjson puts it on the wire."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(python_types(arg) for arg in typing.get_args(tp)))
    if origin is Literal:
        return {_json_type_of(arg) for arg in typing.get_args(tp)}
    base = origin or tp
    mapping = {
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        dict: "object",
        list: "array",
        type(None): "null",
    }
    assert base in mapping, f"no JSON type for {tp!r}: teach the test"
    return {mapping[base]}


def sample(tp: Any) -> Any:
    types_ = python_types(tp)
    if "null" in types_:
        return None
    return {"string": "x", "integer": 1, "boolean": False, "object": {}, "array": []}[
        next(iter(types_))
    ]


def frame_type(cls: type[Any]) -> str:
    value = cls.__dataclass_fields__["type"].default
    assert isinstance(value, str)
    return value


def model_type(model: type[Any]) -> str:
    value = typing.get_args(model.model_fields["type"].annotation)[0]
    assert isinstance(value, str)
    return value


def message_schema(name: str) -> dict[str, Any]:
    doc = load(WS_DOC)
    message = resolve(doc["components"]["messages"][name], WS_DOC)
    return resolve(message["payload"], WS_DOC)


# --- the WebSocket document --------------------------------------------------------------


def test_every_frame_is_a_documented_message_and_nothing_else_is() -> None:
    doc = load(WS_DOC)
    server = {frame_type(cls) for cls in SERVER_CLASSES}
    client = {model_type(model) for model in CLIENT_MODELS}
    channel = doc["channels"]["connection"]
    assert set(channel["messages"]) == server | client

    def names(operation: str) -> set[str]:
        refs = doc["operations"][operation]["messages"]
        return {ref["$ref"].rsplit("/", 1)[-1] for ref in refs}

    assert doc["operations"]["receiveClientFrames"]["action"] == "receive"
    assert names("receiveClientFrames") == client
    assert doc["operations"]["sendServerFrames"]["action"] == "send"
    assert names("sendServerFrames") == server
    one_of = doc["components"]["schemas"]["ServerFrame"]["oneOf"]
    documented = {resolve(ref, WS_DOC)["properties"]["type"]["const"] for ref in one_of}
    assert documented == server


@pytest.mark.parametrize("cls", SERVER_CLASSES, ids=frame_type)
def test_server_frame_fields_types_and_required_match_the_dataclass(cls: type[Any]) -> None:
    schema = message_schema(frame_type(cls))
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    assert set(schema["properties"]) == set(fields), "documented fields differ from the class"

    # Required = always on the wire: encode a frame built with only the mandatory arguments.
    mandatory = {
        f.name: sample(hints[f.name])
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    on_the_wire = set(json.loads(encode(cls(**mandatory))))
    assert set(schema["required"]) == on_the_wire

    assert schema["properties"]["type"]["const"] == frame_type(cls)
    for name in fields:
        if name == "type":
            continue
        assert doc_types(schema["properties"][name], WS_DOC) == python_types(hints[name]) - (
            {"null"} if name not in on_the_wire else set()
        ), f"{frame_type(cls)}.{name}"


def test_an_error_with_an_id_carries_id_and_seq_as_documented() -> None:
    schema = message_schema("error")
    frame = ErrorFrame(code="x", message="m", retryable=True, id="r", seq=2, retry_after_ms=5)
    wire = json.loads(encode(frame))
    assert set(wire) == set(schema["properties"])
    assert {"id", "seq", "retry_after_ms"}.isdisjoint(schema["required"])
    bare = json.loads(encode(ErrorFrame(code="x", message="m", retryable=False, id="r", seq=2)))
    assert "retry_after_ms" not in bare, "no hint: the field is left off, never null"


def test_hello_announces_the_limits_a_client_checks() -> None:
    limits = message_schema("hello")["properties"]["limits"]
    assert set(limits["properties"]) == {"max_frame_bytes"}


@pytest.mark.parametrize("model", CLIENT_MODELS, ids=model_type)
def test_client_frame_fields_and_required_match_the_model(model: type[Any]) -> None:
    schema = message_schema(model_type(model))
    truth = model.model_json_schema()
    assert set(schema["properties"]) == set(truth["properties"])
    assert set(schema["required"]) == set(truth.get("required", []))
    assert schema["properties"]["type"]["const"] == model_type(model)
    for name, prop in truth["properties"].items():
        expected = _pydantic_types(prop)
        if expected:
            assert doc_types(schema["properties"][name], WS_DOC) == expected, name
        for limit in ("pattern", "minLength", "maxLength", "minimum"):
            if limit in prop:
                assert resolve(schema["properties"][name], WS_DOC).get(limit) == prop[limit], (
                    f"{model_type(model)}.{name}: {limit}"
                )


def _pydantic_types(prop: dict[str, Any]) -> set[str]:
    if "anyOf" in prop:
        return set().union(*(_pydantic_types(p) for p in prop["anyOf"]))
    kind = prop.get("type")
    return {kind} if isinstance(kind, str) else set()


def test_file_refs_are_documented_like_the_model() -> None:
    schema = load(WS_DOC)["components"]["schemas"]["FileRef"]
    truth = FileRef.model_json_schema()
    assert set(schema["properties"]) == set(truth["properties"])
    assert set(schema["required"]) == set(truth["required"])
    for name in ("type", "transfer_method"):
        assert schema["properties"][name]["enum"] == truth["properties"][name]["enum"]


def test_error_codes_are_the_catalogue() -> None:
    documented = load(WS_DOC)["components"]["schemas"]["ErrorCode"]["enum"]
    assert documented == [code.value for code in ErrorCode]


def test_close_codes_are_the_catalogue_with_their_policies() -> None:
    channel = load(WS_DOC)["channels"]["connection"]
    assert [(c["code"], c["name"], c["policy"]) for c in channel["x-close-codes"]] == [
        (int(code), code.name, code.policy.value) for code in CloseCode
    ]
    assert set(channel["x-close-policies"]) == {policy.value for policy in ClosePolicy}
    assert CloseCode.DRAINING == 4100


# --- the NATS document -------------------------------------------------------------------


def _subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching; ``{param}`` tokens of an address match one token."""
    p_tokens, s_tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(p_tokens):
        if token == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens):
            return False
        if token != "*" and token != s_tokens[i] and not s_tokens[i].startswith("{"):
            return False
    return len(p_tokens) == len(s_tokens)


def test_the_nats_document_names_every_subject_of_shared_subjects() -> None:
    doc = load(NATS_DOC)
    addresses = {channel["address"] for channel in doc["channels"].values()}
    # Concrete subjects and the subject builders appear as channel addresses …
    concrete = {
        value
        for name, value in vars(subjects).items()
        if name.isupper()
        and not name.startswith("_")
        and isinstance(value, str)
        and value.startswith("tw.")
    }
    exact = {s for s in concrete if "*" not in s and ">" not in s}
    exact |= {subjects.stop_subject("{key}")}
    assert exact <= addresses
    # The frame subject's documented parts, filled in, are what the code builds.
    key = subjects.request_key("u", "r1")
    (frames,) = [a for a in addresses if a.startswith("tw.frames.")]
    filled = frames.format(
        partition=subjects.frame_partition(key, 3), gateway="g", conn="c", key=key
    )
    assert filled == subjects.request_frames("g", "c", key, partitions=3)
    # … and every wildcard the code subscribes to covers at least one documented channel.
    wildcards = (concrete - exact) | {
        subjects.gateway_frames("{gateway}"),
        subjects.request_frames_any_connection("{key}", partitions=1),
        subjects.partition_frames(0),
    }
    for wildcard in wildcards:
        pattern = wildcard
        for param in ("{conn}", "{key}", "{gateway}"):
            pattern = pattern.replace(param, "*")
        assert any(_subject_matches(pattern, a) for a in addresses), wildcard


def test_every_worker_subscriber_faststream_reports_is_documented() -> None:
    """FastStream describes the worker's broker; each subscription must be a documented channel."""
    from faststream.specification import AsyncAPI

    from shared.settings import Settings
    from worker.app import create_app

    app = create_app(Settings(dify_api_key="app-test"))
    generated = AsyncAPI(app.broker, schema_version="3.0.0").to_specification().to_jsonable()
    subscribed = {channel["address"] for channel in generated["channels"].values()}
    assert subscribed, "FastStream found no subscriber"
    addresses = {channel["address"] for channel in load(NATS_DOC)["channels"].values()}
    for subject in subscribed:
        assert any(_subject_matches(subject, a) for a in addresses), subject


def test_the_nats_document_names_streams_consumer_and_bucket() -> None:
    text = NATS_DOC.read_text()
    for name in (
        subjects.JOBS_STREAM,
        subjects.FRAMES_STREAM,
        subjects.JOB_CONSUMER,
        subjects.REQUESTS_BUCKET,
    ):
        assert name in text, name
    jetstream = {
        channel["x-jetstream"]["stream"]: channel["x-jetstream"]["subjects"]
        for channel in load(NATS_DOC)["channels"].values()
        if "x-jetstream" in channel
    }
    assert jetstream[subjects.JOBS_STREAM] == subjects.JOBS_ALL
    assert jetstream[subjects.FRAMES_STREAM] == subjects.partition_frames(0)
    for name, value in vars(subjects).items():
        if name.endswith("_STREAM"):
            assert value in jetstream, f"stream {value} is not documented"


def test_the_job_payload_is_the_job_model() -> None:
    schema = load(NATS_DOC)["components"]["schemas"]["Job"]
    truth = Job.model_json_schema()
    assert set(schema["properties"]) == set(truth["properties"])
    assert set(schema["required"]) == set(truth["required"])
    for name, prop in truth["properties"].items():
        assert doc_types(schema["properties"][name], NATS_DOC) == _pydantic_types(prop), name


def test_frames_on_nats_are_the_websocket_server_frames() -> None:
    message = load(NATS_DOC)["components"]["messages"]["frame"]
    target = resolve(message["payload"], NATS_DOC)
    assert target is load(WS_DOC)["components"]["schemas"]["ServerFrame"]


# --- both documents are valid AsyncAPI 3.0.0 ---------------------------------------------


@cache
def asyncapi_validator() -> jsonschema.Draft7Validator:
    if not ASYNCAPI_SCHEMA.exists():
        pytest.fail(
            "the AsyncAPI 3.0.0 JSON Schema is missing: run `npm ci --prefix deploy` "
            f"(it installs @asyncapi/specs into {ASYNCAPI_SCHEMA.parents[3]})"
        )
    return jsonschema.Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text()))


@pytest.mark.parametrize("path", [WS_DOC, NATS_DOC], ids=lambda p: p.name)
def test_documents_are_valid_asyncapi_3(path: Path) -> None:
    errors = [
        f"{'/'.join(map(str, e.path))}: {e.message[:200]}"
        for e in asyncapi_validator().iter_errors(load(path))
    ]
    assert errors == []
    assert load(path)["asyncapi"] == "3.0.0"


def test_the_validator_rejects_a_broken_document() -> None:
    broken = copy.deepcopy(load(WS_DOC))
    broken["operations"]["sendServerFrames"]["action"] = "publish"  # AsyncAPI 2 wording
    del broken["info"]["version"]
    assert len(list(asyncapi_validator().iter_errors(broken))) >= 2
