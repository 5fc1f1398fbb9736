"""The admission service against a real nats-server: queue, reject, deduplicate, trace,
and keep serving whatever arrives."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from dataclasses import dataclass

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError
from prometheus_client import REGISTRY

from services.admission import service as service_module
from services.admission.service import (
    AdmissionService,
    RequestClaim,
    new_run_id,
    request_digest,
)
from services.admission.validation import decode_request
from shared import jetstream, subjects
from shared.errors import WireError
from shared.jetstream import Buckets
from shared.ledger import RunLedger, request_key
from shared.settings import Settings
from shared.toolspec import ToolCatalog, ToolSpec
from shared.wire import AdmissionReply, RunEvent, ToolList, WorkItem, decode, encode
from tests.conftest import NatsServer, wait_for

TOOL = "admtest-echo"
OTHER_TOOL = "admtest-sum"
MiB = 1024 * 1024


def make_catalog() -> ToolCatalog:
    echo = ToolSpec.model_validate(
        {
            "name": TOOL,
            "version": "1.2.0",
            "description": "Echoes its text.",
            "image": {"ref": "billy/admtest-echo:1.2.0"},
            "command": ["echo", "{text}", "{flags}"],
            "arguments_schema": {
                "type": "object",
                "properties": {
                    "text": {"type": "string", "maxLength": 1_000_000},
                    "count": {"type": "integer", "minimum": 1},
                    "when": {"type": "string", "format": "date-time"},
                    "flags": {"type": "array", "items": {"type": "string"}},
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"name": {"type": "string"}},
                            "required": ["name"],
                        },
                    },
                    "deep": {},
                },
                "required": ["text"],
                "additionalProperties": False,
            },
            "limits": {
                "cpus": 0.5,
                "memory_bytes": 64 * MiB,
                "timeout": {"default_s": 10, "max_s": 60},
                "input_bytes": 4096,
            },
        }
    )
    summer = ToolSpec.model_validate(
        {"name": OTHER_TOOL, "version": "0.1.0", "image": {"ref": "x:1"}, "command": ["sum"]}
    )
    return ToolCatalog({echo.name: echo, summer.name: summer})


@dataclass
class Client:
    nc: NATS
    js: JetStreamContext
    buckets: Buckets

    async def submit(self, request: dict | bytes, headers: dict | None = None) -> AdmissionReply:
        payload = request if isinstance(request, bytes) else json.dumps(request).encode()
        reply = await self.nc.request(subjects.SUBMIT_SUBJECT, payload, timeout=15, headers=headers)
        return decode(reply.data, AdmissionReply)

    async def work_items(self, run_id: str | None = None) -> list[tuple[RawStreamMsg, WorkItem]]:
        """This module's work items on the work stream (of one run, if given)."""
        info = await self.js.stream_info(subjects.WORK_STREAM)
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await self.js.get_msg(subjects.WORK_STREAM, seq)
                item = decode(msg.data, WorkItem)
            except (NotFoundError, WireError):
                continue
            if item.tool.startswith("admtest-") and run_id in (None, item.run_id):
                found.append((msg, item))
        return found

    async def queued_event(self, tenant: str, run_id: str) -> tuple[RawStreamMsg, RunEvent]:
        msg = await self.js.get_last_msg(
            subjects.EVENTS_STREAM, subjects.events_subject(tenant, run_id)
        )
        return msg, decode(msg.data, RunEvent)

    async def event_count(self, tenant: str, run_id: str) -> int:
        subject = subjects.events_subject(tenant, run_id)
        info = await self.js.stream_info(subjects.EVENTS_STREAM, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)


def run_request(**fields) -> dict:
    request = {
        "request_id": f"req-{uuid.uuid4().hex}",
        "tool": TOOL,
        "tenant": "acme",
        "arguments": {"text": "hello"},
    }
    return {**request, **fields}


async def wait_until_served(nc: NATS) -> None:
    """Wait until admission answers; a just-started nats-server (2.9.10) sometimes
    answers "no responders" for a moment even after the subscription was flushed."""

    async def answered() -> bool:
        try:
            await nc.request(subjects.TOOLS_SUBJECT, b"", timeout=1)
        except nats.errors.NoRespondersError:
            return False
        return True

    await wait_for(answered, timeout_s=10)


