"""The run ledger: one RunRecord per run in the billy_runs bucket.

Status only moves forward (queued -> running -> one terminal status). Updates are
compare-and-set on the entry's revision, so that two executors racing on a redelivered
run cannot both record a terminal status.
"""

from __future__ import annotations

import hashlib
import logging
import time

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from shared.errors import LedgerError
from shared.retry import through_outages
from shared.wire import TERMINAL_STATUSES, RunRecord, RunResult, WorkItem, decode, encode

logger = logging.getLogger(__name__)


def request_key(tenant: str, request_id: str) -> str:
    """KV key of a tenant's request_id (request ids may hold characters keys may not)."""
    return hashlib.sha256(f"{tenant}\0{request_id}".encode()).hexdigest()


def queued_record(item: WorkItem, trace_id: str | None) -> RunRecord:
    """The ledger record of a run that has just been admitted."""
    return RunRecord(
        run_id=item.run_id,
        request_id=item.request_id,
        tenant=item.tenant,
        tool=item.tool,
        status="queued",
        created_at=item.queued_at,
        updated_at=time.time(),
        trace_id=trace_id,
    )


def result_without_outcome(
    item: WorkItem,
    status: str,
    reason: str,
    message: str,
    trace_id: str | None,
    executor: str | None = None,
) -> RunResult:
    """The terminal result of a run that ended before its tool ran."""
    return RunResult(
        run_id=item.run_id,
        request_id=item.request_id,
        tenant=item.tenant,
        tool=item.tool,
        status=status,
        reason=reason,
        message=message,
        executor=executor,
        trace_id=trace_id,
        finished_at=time.time(),
    )


class RunLedger:
    """Reads and advances RunRecords."""

    def __init__(self, runs: KeyValue) -> None:
        self._runs = runs

    async def get(self, run_id: str) -> RunRecord | None:
        record, _ = await self._get(run_id)
        return record

    async def create(self, record: RunRecord) -> None:
        """Record a new run; an existing record with that run_id is left as it is."""
        try:
            await through_outages(
                lambda: self._runs.create(record.run_id, encode(record)),
                f"ledger create {record.run_id}",
            )
        except KeyWrongLastSequenceError:
            logger.debug("ledger_exists run_id=%s", record.run_id)

    async def mark_running(self, run_id: str, executor: str) -> RunRecord:
        """queued -> running, counting the attempt; raises LedgerError once terminal."""
        for _ in range(10):
            record, revision = await self._get(run_id)
            if record is None:
                raise LedgerError(run_id, "no ledger record")
            if record.status in TERMINAL_STATUSES:
                raise LedgerError(run_id, f"already {record.status}")
            record.status = "running"
            record.executor = executor
            record.attempts += 1
            record.updated_at = time.time()
            if await self._update(run_id, record, revision):
                return record
        raise LedgerError(run_id, "ledger kept changing under 10 updates")

    async def finish(self, result: RunResult) -> bool:
        """Record the terminal result; False when another terminal status was there first."""
        for _ in range(10):
            record, revision = await self._get(result.run_id)
            if record is not None and record.status in TERMINAL_STATUSES:
                if record.result == result:
                    # Our own write, retried after its acknowledgement was lost.
                    return True
                logger.warning(
                    "ledger_already_terminal run_id=%s status=%s ignored=%s",
                    result.run_id,
                    record.status,
                    result.status,
                )
                return False
            now = time.time()
            if record is None:
                # Admission always records first; recover anyway rather than lose a result.
                record = RunRecord(
                    run_id=result.run_id,
                    request_id=result.request_id,
                    tenant=result.tenant,
                    tool=result.tool,
                    status=result.status,
                    created_at=now,
                    updated_at=now,
                )
            record.status = result.status
            record.result = result
            record.updated_at = now
            record.trace_id = record.trace_id or result.trace_id
            if await self._update(result.run_id, record, revision):
                return True
        raise LedgerError(result.run_id, "ledger kept changing under 10 updates")

    async def _get(self, run_id: str) -> tuple[RunRecord | None, int]:
        try:
            entry = await through_outages(lambda: self._runs.get(run_id), f"ledger get {run_id}")
        except KeyNotFoundError:
            return None, 0
        if entry.value is None:
            return None, entry.revision or 0
        return decode(entry.value, RunRecord), entry.revision or 0

    async def _update(self, run_id: str, record: RunRecord, revision: int) -> bool:
        value = encode(record)

        async def write() -> None:
            if revision:
                await self._runs.update(run_id, value, last=revision)
            else:
                await self._runs.create(run_id, value)

        try:
            await through_outages(write, f"ledger update {run_id}")
        except KeyWrongLastSequenceError:
            return False
        return True
