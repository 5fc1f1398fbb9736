"""The executor service: pulls WorkItems from the JetStream work queue and runs each one
through a ToolRunner (DockerRunner), at most `executor_concurrency` at a time.

Per run: ledger queued -> running, events from the runner, artifacts handed to the
artifacts service, one terminal RunResult recorded (compare-and-set), `finished` event,
then the ack. A redelivered run that already has a terminal status is only acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiodocker
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry import trace
from pydantic import ValidationError

from services.executor import metrics
from services.executor.handoff import ArtifactHandoff
from services.executor.model import RunContext, RunOutcome, ToolRunner
from services.executor.reporter import EventReporter
from services.executor.result import Verdict, build_result, fit_result, judge
from services.executor.runner import DockerRunner
from shared import jetstream, signing, subjects, tracing
from shared.errors import LedgerError, WireError
from shared.events import EventPublisher, finished_msg_id
from shared.ledger import RunLedger, queued_record, result_without_outcome
from shared.logs import RunLogger, bind
from shared.operator_policy import PolicyViolation, describe, policy_of
from shared.service import answer_pings
from shared.settings import Settings
from shared.toolspec import ToolSpec
from shared.wire import (
    TERMINAL_STATUSES,
    RunResult,
    WorkItem,
    decode,
    to_builtins,
)

logger = logging.getLogger(__name__)
_tracer = tracing.tracer(__name__)

FETCH_TIMEOUT_S = 1.0
# How long past its timeout and grace period a run may go before the executor stops it.
WATCHDOG_MARGIN_S = 60.0


class ExecutorService:
    """One executor replica; replicas share the durable consumer billy-executors."""

    name = "executor"

    def __init__(self, settings: Settings, runner: ToolRunner | None = None) -> None:
        self._settings = settings
        self._runner = runner
        self._docker: aiodocker.Docker | None = None
        self._nc: NATS | None = None
        self._slots = asyncio.Semaphore(settings.executor_concurrency)
        self._runs: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._docker_up: bool | None = None

    @property
    def executor(self) -> str:
        return self._settings.executor_name

    async def start(self) -> None:
        if self._runner is None:
            self._docker = aiodocker.Docker(url=self._settings.docker_host)
            self._runner = DockerRunner(
                self._docker, self._settings.registry, self._settings.keeper_image
            )
        # Admission enforces the operator policy; the executor checks again so that a
        # work item published by anything else cannot widen what a container gets.
        self._policy = policy_of(self._settings)
        if self._settings.work_signing_key is None:
            logger.warning(
                "work_items_unsigned executor=%s: anything that can publish to %s can run "
                "containers here; set BILLY_WORK_SIGNING_KEY on admission and executors",
                self.executor,
                subjects.WORK_SUBJECT,
            )
        self._nc = await jetstream.connect(self._settings, f"billy-executor-{self.executor}")
        js, buckets = await jetstream.declare(self._nc, self._settings)
        self._ledger = RunLedger(buckets.runs)
        self._staging = buckets.staging
        self._events = EventPublisher(js, self.executor)
        self._sub = await js.pull_subscribe_bind(
            subjects.EXECUTOR_CONSUMER, stream=subjects.WORK_STREAM
        )
        await answer_pings(self._nc, self.name, self.executor)
        await self._remove_leftovers()
        metrics.CAPACITY.set(self._settings.executor_concurrency)
        self._loop_task = asyncio.create_task(self._fetch_loop(), name="executor-fetch")

    async def stop(self) -> None:
        """Stop fetching; give runs in progress executor_drain_s to finish, then cancel
        them (DockerRunner removes their containers and volume) and close."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self._runs:
            drain_s = self._settings.executor_drain_s
            logger.info(
                "executor_draining runs=%d drain_s=%g executor=%s",
                len(self._runs),
                drain_s,
                self.executor,
            )
            _, pending = await asyncio.wait(self._runs, timeout=drain_s)
            # Cancelled runs are not acked: JetStream redelivers them to another replica.
            for task in pending:
                task.cancel()
            if pending:
                logger.warning("executor_runs_cancelled runs=%d", len(pending))
                # Removing a container and its volume takes about a second; `down` sends
                # SIGKILL 10 s after SIGTERM, so cleanup gets what is left of that.
                await asyncio.wait(pending, timeout=4.0)
        if self._nc is not None:
            # Every message taken has been acked or left for redelivery: nothing to drain,
            # and draining a pull subscription waits out its timeout.
            await self._nc.close()
        if self._docker is not None:
            await self._docker.close()

    async def _remove_leftovers(self) -> None:
        remove = getattr(self._runner, "remove_leftovers", None)
        if remove is None or not await self._docker_ready():
            return
        removed = await remove(self.executor)
        if removed:
            logger.warning("leftovers_removed count=%d executor=%s", removed, self.executor)

    # Fetching

    async def _fetch_loop(self) -> None:
        while True:
            try:
                await self._fetch_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS restarts and the like: keep serving
                logger.warning("fetch_failed error=%r executor=%s", exc, self.executor)
                await asyncio.sleep(self._settings.docker_retry_interval_s)

    async def _fetch_once(self) -> None:
        if not await self._docker_ready():
            # Runs wait in the queue rather than fail while Docker is away.
            await asyncio.sleep(self._settings.docker_retry_interval_s)
            return
        await self._slots.acquire()
        try:
            # Runs in progress hold the other slots; ask for as many runs as are free.
            batch = self._settings.executor_concurrency - len(self._runs)
            # nats-py's own timeout should end the fetch; the outer bound makes sure.
            async with asyncio.timeout(FETCH_TIMEOUT_S + 10):
                msgs = await self._sub.fetch(max(1, batch), timeout=FETCH_TIMEOUT_S)
        except (NatsTimeoutError, TimeoutError):
            # No work within the fetch timeout (nats-py raises either kind).
            self._slots.release()
            return
        except BaseException:
            self._slots.release()
            raise
        # One slot is held already; take one more for each further message.
        for index, msg in enumerate(msgs):
            if index:
                await self._slots.acquire()
            self._spawn(msg)

    def _spawn(self, msg: Msg) -> None:
        task = asyncio.create_task(self._handle(msg))
        self._runs.add(task)
        metrics.RUNNING_CONTAINERS.set(len(self._runs))

        def done(finished: asyncio.Task) -> None:
            self._runs.discard(finished)
            self._slots.release()
            metrics.RUNNING_CONTAINERS.set(len(self._runs))
            if not finished.cancelled() and finished.exception() is not None:
                # Even recording the failure failed: the item is redelivered after ack_wait.
                run_id = (msg.headers or {}).get(subjects.RUN_ID_HEADER)
                logger.error(
                    "run_task_failed run_id=%s executor=%s error=%r",
                    run_id,
                    self.executor,
                    finished.exception(),
                )

        task.add_done_callback(done)

    async def _docker_ready(self) -> bool:
        ping = getattr(self._runner, "ping", None)
        up = True if ping is None else await ping()
        if up != self._docker_up:
            log = logger.info if up else logger.warning
            log("docker_%s executor=%s", "up" if up else "unavailable", self.executor)
            self._docker_up = up
            metrics.DOCKER_UP.set(1 if up else 0)
        return up

    # One run

    async def _handle(self, msg: Msg) -> None:
        if not self._signed(msg):
            # Not from admission: neither run it nor let it write to the ledger.
            run_id = (msg.headers or {}).get(subjects.RUN_ID_HEADER)
            logger.error("work_item_unsigned run_id=%s executor=%s", run_id, self.executor)
            metrics.UNSIGNED_WORK_ITEMS.inc()
            await msg.term()
            return
        try:
            item = decode(msg.data, WorkItem)
        except WireError as exc:
            await self._refuse_malformed(msg, exc)
            return
        log = bind(
            logger,
            run_id=item.run_id,
            tool=item.tool,
            tenant=item.tenant,
            trace_id=tracing.trace_id_of(msg.headers),
        )
        parent = tracing.extract(msg.headers)
        _record_queue_span(item, parent)
        with _tracer.start_as_current_span(
            "billy.run",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.operation": "process",
                "billy.run_id": item.run_id,
                "billy.tool": item.tool,
                "billy.tenant": item.tenant,
            },
        ):
            try:
                await self._execute(msg, item, log)
            except asyncio.CancelledError:
                # Hand the run back now rather than after the ack wait.
                log.warning("run_interrupted; handed back for redelivery")
                with contextlib.suppress(Exception):
                    await asyncio.shield(msg.nak())
                raise
            except Exception as exc:
                log.exception("run_executor_error")
                verdict = Verdict("infra_error", "executor_error", f"executor failed: {exc!r}")
                await self._finish_without_outcome(msg, item, verdict, log)

    async def _execute(self, msg: Msg, item: WorkItem, log: RunLogger) -> None:
        """One delivery of a run: claim it, then run it and record its result."""
        started = time.time()
        attempt = msg.metadata.num_delivered or 1
        if not await self._claim_run(msg, item, attempt, log):
            return
        # From here to the ack, JetStream hears that the run is being worked on.
        async with _in_progress(msg, self._settings.executor_progress_interval_s):
            await self._run_claimed(msg, item, attempt, started, log)

    async def _run_claimed(
        self, msg: Msg, item: WorkItem, attempt: int, started: float, log: RunLogger
    ) -> None:
        """Check the work item, run the tool, record its result."""
        queued_s = max(0.0, started - item.queued_at)
        metrics.QUEUE_WAIT.observe(queued_s)
        reporter = self._reporter(item, log)
        await reporter.event(
            "dequeued",
            duration_ms=round(queued_s * 1000, 3),
            data={"attempt": attempt, "executor": self.executor},
        )

        spec = await self._checked_spec(msg, item, log)
        if spec is None:
            return

        handoff = ArtifactHandoff(
            self._nc,
            self._staging,
            run_id=item.run_id,
            tenant=item.tenant,
            tool=item.tool,
            limits=item.limits,
        )
        outcome = await self._watched_run(item, spec, reporter, handoff, log)

        if (
            _docker_vanished_before_start(outcome)
            and attempt < self._settings.executor_max_deliveries
        ):
            # Nothing ran: put the run back so that it waits for Docker instead of failing.
            log.warning("run_requeued reason=%s", outcome.reason)
            await msg.nak(delay=self._settings.docker_retry_interval_s)
            return

        verdict = judge(outcome, spec, handoff)
        if outcome.timings.total_ms is None:
            outcome.timings.total_ms = round((time.time() - started) * 1000, 3)
        outcome.timings.queued_ms = round(queued_s * 1000, 3)
        result = build_result(
            item,
            outcome,
            verdict,
            handoff,
            executor=self.executor,
            trace_id=tracing.current_trace_id(),
            finished_at=time.time(),
        )
        await self._record(msg, result, reporter, log, time.time() - started)

    async def _watched_run(
        self,
        item: WorkItem,
        spec: ToolSpec,
        reporter: EventReporter,
        handoff: ArtifactHandoff,
        log: RunLogger,
    ) -> RunOutcome:
        """The runner's outcome, or infra_error if the run outlives every limit it has.

        The runner enforces the tool's timeout itself; this bounds what it cannot: a
        Docker call that never answers would otherwise hold an executor slot for good.
        """
        deadline_s = item.limits.timeout_s + item.limits.stop_grace_s + WATCHDOG_MARGIN_S
        watchdog = asyncio.timeout(deadline_s)
        try:
            async with watchdog:
                return await self._runner.run(self._context(item, spec), reporter, handoff)
        except TimeoutError:
            if not watchdog.expired():
                raise
        log.error("run_watchdog_expired deadline_s=%.0f", deadline_s)
        return RunOutcome(
            status="infra_error",
            reason="run_watchdog",
            message=f"run still in progress after {deadline_s:.0f} s "
            f"(timeout {item.limits.timeout_s:g} s); stopped by the executor",
        )

    async def _claim_run(self, msg: Msg, item: WorkItem, attempt: int, log: RunLogger) -> bool:
        """Move the run to running; False when this delivery has nothing (more) to run."""
        limit = self._settings.executor_max_deliveries
        if attempt > limit:
            message = f"delivered {attempt} times; the limit is {limit}"
            verdict = Verdict("infra_error", "redelivery_limit", message)
            await self._finish_without_outcome(msg, item, verdict, log)
            return False

        record = await self._ledger.get(item.run_id)
        if record is not None and record.status in TERMINAL_STATUSES:
            log.info("run_already_finished status=%s; acking redelivery", record.status)
            if record.result is None or await self._publish_finished(
                record.result, self._reporter(item, log), log
            ):
                await msg.ack_sync()
            return False
        if record is None:
            # Admission records a run before queueing it; never drop a run over a lost record.
            log.warning("run_record_missing; recreating it from the work item")
            await self._ledger.create(queued_record(item, tracing.current_trace_id()))

        try:
            await self._ledger.mark_running(item.run_id, self.executor)
        except LedgerError as exc:
            log.info("run_not_runnable reason=%s; acking", exc)
            await msg.ack_sync()
            return False
        return True

    async def _checked_spec(self, msg: Msg, item: WorkItem, log: RunLogger) -> ToolSpec | None:
        """The work item's ToolSpec, or None after refusing the run (invalid, or beyond policy)."""
        try:
            spec = ToolSpec.model_validate(item.spec)
        except ValidationError as exc:
            verdict = Verdict("rejected", "invalid_spec", f"ToolSpec in work item: {exc}")
            await self._finish_without_outcome(msg, item, verdict, log)
            return None

        violations = self._policy.check_toolspec(spec) + limits_beyond_spec(item, spec)
        if violations:
            message = f"work item refused by the executor: {describe(violations)}"
            verdict = Verdict("rejected", "policy_violation", message)
            await self._finish_without_outcome(msg, item, verdict, log)
            return None
        return spec

    def _context(self, item: WorkItem, spec: ToolSpec) -> RunContext:
        return RunContext(
            run_id=item.run_id,
            tenant=item.tenant,
            tool=item.tool,
            executor=self.executor,
            spec=spec,
            arguments=item.arguments,
            inputs=item.inputs,
            limits=item.limits,
            trace_env=tracing.container_env(),
        )

    def _reporter(self, item: WorkItem, log: RunLogger) -> EventReporter:
        return EventReporter(
            self._events,
            run_id=item.run_id,
            tenant=item.tenant,
            tool=item.tool,
            trace_id=tracing.current_trace_id(),
            log=log,
        )

    async def _finish_without_outcome(
        self, msg: Msg, item: WorkItem, verdict: Verdict, log: RunLogger
    ) -> None:
        result = result_without_outcome(
            item,
            verdict.status,
            verdict.reason,
            verdict.message,
            tracing.current_trace_id(),
            executor=self.executor,
        )
        await self._record(msg, result, self._reporter(item, log), log, 0.0)

    async def _record(
        self, msg: Msg, result: RunResult, reporter: EventReporter, log: RunLogger, elapsed_s
    ) -> None:
        """Ledger first, then the finished event, then the ack.

        A crash or a failed publish in between leaves the work item unacked; its
        redelivery finds the terminal status and publishes `finished` again from the ledger
        (the fixed message id keeps one copy in the stream).
        """
        result = fit_result(result, self._result_budget_bytes())
        if await self._ledger.finish(result):
            metrics.RUNS.labels(result.status).inc()
            metrics.RUN_DURATION.observe(elapsed_s)
            final = result
        else:
            record = await self._ledger.get(result.run_id)
            final = record.result if record is not None else None
        if final is not None and not await self._publish_finished(final, reporter, log):
            return
        status = final.status if final is not None else "unknown"
        log.info("run_recorded status=%s reason=%s", status, final.reason if final else "-")
        await msg.ack_sync()

    async def _publish_finished(
        self, result: RunResult, reporter: EventReporter, log: RunLogger
    ) -> bool:
        try:
            await reporter.event(
                "finished",
                duration_ms=result.timings.total_ms,
                reason=result.reason,
                message=result.message,
                status=result.status,
                data={"result": to_builtins(result)},
                msg_id=finished_msg_id(result.run_id),
            )
        except Exception:
            log.exception("finished_event_failed; work item left for redelivery")
            return False
        return True

    def _result_budget_bytes(self) -> int:
        # The result travels whole in the ledger record and in the finished event.
        return max(64 * 1024, self._nc.max_payload - 64 * 1024)

    def _signed(self, msg: Msg) -> bool:
        key = self._settings.work_signing_key
        if key is None:
            return True
        signature = (msg.headers or {}).get(signing.SIGNATURE_HEADER)
        return signing.verify(key.get_secret_value(), msg.data, signature)

    async def _refuse_malformed(self, msg: Msg, error: WireError) -> None:
        run_id = (msg.headers or {}).get(subjects.RUN_ID_HEADER)
        logger.error("work_item_malformed run_id=%s error=%s", run_id, error)
        await msg.term()


