"""Admission's checks of a request, without NATS: bounds, schema, placeholders, inputs."""

from __future__ import annotations

import re

import msgspec
import pytest

from services.admission.errors import InvalidArguments, MalformedRequest, RequestRejected
from services.admission.service import new_run_id, request_digest
from services.admission.validation import (
    MAX_ARGUMENT_BYTES,
    MAX_ARGUMENT_DEPTH,
    MAX_REPORTED_ERRORS,
    ArgumentValidator,
    check_argument_bounds,
    check_inputs,
    check_request_size,
    decode_request,
    json_depth,
    json_pointer,
    max_request_bytes,
)
from shared.toolspec import ToolSpec
from shared.wire import InputFile, RunRequest

SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "maxLength": 10},
        "count": {"type": "integer", "minimum": 1},
        "when": {"type": "string", "format": "date-time"},
        "items": {
            "type": "array",
            "items": {"type": "object", "properties": {"name": {"type": "string"}}},
        },
        "options": {"type": "object"},
        "words": {"type": "array"},
    },
    "required": ["text"],
    "additionalProperties": False,
}


def make_spec(**fields) -> ToolSpec:
    base = {
        "name": "admtest-unit",
        "version": "1.0.0",
        "image": {"ref": "billy/admtest-unit:1"},
        "command": ["echo", "{text}", "{options}", "{words}"],
        "arguments_schema": SCHEMA,
    }
    return ToolSpec.model_validate({**base, **fields})


def nested(depth: int) -> dict:
    """Arguments `depth` levels deep: the object itself, then lists."""
    value: object = 1
    for _ in range(depth - 1):
        value = [value]
    return {"deep": value}


def failures_of(arguments: dict) -> InvalidArguments:
    with pytest.raises(InvalidArguments) as caught:
        ArgumentValidator(make_spec()).check(arguments)
    return caught.value


def test_every_failing_argument_is_reported_with_its_json_pointer():
    error = failures_of(
        {"text": 5, "count": 0, "when": "yesterday", "items": [{"name": 1}], "extra": True}
    )

    paths = [e.path for e in error.errors]
    assert paths == ["", "/count", "/items/0/name", "/text", "/when"]
    assert "'extra' was unexpected" in error.errors[0].message
    assert error.reason == "invalid_arguments"
    assert "fail at 5 place(s); first at (root)" in error.message


def test_array_indexes_sort_as_numbers():
    error = failures_of({"text": "a", "items": [{"name": i} for i in range(12)]})

    assert [e.path for e in error.errors] == [f"/items/{i}/name" for i in range(12)]


def test_reported_errors_are_capped_at_50_first_ones_sorted():
    error = failures_of({"text": "a", "items": [{"name": i} for i in range(400)]})

    assert len(error.errors) == MAX_REPORTED_ERRORS
    assert error.errors[-1].path == f"/items/{MAX_REPORTED_ERRORS - 1}/name"
    assert "fail at 400 place(s)" in error.message


def test_error_messages_quoting_huge_values_are_shortened():
    error = failures_of({"text": "x" * 100_000})

    assert error.errors[0].path == "/text"
    assert len(error.errors[0].message) <= 200


def test_placeholder_given_an_object_is_rejected():
    error = failures_of({"text": "a", "options": {"k": "v"}, "words": ["ok", ["nested"]]})

    assert [(e.path, "placeholder" in e.message) for e in error.errors] == [
        ("/options", True),
        ("/words/1", True),
    ]


def test_nul_character_in_a_placeholder_string_or_list_item_is_rejected():
    validator = ArgumentValidator(make_spec())
    with pytest.raises(InvalidArguments) as caught:
        validator.check({"text": "a\x00b", "words": ["ok", "c\x00", 3]})
    nul = "contains a NUL character, which argv cannot carry"
    assert [(e.path, e.message) for e in caught.value.errors] == [
        ("/text", nul),
        ("/words/1", nul),
    ]


def test_nul_character_in_an_argument_that_never_reaches_argv_passes():
    # "items" is no command placeholder: the tool reads it from arguments.json.
    ArgumentValidator(make_spec()).check({"text": "a", "items": [{"name": "x\x00y"}]})


def test_valid_arguments_pass():
    ArgumentValidator(make_spec()).check(
        {"text": "hi", "count": 2, "when": "2024-05-01T10:00:00Z", "words": ["a", "b"]}
    )