@pytest.fixture(scope="module")
async def client(settings):
    nc = await jetstream.connect(settings, "test-admission")
    js, buckets = await jetstream.declare(nc, settings)
    client = Client(nc, js, buckets)
    try:
        yield client
    finally:
        # Executor tests share this server: leave them none of our tools' work items.
        for msg, _ in await client.work_items():
            await js.delete_msg(subjects.WORK_STREAM, msg.seq)
        await nc.close()


@pytest.fixture(scope="module")
async def admission(settings, client):
    service = AdmissionService(settings, make_catalog())
    await service.start()
    try:
        await wait_until_served(client.nc)
        yield service
    finally:
        await service.stop()


async def test_valid_request_is_queued_with_work_item_ledger_record_and_event(admission, client):
    request = run_request(
        arguments={"text": "hi", "flags": ["-n"], "when": "2024-05-01T10:00:00Z"},
        inputs=[{"name": "in.txt", "data": base64.b64encode(b"payload").decode()}],
        limits={"memory_bytes": 32 * MiB},
    )

    reply = await client.submit(request)

    assert (reply.status, reply.duplicate, reply.request_id) == (
        "queued",
        False,
        request["request_id"],
    )
    assert re.fullmatch(r"[0-9a-f]{32}", reply.run_id)
    assert re.fullmatch(r"[0-9a-f]{32}", reply.trace_id)

    _, event = await client.queued_event("acme", reply.run_id)
    assert (event.type, event.status, event.source, event.tool) == (
        "queued",
        "queued",
        "admission",
        TOOL,
    )
    assert event.data == {"stream": subjects.WORK_STREAM}
    work_msg = await client.js.get_last_msg(subjects.WORK_STREAM, subjects.WORK_SUBJECT)
    item = decode(work_msg.data, WorkItem)
    assert work_msg.headers[subjects.MSG_ID_HEADER] == reply.run_id
    assert (item.run_id, item.request_id, item.tenant, item.tool) == (
        reply.run_id,
        request["request_id"],
        "acme",
        TOOL,
    )
    assert item.arguments == request["arguments"]
    assert [(i.name, i.data) for i in item.inputs] == [("in.txt", b"payload")]
    assert (item.limits.memory_bytes, item.limits.timeout_s, item.limits.cpus) == (
        32 * MiB,
        10.0,
        0.5,
    )
    assert item.spec["name"] == TOOL
    assert ToolSpec.model_validate(item.spec).limits.input_bytes == 4096

    record = await RunLedger(client.buckets.runs).get(reply.run_id)
    assert record is not None
    assert (record.status, record.request_id, record.trace_id) == (
        "queued",
        request["request_id"],
        reply.trace_id,
    )


async def test_invalid_arguments_are_rejected_with_every_failing_path(admission, client):
    arguments = {
        "count": 0,
        "when": "next tuesday",
        "flags": ["-n", 7],
        "items": [{"name": "a"}, {}, {"name": 3}],
        "surprise": True,
    }

    reply = await client.submit(run_request(arguments=arguments))

    assert (reply.status, reply.reason) == ("rejected", "invalid_arguments")
    assert [e.path for e in reply.errors] == [
        "",
        "",
        "/count",
        "/flags/1",
        "/items/1",
        "/items/2/name",
        "/when",
    ]
    messages = " | ".join(e.message for e in reply.errors)
    assert "'text' is a required property" in messages
    assert "'surprise' was unexpected" in messages
    assert "is not a 'date-time'" in messages
    assert "first at (root)" in reply.message
    assert reply.run_id is None


async def test_placeholder_given_a_list_of_objects_is_rejected(admission, client):
    reply = await client.submit(run_request(arguments={"text": "a", "flags": [{"x": 1}]}))

    assert (reply.status, reply.reason) == ("rejected", "invalid_arguments")
    assert "/flags/0" in [e.path for e in reply.errors]


async def test_unknown_tool_is_rejected_listing_known_tools(admission, client):
    reply = await client.submit(run_request(tool="no-such-tool"))

    assert (reply.status, reply.reason) == ("rejected", "unknown_tool")
    assert "'no-such-tool'" in reply.message
    assert f"known tools: {TOOL}, {OTHER_TOOL}" in reply.message


