"""The JSON Schemas in docs/schemas/ are what the wire code generates, and they accept
real messages."""

import json

import jsonschema

from shared.schemas import SCHEMA_DIR, generate
from shared.wire import AdmissionReply, ArgumentError, InputFile, RunRequest, encode


def test_checked_in_schemas_match_the_wire_code():
    generated = generate()
    on_disk = {path.name: path.read_text() for path in SCHEMA_DIR.glob("*.json")}
    stale = sorted(name for name in generated if on_disk.get(name) != generated[name])
    extra = sorted(set(on_disk) - set(generated))
    assert not stale, f"docs/schemas out of date for {stale}: run `make schemas`"
    assert not extra, f"docs/schemas has files no wire message makes: {extra}"


def test_run_request_schema_accepts_an_encoded_request_and_refuses_a_bad_one():
    schema = json.loads((SCHEMA_DIR / "RunRequest.json").read_text())
    request = RunRequest(
        request_id="req-1",
        tool="doc-stats",
        arguments={"document": "GPL-3", "top": 5},
        inputs=[InputFile(name="GPL-3", data=b"text")],
    )
    jsonschema.validate(json.loads(encode(request)), schema)
    bad = {"request_id": "req-1", "tool": "Not A Token", "surprise": 1}
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(bad))
    assert {e.validator for e in errors} >= {"pattern", "additionalProperties"}


def test_admission_reply_schema_accepts_a_rejection():
    schema = json.loads((SCHEMA_DIR / "AdmissionReply.json").read_text())
    reply = AdmissionReply(
        status="rejected",
        reason="invalid_arguments",
        errors=[ArgumentError(path="/top", message="'x' is not of type 'integer'")],
    )
    jsonschema.validate(json.loads(encode(reply)), schema)
