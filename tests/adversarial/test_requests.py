"""Hostile run requests: oversized and deeply nested arguments, arguments that fail the
schema everywhere at once. Each is refused with a clear reason before anything is
queued, and admission keeps serving the next request.
"""

from __future__ import annotations

import contextlib
import json
import uuid

import pytest
from nats.js.errors import KeyNotFoundError

from services.admission.validation import (
    MAX_ARGUMENT_BYTES,
    MAX_ARGUMENT_DEPTH,
    MAX_ERROR_MESSAGE_CHARS,
)
from shared import subjects
from shared.client import ClientError, RunRejected
from shared.ledger import request_key
from shared.wire import AdmissionReply, decode, encode
from tests.adversarial.conftest import LOG_MESSAGE_MAX_BYTES, new_marker, run_hostile

TOOL = "python-exec"
TEST_MAX_PAYLOAD_BYTES = 8 * 1024 * 1024  # tests/conftest.py's nats-server
REPLY_MAX_BYTES = 8 * 1024


@contextlib.asynccontextmanager
async def nothing_admitted(client, request_id: str, marker: str, logs):
    """Nothing may be queued, claimed, published as an event or logged with `marker`."""
    js = client.nc.jetstream()
    before = {
        stream: (await js.stream_info(stream)).state.last_seq
        for stream in (subjects.WORK_STREAM, subjects.EVENTS_STREAM)
    }
    yield
    after = {stream: (await js.stream_info(stream)).state.last_seq for stream in before}
    assert after == before
    requests = await js.key_value(subjects.REQUESTS_BUCKET)
    with pytest.raises(KeyNotFoundError):
        await requests.get(request_key("default", request_id))
    for record in logs.records:
        message = record.getMessage()
        assert marker not in message, message[:200]
        assert len(message.encode("utf-8", "replace")) <= LOG_MESSAGE_MAX_BYTES


async def assert_admission_serves(client) -> None:
    """The next ordinary request is admitted and its run succeeds."""
    token = new_marker()
    result, _ = await run_hostile(client, f"print({token!r})")
    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    assert token in result.stdout


async def test_one_megabyte_of_arguments_is_rejected_as_arguments_too_large(
    client, marker, service_logs
):
    request_id = f"adv-{uuid.uuid4().hex}"
    code = marker + "#" * 1_000_000

    async with nothing_admitted(client, request_id, marker, service_logs):
        with pytest.raises(RunRejected) as rejected:
            await client.submit(TOOL, {"code": code}, request_id=request_id)

    reply = rejected.value.reply
    assert reply.reason == "arguments_too_large"
    assert f"at most {MAX_ARGUMENT_BYTES} allowed" in reply.message
    assert len(encode(reply)) <= REPLY_MAX_BYTES
    await assert_admission_serves(client)


async def test_ten_megabytes_of_arguments_fail_in_the_client_and_nothing_is_sent(
    client, marker, service_logs
):
    request_id = f"adv-{uuid.uuid4().hex}"
    code = marker + "#" * 10_000_000

    async with nothing_admitted(client, request_id, marker, service_logs):
        with pytest.raises(ClientError) as failed:
            await client.submit(TOOL, {"code": code}, request_id=request_id)

    # Refused by the client itself: not a rejection by admission, nor a timeout.
    assert type(failed.value) is ClientError
    assert f"server's max_payload of {TEST_MAX_PAYLOAD_BYTES} bytes" in str(failed.value)
    assert marker not in str(failed.value)
    assert client.nc.is_connected
    await assert_admission_serves(client)


async def test_arguments_nested_past_the_depth_limit_are_rejected_as_too_deep(
    client, marker, service_logs
):
    request_id = f"adv-{uuid.uuid4().hex}"
    nested: object = marker
    for _ in range(500):
        nested = [nested]

    async with nothing_admitted(client, request_id, marker, service_logs):
        with pytest.raises(RunRejected) as rejected:
            await client.submit(TOOL, {"code": nested}, request_id=request_id)

    reply = rejected.value.reply
    assert reply.reason == "arguments_too_deep"
    assert f"at most {MAX_ARGUMENT_DEPTH} allowed" in reply.message
    await assert_admission_serves(client)


async def test_arguments_nested_past_the_decoders_recursion_limit_are_rejected_as_too_deep(
    client, marker, service_logs
):
    # Too deep for any encoder to build: the request is written by hand, 100,000 levels.
    request_id = f"adv-{uuid.uuid4().hex}"
    depth = 100_000
    head = json.dumps({"request_id": request_id, "tool": TOOL})[:-1]
    payload = f'{head}, "arguments": {{"code": {"[" * depth}"{marker}"{"]" * depth}}}}}'

    async with nothing_admitted(client, request_id, marker, service_logs):
        msg = await client.nc.request(subjects.SUBMIT_SUBJECT, payload.encode(), timeout=10)

    reply = decode(msg.data, AdmissionReply)
    assert reply.status == "rejected"
    assert reply.reason == "arguments_too_deep"
    assert f"deeper than {MAX_ARGUMENT_DEPTH} levels" in reply.message
    assert len(msg.data) <= REPLY_MAX_BYTES
    await assert_admission_serves(client)


async def test_arguments_failing_the_schema_everywhere_report_each_path_with_capped_messages(
    client, marker, service_logs
):
    request_id = f"adv-{uuid.uuid4().hex}"
    unexpected = {f"{marker}-{index:04d}-{'y' * 40}": index for index in range(1000)}
    arguments = {"code": 12345, "language": "perl", **unexpected}

    async with nothing_admitted(client, request_id, marker, service_logs):
        with pytest.raises(RunRejected) as rejected:
            await client.submit(TOOL, arguments, request_id=request_id)

    reply = rejected.value.reply
    assert reply.reason == "invalid_arguments"
    # Every failing place, sorted: the unexpected names (at the root), /code, /language.
    assert [error.path for error in reply.errors] == ["", "/code", "/language"]
    assert "fail at 3 place(s)" in reply.message
    assert "Additional properties are not allowed" in reply.errors[0].message
    assert "12345 is not of type 'string'" in reply.errors[1].message
    assert "'perl' is not one of ['python', 'sh']" in reply.errors[2].message
    # 1000 unexpected names are not echoed back: each message is cut at its cap.
    assert all(len(error.message) <= MAX_ERROR_MESSAGE_CHARS for error in reply.errors)
    assert reply.errors[0].message.endswith("…")
    assert len(encode(reply)) <= REPLY_MAX_BYTES
    await assert_admission_serves(client)


async def test_nul_character_in_an_argv_argument_is_rejected_by_admission_not_blamed_on_the_tool(
    client, marker, service_logs
):
    # The user's report: admitted, then "exec /sbin/docker-init: invalid argument" as the
    # tool's own failure. argv cannot carry a NUL, so no run must start.
    request_id = f"adv-{uuid.uuid4().hex}"
    arguments = {"language": "python", "code": f"print('{marker}')\x00print('after')"}

    async with nothing_admitted(client, request_id, marker, service_logs):
        with pytest.raises(RunRejected) as rejected:
            await client.submit(TOOL, arguments, request_id=request_id)

    reply = rejected.value.reply
    assert (reply.status, reply.reason) == ("rejected", "invalid_arguments")
    assert [(error.path, error.message) for error in reply.errors] == [
        ("/code", "contains a NUL character, which argv cannot carry"),
    ]
    assert reply.run_id is None
    await assert_admission_serves(client)