async def test_repeated_request_id_gives_the_same_run_and_one_work_item(admission, client):
    request = run_request()

    first = await client.submit(request)
    second = await client.submit(request)

    assert (first.status, second.status) == ("queued", "queued")
    assert second.run_id == first.run_id
    assert (first.duplicate, second.duplicate) == (False, True)
    assert len(await client.work_items(first.run_id)) == 1
    assert await client.event_count("acme", first.run_id) == 1


async def test_same_request_id_in_another_tenant_is_another_run(admission, client):
    request = run_request()

    first = await client.submit(request)
    second = await client.submit({**request, "tenant": "globex"})

    assert (first.status, second.status) == ("queued", "queued")
    assert second.run_id != first.run_id


async def test_request_id_reused_with_a_different_payload_is_a_conflict(admission, client):
    request = run_request()
    first = await client.submit(request)

    reply = await client.submit({**request, "arguments": {"text": "changed"}})

    assert (reply.status, reply.reason) == ("rejected", "request_id_conflict")
    assert request["request_id"] in reply.message
    assert len(await client.work_items(first.run_id)) == 1


async def test_concurrent_duplicates_across_two_replicas_give_one_run(admission, client, settings):
    replica = AdmissionService(settings, make_catalog())
    await replica.start()
    try:
        request = run_request()
        replies = await asyncio.gather(*(client.submit(request) for _ in range(12)))
    finally:
        await replica.stop()

    assert {r.status for r in replies} == {"queued"}
    run_ids = {r.run_id for r in replies}
    assert len(run_ids) == 1
    assert sum(not r.duplicate for r in replies) == 1
    run_id = run_ids.pop()
    assert len(await client.work_items(run_id)) == 1
    assert await client.event_count("acme", run_id) == 1