def test_json_pointer_escapes_tilde_and_slash():
    assert json_pointer(["a/b", "c~d", 3]) == "/a~1b/c~0d/3"
    assert json_pointer([]) == ""


def test_arguments_up_to_32_levels_deep_pass_the_depth_bound():
    check_argument_bounds(nested(MAX_ARGUMENT_DEPTH))
    assert json_depth(nested(MAX_ARGUMENT_DEPTH)) == MAX_ARGUMENT_DEPTH


def test_arguments_deeper_than_32_levels_are_rejected():
    with pytest.raises(RequestRejected) as caught:
        check_argument_bounds(nested(MAX_ARGUMENT_DEPTH + 1))

    assert caught.value.reason == "arguments_too_deep"
    assert "at most 32" in caught.value.message


def test_arguments_over_256_kib_are_rejected_with_their_size():
    arguments = {"text": "x" * MAX_ARGUMENT_BYTES}

    with pytest.raises(RequestRejected) as caught:
        check_argument_bounds(arguments)

    size = len(msgspec.json.encode(arguments))
    assert caught.value.reason == "arguments_too_large"
    assert f"{size} bytes" in caught.value.message
    assert str(MAX_ARGUMENT_BYTES) in caught.value.message


def test_ten_thousand_deep_arguments_are_rejected_while_decoding():
    data = b'{"request_id":"r","tool":"t","arguments":{"a":' + b"[" * 10_000
    data += b"]" * 10_000 + b"}}"

    with pytest.raises(RequestRejected) as caught:
        decode_request(data)

    assert caught.value.reason == "arguments_too_deep"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b'{"request_id":"r","tool":5}', "$.tool"),
        (b'{"request_id":"r","tool":"t","colour":"red"}', "colour"),
        (b'{"request_id":"r","tool":"t","limits":{"cpus":-1}}', "$.limits.cpus"),
        (b'{"request_id":"r","tool":"t","inputs":[{"name":"a","data":"!"}]}', "$.inputs[0].data"),
        (b"not json", "malformed"),
    ],
)
def test_malformed_request_names_the_failing_field(data, field):
    with pytest.raises(MalformedRequest) as caught:
        decode_request(data)

    assert caught.value.status == "error"
    assert field in caught.value.message


def test_request_larger_than_any_tool_accepts_is_refused_before_decoding():
    limit = max_request_bytes([make_spec(limits={"input_bytes": 3000})])

    check_request_size(limit, limit)
    with pytest.raises(RequestRejected) as caught:
        check_request_size(limit + 1, limit)

    assert caught.value.reason == "request_too_large"
    assert f"{limit + 1} bytes" in caught.value.message
    assert limit == MAX_ARGUMENT_BYTES + 4000 + 64 * 1024


def test_duplicate_input_names_are_rejected():
    inputs = [InputFile("a.txt", b"1"), InputFile("b.txt", b"2"), InputFile("a.txt", b"3")]

    with pytest.raises(RequestRejected) as caught:
        check_inputs(inputs, make_spec())

    assert caught.value.reason == "duplicate_input"
    assert "a.txt" in caught.value.message


def test_inputs_over_the_tool_input_bytes_are_rejected_with_the_numbers():
    spec = make_spec(limits={"input_bytes": 100})
    check_inputs([InputFile("a", b"x" * 60), InputFile("b", b"x" * 40)], spec)

    with pytest.raises(RequestRejected) as caught:
        check_inputs([InputFile("a", b"x" * 60), InputFile("b", b"x" * 41)], spec)

    assert caught.value.reason == "inputs_too_large"
    assert "101 bytes" in caught.value.message
    assert "at most 100" in caught.value.message


def test_request_digest_ignores_key_order_and_absent_limits():
    first = decode_request(b'{"request_id":"r","tool":"t","arguments":{"a":1,"b":[2,{"c":3}]}}')
    second = decode_request(
        b'{"arguments":{"b":[2,{"c":3}],"a":1},"limits":{},"tool":"t","request_id":"r"}'
    )
    other = RunRequest(request_id="r", tool="t", arguments={"a": 2, "b": [2, {"c": 3}]})

    assert request_digest(first) == request_digest(second)
    assert request_digest(first) != request_digest(other)


def test_run_ids_are_time_sortable_tokens():
    run_ids = [new_run_id() for _ in range(50)]

    assert all(re.fullmatch(r"[0-9a-f]{32}", run_id) for run_id in run_ids)
    assert len(set(run_ids)) == 50
    assert [r[:12] for r in run_ids] == sorted(r[:12] for r in run_ids)
