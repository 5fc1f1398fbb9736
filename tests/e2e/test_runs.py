"""Runs through the whole path: client -> admission -> JetStream -> executor -> Docker ->
artifacts -> events and result."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import pytest

from services.admission.limits import effective_limits
from shared import signing, subjects
from shared.client import RunRejected
from shared.wire import AdmissionReply, RequestedLimits, WorkItem, decode, encode
from tests.conftest import collect_events, wait_for

DOCUMENT = Path("/usr/share/common-licenses/GPL-3")
RESULT_TIMEOUT_S = 90


async def test_doc_stats_on_a_real_document_succeeds_with_artifacts(client, tmp_path):
    reply = await client.submit(
        "doc-stats", {"document": "GPL-3", "top": 5}, inputs={"GPL-3": DOCUMENT}
    )
    result = await client.result(reply.run_id, timeout_s=RESULT_TIMEOUT_S)

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    assert result.exit_code == 0
    assert result.output["words"] > 5000
    assert result.output["sha256"] == hashlib.sha256(DOCUMENT.read_bytes()).hexdigest()
    paths = {ref.path for ref in result.artifacts}
    assert {"word-frequencies.csv", "summary.md"} <= paths
    ref = next(r for r in result.artifacts if r.path == "word-frequencies.csv")
    fetched = await client.fetch_artifact(reply.run_id, ref.path, tmp_path / "freq.csv")
    data = (tmp_path / "freq.csv").read_bytes()
    assert hashlib.sha256(data).hexdigest() == ref.sha256 == fetched.sha256
    assert len(data) == ref.size_bytes


async def test_events_of_a_run_arrive_in_order_and_end_with_one_finished(client):
    reply = await client.submit("echo", {"message": "hello"})
    events = await collect_events(client, reply.run_id)

    types = [e.type for e in events]
    expected = [
        "queued",
        "dequeued",
        "image_ensured",
        "container_created",
        "container_started",
        "exited",
        "container_removed",
        "finished",
    ]
    assert [t for t in types if t in expected] == expected
    assert types.count("finished") == 1
    assert events[-1].status == "succeeded"
    assert all(e.run_id == reply.run_id for e in events)
    durations = {e.type: e.duration_ms for e in events}
    assert durations["container_started"] is not None
    assert durations["exited"] is not None


async def test_invalid_arguments_are_rejected_naming_the_failing_path(client):
    with pytest.raises(RunRejected) as rejected:
        await client.submit("doc-stats", {"document": "GPL-3", "top": "many"})
    reply = rejected.value.reply
    assert reply.reason == "invalid_arguments"
    assert "/top" in [error.path for error in reply.errors]


async def test_unknown_tool_is_rejected(client):
    with pytest.raises(RunRejected) as rejected:
        await client.submit("no-such-tool", {})
    assert rejected.value.reply.reason == "unknown_tool"


async def test_same_request_id_twice_gives_the_same_run(client):
    request_id = f"dup-{uuid.uuid4().hex}"
    first = await client.submit("echo", {"message": "once"}, request_id=request_id)
    second = await client.submit("echo", {"message": "once"}, request_id=request_id)

    assert second.run_id == first.run_id
    assert second.duplicate
    result = await client.result(first.run_id, timeout_s=RESULT_TIMEOUT_S)
    assert result.status == "succeeded"
    events = await collect_events(client, first.run_id)
    assert [e.type for e in events].count("dequeued") == 1


async def test_run_past_its_timeout_is_killed_and_keeps_earlier_output(client):
    reply = await client.submit(
        "shell",
        {"script": "echo before-timeout; sleep 30"},
        limits=RequestedLimits(timeout_s=1.5),
    )
    result = await client.result(reply.run_id, timeout_s=RESULT_TIMEOUT_S)

    assert result.status == "timed_out"
    assert "before-timeout" in result.stdout
    events = await collect_events(client, reply.run_id)
    assert "timeout_kill" in [e.type for e in events]


async def test_run_exceeding_memory_limit_reports_oom_killed(client):
    reply = await client.submit("python", {"code": "x = bytearray(512 * 1024 * 1024)"})
    result = await client.result(reply.run_id, timeout_s=RESULT_TIMEOUT_S)

    assert result.status == "oom_killed", (result.reason, result.message, result.stderr)
    events = await collect_events(client, reply.run_id)
    assert "oom_kill" in [e.type for e in events]


async def test_non_zero_exit_fails_with_the_exit_code(client):
    reply = await client.submit("shell", {"script": "echo oops >&2; exit 3"})
    result = await client.result(reply.run_id, timeout_s=RESULT_TIMEOUT_S)

    assert result.status == "failed"
    assert result.exit_code == 3
    assert result.reason == "exit_code"
    assert "oops" in result.stderr


async def test_stdout_over_its_cap_is_truncated_with_a_limit_hit_event(client):
    # The shell tool caps stdout at 64 KiB; write 5 MiB.
    reply = await client.submit("shell", {"script": "yes 0123456789 | head -c 5242880"})
    result = await client.result(reply.run_id, timeout_s=RESULT_TIMEOUT_S)

    assert result.status == "succeeded"
    assert result.stdout_truncated
    assert result.stdout_bytes == 5 * 1024 * 1024
    assert len(result.stdout.encode()) < 70 * 1024
    assert "truncated" in result.stdout
    events = await collect_events(client, reply.run_id)
    limit_hits = [e for e in events if e.type == "limit_hit"]
    assert limit_hits
    assert limit_hits[0].data["stream"] == "stdout"


async def test_artifact_over_its_size_limit_is_rejected_and_others_are_stored(client):
    # The shell tool allows 64 KiB per artifact.
    script = (
        'head -c 70000 /dev/zero > "$BILLY_OUTPUT_DIR/big.bin"; '
        'echo small > "$BILLY_OUTPUT_DIR/small.txt"'
    )
    reply = await client.submit("shell", {"script": script})
    result = await client.result(reply.run_id, timeout_s=RESULT_TIMEOUT_S)

    assert [ref.path for ref in result.artifacts] == ["small.txt"]
    rejected = {r.path: r.reason for r in result.rejected_artifacts}
    assert rejected == {"big.bin": "too_large"}
    events = await collect_events(client, reply.run_id)
    assert any(e.type == "artifact_rejected" and e.data["path"] == "big.bin" for e in events)


async def test_one_trace_id_from_the_request_to_the_container_and_the_last_event(client):
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    reply = await client.submit("shell", {"script": 'echo "$TRACEPARENT"'}, traceparent=traceparent)
    result = await client.result(reply.run_id, timeout_s=RESULT_TIMEOUT_S)

    assert reply.trace_id == trace_id
    assert result.status == "succeeded"
    container_traceparent = result.stdout.strip()
    assert container_traceparent.split("-")[1] == trace_id
    assert result.trace_id == trace_id
    events = await collect_events(client, reply.run_id)
    assert {e.trace_id for e in events} == {trace_id}
    assert events[-1].type == "finished"


async def test_malformed_request_is_answered_and_admission_keeps_serving(client):
    for payload in (b"", b"{", b'{"tool": 5}', b"\xff\xfe", b'{"request_id": "x"}'):
        msg = await client.nc.request(subjects.SUBMIT_SUBJECT, payload, timeout=5)
        reply = decode(msg.data, AdmissionReply)
        assert reply.status == "error"
        assert reply.reason == "malformed_request"
    result = await client.run("echo", {"message": "still serving"}, result_timeout_s=60)
    assert result.status == "succeeded"
    assert "still serving" in result.stdout


async def test_signed_work_item_beyond_its_spec_is_refused_by_the_executor(
    client, catalog, settings
):
    spec = catalog.get("echo")
    limits = effective_limits(spec, None)
    limits.memory_bytes = spec.limits.memory_bytes * 16
    run_id = uuid.uuid4().hex
    item = WorkItem(
        run_id=run_id,
        request_id=f"forged-{run_id}",
        tenant="default",
        tool="echo",
        spec=spec.model_dump(mode="json"),
        arguments={"message": "forged"},
        limits=limits,
        queued_at=time.time(),
    )
    # Signed like admission would, so that only the executor's own checks stand in the way.
    payload = encode(item)
    key = settings.work_signing_key.get_secret_value()
    headers = {signing.SIGNATURE_HEADER: signing.sign(key, payload)}
    await client.nc.jetstream().publish(subjects.WORK_SUBJECT, payload, headers=headers)

    result = await client.result(run_id, timeout_s=RESULT_TIMEOUT_S)

    assert result.status == "rejected"
    assert result.reason == "policy_violation"
    assert "limits.memory_bytes" in result.message
    events = await collect_events(client, run_id)
    assert "container_created" not in [e.type for e in events]


async def test_spans_cover_the_whole_path_in_one_trace(client, spans):
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    script = 'echo data > "$BILLY_OUTPUT_DIR/out.txt"'
    reply = await client.submit("shell", {"script": script}, traceparent=traceparent)
    result = await client.result(reply.run_id, timeout_s=RESULT_TIMEOUT_S)
    assert result.status == "succeeded"

    def names() -> set[str]:
        return {
            span.name
            for span in spans.get_finished_spans()
            if format(span.context.trace_id, "032x") == trace_id
        }

    # The run's own span closes after the result is recorded and the work item acked.
    await wait_for(lambda: "billy.run" in names(), timeout_s=10)
    assert {
        "billy.submit",
        "billy.admission",
        "billy.queue",
        "billy.run",
        "billy.image.ensure",
        "billy.container.create",
        "billy.container.start",
        "billy.container.wait",
        "billy.artifact.store",
    } <= names()


async def test_unsigned_work_item_is_never_run_nor_recorded(client, catalog, stack):
    spec = catalog.get("shell")
    run_id = uuid.uuid4().hex
    item = WorkItem(
        run_id=run_id,
        request_id=f"unsigned-{run_id}",
        tenant="default",
        tool="shell",
        spec={**spec.model_dump(mode="json"), "entrypoint": ["/bin/sh", "-c"]},
        arguments={"script": "echo forged"},
        limits=effective_limits(spec, None),
        queued_at=time.time(),
    )
    js = client.nc.jetstream()
    ack = await js.publish(subjects.WORK_SUBJECT, encode(item))

    # The executor terminates the message: it leaves the work stream without a run.
    async def consumed() -> bool:
        info = await js.stream_info(subjects.WORK_STREAM)
        return info.state.first_seq > ack.seq or info.state.messages == 0

    await wait_for(consumed, timeout_s=30)
    assert await client.get_run(run_id) is None
    events = [e async for e in client.events(run_id, follow=False)]
    assert events == []
