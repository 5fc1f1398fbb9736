"""The run ledger against a real nats-server: status only moves forward, once."""

import uuid

import pytest

from shared import jetstream
from shared.ledger import RunLedger
from shared.wire import RunRecord, RunResult


@pytest.fixture(scope="module")
async def ledger(settings):
    nc = await jetstream.connect(settings, "test-ledger")
    _, buckets = await jetstream.declare(nc, settings)
    try:
        yield RunLedger(buckets.runs)
    finally:
        await nc.close()


def result_of(run_id: str, status: str) -> RunResult:
    return RunResult(run_id=run_id, request_id="q", tenant="t", tool="x", status=status)


async def test_terminal_status_is_recorded_once_and_a_retry_of_it_is_accepted(ledger):
    run_id = uuid.uuid4().hex
    await ledger.create(
        RunRecord(
            run_id=run_id,
            request_id="q",
            tenant="t",
            tool="x",
            status="queued",
            created_at=1.0,
            updated_at=1.0,
        )
    )
    await ledger.mark_running(run_id, "executor-a")

    assert await ledger.finish(result_of(run_id, "succeeded"))
    # The same write again (its acknowledgement lost) is not a second terminal status.
    assert await ledger.finish(result_of(run_id, "succeeded"))
    assert not await ledger.finish(result_of(run_id, "failed"))
    record = await ledger.get(run_id)
    assert record.status == "succeeded"
    assert record.attempts == 1