def hold_first_admission(admission, monkeypatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Stop the first admission of a request_id just before it records its run."""
    held, release = asyncio.Event(), asyncio.Event()
    record_run = admission._record_run

    async def held_record_run(item):
        if not held.is_set():
            held.set()
            await release.wait()
        return await record_run(item)

    monkeypatch.setattr(admission, "_record_run", held_record_run)
    return held, release


async def test_duplicate_arriving_while_the_first_is_in_flight_waits_for_its_run(
    admission, client, monkeypatch
):
    held, release = hold_first_admission(admission, monkeypatch)
    found_no_record = asyncio.Event()
    ledger_get = admission._ledger.get

    async def observed_get(run_id):
        record = await ledger_get(run_id)
        if record is None:
            found_no_record.set()
        return record

    monkeypatch.setattr(admission._ledger, "get", observed_get)
    request = run_request()

    first = asyncio.create_task(client.submit(request))
    await asyncio.wait_for(held.wait(), timeout=10)
    second = asyncio.create_task(client.submit(request))
    await asyncio.wait_for(found_no_record.wait(), timeout=10)
    release.set()
    first_reply, second_reply = await asyncio.gather(first, second)

    assert (first_reply.run_id, first_reply.duplicate) == (second_reply.run_id, False)
    assert second_reply.duplicate is True
    assert len(await client.work_items(first_reply.run_id)) == 1
    assert await client.event_count("acme", first_reply.run_id) == 1


async def test_stalled_first_admission_is_taken_over_without_a_second_work_item(
    admission, client, monkeypatch
):
    monkeypatch.setattr(service_module, "CLAIM_SETTLE_S", 0.2)
    held, release = hold_first_admission(admission, monkeypatch)
    request = run_request()

    first = asyncio.create_task(client.submit(request))
    await asyncio.wait_for(held.wait(), timeout=10)
    second_reply = await client.submit(request)
    release.set()
    first_reply = await first

    assert (second_reply.status, second_reply.duplicate) == ("queued", True)
    assert (first_reply.status, first_reply.run_id) == ("queued", second_reply.run_id)
    # The stalled admission publishes too; Nats-Msg-Id lets JetStream drop it.
    assert len(await client.work_items(first_reply.run_id)) == 1
    record = await RunLedger(client.buckets.runs).get(first_reply.run_id)
    assert record.status == "queued"


async def test_requested_limits_above_the_spec_are_rejected_with_the_numbers(admission, client):
    limits = {"timeout_s": 120, "memory_bytes": 128 * MiB, "cpus": 0.25}

    reply = await client.submit(run_request(limits=limits))

    assert (reply.status, reply.reason) == ("rejected", "limit_exceeds_spec")
    assert "timeout_s 120.0 > 60.0" in reply.message
    assert f"memory_bytes {128 * MiB} > {64 * MiB}" in reply.message
    assert "cpus" not in reply.message


async def test_inputs_over_the_tool_input_bytes_are_rejected(admission, client):
    data = base64.b64encode(b"x" * 4097).decode()

    reply = await client.submit(run_request(inputs=[{"name": "big.bin", "data": data}]))

    assert (reply.status, reply.reason) == ("rejected", "inputs_too_large")
    assert "4097 bytes" in reply.message


def deep_arguments_request(depth: int) -> bytes:
    head = json.dumps(run_request())[:-1].encode()
    return head + b', "arguments": {"text": "a", "deep": ' + b"[" * depth + b"]" * depth + b"}}"


HOSTILE_PAYLOADS = {
    "not_json": (b"\x00\xffnot json at all", "error", "malformed_request", "malformed"),
    "wrong_types": (
        json.dumps(run_request(tool=42)).encode(),
        "error",
        "malformed_request",
        "$.tool",
    ),
    "unknown_field": (
        json.dumps(run_request(priority="urgent")).encode(),
        "error",
        "malformed_request",
        "priority",
    ),
    "arguments_not_an_object": (
        json.dumps(run_request(arguments=[1, 2])).encode(),
        "error",
        "malformed_request",
        "$.arguments",
    ),
    "ten_thousand_deep": (
        deep_arguments_request(10_000),
        "rejected",
        "arguments_too_deep",
        "32",
    ),
    "forty_deep": (deep_arguments_request(40), "rejected", "arguments_too_deep", "32"),
    "300_kib_arguments": (
        json.dumps(run_request(arguments={"text": "x" * 300 * 1024})).encode(),
        "rejected",
        "arguments_too_large",
        "262144",
    ),
    "7_mib_request": (
        json.dumps(run_request(arguments={"text": "x" * 7 * MiB})).encode(),
        "rejected",
        "request_too_large",
        "bytes",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_PAYLOADS))
async def test_hostile_payload_is_answered_and_the_service_keeps_serving(admission, client, case):
    payload, status, reason, mentioned = HOSTILE_PAYLOADS[case]

    reply = await client.submit(payload)
    following = await client.submit(run_request())

    assert (reply.status, reply.reason) == (status, reason)
    assert mentioned in reply.message
    assert following.status == "queued"


async def test_ten_mib_request_is_refused_by_nats_and_the_service_keeps_serving(admission, client):
    payload = json.dumps(run_request(arguments={"text": "x" * 10 * MiB})).encode()

    with pytest.raises(nats.errors.MaxPayloadError):
        await client.submit(payload)

    assert (await client.submit(run_request())).status == "queued"


async def test_request_without_reply_subject_is_dropped_and_logged(admission, client, caplog):
    request = run_request()

    await client.nc.publish(subjects.SUBMIT_SUBJECT, json.dumps(request).encode())
    following = await client.submit(run_request())

    assert following.status == "queued"
    assert "request_dropped reason=no_reply_subject" in caplog.text
    claim_key = request_key("acme", request["request_id"])
    with pytest.raises(NotFoundError):
        await client.buckets.requests.get(claim_key)


async def test_unexpected_failure_is_answered_as_internal_error(
    admission, client, caplog, monkeypatch
):
    async def broken_admit(request):
        raise RuntimeError("simulated defect")

    monkeypatch.setattr(admission, "_admit", broken_admit)
    reply = await client.submit(run_request())
    monkeypatch.undo()
    following = await client.submit(run_request())

    assert (reply.status, reply.reason) == ("error", "internal_error")
    assert "simulated defect" not in reply.message
    assert "Traceback" in caplog.text
    assert following.status == "queued"


async def test_client_traceparent_is_the_trace_of_reply_work_item_ledger_and_event(
    admission, client
):
    trace_id, client_span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    headers = {"traceparent": f"00-{trace_id}-{client_span_id}-01"}

    reply = await client.submit(run_request(), headers=headers)

    assert reply.trace_id == trace_id
    event_msg, event = await client.queued_event("acme", reply.run_id)
    ((work_msg, _),) = await client.work_items(reply.run_id)
    for carried in (work_msg.headers["traceparent"], event_msg.headers["traceparent"]):
        _, carried_trace_id, parent_span_id, _ = carried.split("-")
        assert carried_trace_id == trace_id
        # The parent is admission's own span, a child of the client's.
        assert parent_span_id != client_span_id
    assert event.trace_id == trace_id
    record = await RunLedger(client.buckets.runs).get(reply.run_id)
    assert record.trace_id == trace_id


async def test_request_without_traceparent_starts_a_new_trace(admission, client):
    first = await client.submit(run_request())
    second = await client.submit(run_request())

    assert re.fullmatch(r"[0-9a-f]{32}", first.trace_id)
    assert first.trace_id != second.trace_id
    ((work_msg, _),) = await client.work_items(first.run_id)
    assert work_msg.headers["traceparent"].split("-")[1] == first.trace_id


async def test_claim_left_by_a_crash_before_publishing_is_admitted_under_its_run_id(
    admission, client
):
    request = run_request()
    claimed_run_id = new_run_id()
    claim = RequestClaim(
        run_id=claimed_run_id,
        digest=request_digest(decode_request(json.dumps(request).encode())),
        claimed_at=time.time() - 60,
    )
    await client.buckets.requests.create(request_key("acme", request["request_id"]), encode(claim))

    reply = await client.submit(request)
    again = await client.submit(request)

    assert (reply.status, reply.run_id, reply.duplicate) == ("queued", claimed_run_id, True)
    assert (again.run_id, again.duplicate) == (claimed_run_id, True)
    assert len(await client.work_items(claimed_run_id)) == 1
    record = await RunLedger(client.buckets.runs).get(claimed_run_id)
    assert record.status == "queued"
    assert await client.event_count("acme", claimed_run_id) == 1


async def test_tool_list_names_every_tool_with_version_and_schema(admission, client):
    reply = await client.nc.request(subjects.TOOLS_SUBJECT, b"", timeout=5)

    tools = {tool.name: tool for tool in decode(reply.data, ToolList).tools}
    assert sorted(tools) == [TOOL, OTHER_TOOL]
    assert (tools[TOOL].version, tools[TOOL].description) == ("1.2.0", "Echoes its text.")
    assert tools[TOOL].arguments_schema["required"] == ["text"]


async def test_requests_are_counted_by_tool_status_and_reason(admission, client):
    def count(tool: str, status: str, reason: str) -> float:
        labels = {"tool": tool, "status": status, "reason": reason}
        return REGISTRY.get_sample_value("admission_requests_total", labels) or 0.0

    unknown_before = count("unknown", "rejected", "unknown_tool")
    queued_before = count(TOOL, "queued", "none")

    await client.submit(run_request(tool="made-up-tool-name"))
    await client.submit(run_request())

    assert count("unknown", "rejected", "unknown_tool") == unknown_before + 1
    assert count("made-up-tool-name", "rejected", "unknown_tool") == 0
    assert count(TOOL, "queued", "none") == queued_before + 1


async def test_unavailable_work_stream_releases_the_claim_so_a_retry_succeeds(tmp_path):
    server = NatsServer(tmp_path)
    server.start()
    settings = Settings(nats_url=server.url, tools_dir=tmp_path / "no-tools")
    service = AdmissionService(settings, make_catalog())
    nc = None
    try:
        await service.start()
        nc = await jetstream.connect(settings, "test-admission-outage")
        js, buckets = await jetstream.declare(nc, settings)
        client = Client(nc, js, buckets)
        await wait_until_served(nc)
        await js.delete_stream(subjects.WORK_STREAM)
        request = run_request()

        failed = await client.submit(request)
        with pytest.raises(NotFoundError):
            await buckets.requests.get(request_key("acme", request["request_id"]))
        await jetstream.declare(nc, settings)
        retried = await client.submit(request)
    finally:
        await service.stop()
        if nc is not None:
            await nc.close()
        server.stop()

    assert (failed.status, failed.reason) == ("error", "queue_unavailable")
    assert subjects.WORK_STREAM in failed.message
    assert (retried.status, retried.duplicate) == ("queued", False)