def limits_beyond_spec(item: WorkItem, spec: ToolSpec) -> list[PolicyViolation]:
    """Limits of a work item above its own ToolSpec's (admission only ever lowers them)."""
    spec_limits = spec.limits
    allowed = {
        "cpus": spec_limits.cpus,
        "memory_bytes": spec_limits.memory_bytes,
        "pids": spec_limits.pids,
        "timeout_s": spec_limits.timeout.max_s,
        "stdout_bytes": spec_limits.stdout_bytes,
        "stderr_bytes": spec_limits.stderr_bytes,
        "artifact_bytes": spec_limits.artifact_bytes,
        "artifacts_total_bytes": spec_limits.artifacts_total_bytes,
        "artifact_count": spec_limits.artifact_count,
        "workspace_bytes": spec_limits.workspace_bytes,
        "tmp_bytes": spec.filesystem.tmp_bytes,
    }
    return [
        PolicyViolation(item.tool, f"limits.{name}", getattr(item.limits, name), cap)
        for name, cap in allowed.items()
        if getattr(item.limits, name) > cap
    ]


def _docker_vanished_before_start(outcome: RunOutcome) -> bool:
    return (
        outcome.status == "infra_error"
        and outcome.reason == "docker_unavailable"
        and outcome.timings.start_ms is None
    )


def _record_queue_span(item: WorkItem, parent) -> None:
    """A span for the time the run waited in the queue, drawn after the fact."""
    span = _tracer.start_span(
        "billy.queue",
        context=parent,
        start_time=int(item.queued_at * 1e9),
        attributes={"billy.run_id": item.run_id, "messaging.system": "nats"},
    )
    span.end()


@contextlib.asynccontextmanager
async def _in_progress(msg: Msg, interval_s: float):
    """Tell JetStream every `interval_s` that the run is still being worked on."""

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
