"""The artifacts service: validates each output file an executor hands over, stores it in
the artifacts object store with its sha256, and emits artifact_stored or artifact_rejected.

Flow: executor stages bytes in billy_staging -> request on billy.artifacts.ingest -> here
-> billy_artifacts/<run_id>/<path> -> reply ArtifactVerdict.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from opentelemetry import trace

from services.artifacts import metrics
from services.artifacts.errors import StagedObjectError
from services.artifacts.store import ArtifactStore
from services.artifacts.validation import rejection_of
from shared import jetstream, subjects, tracing
from shared.errors import WireError
from shared.events import EventPublisher
from shared.logs import bind
from shared.service import answer_pings
from shared.settings import Settings
from shared.wire import (
    ArtifactIngest,
    ArtifactRejection,
    ArtifactVerdict,
    RunEvent,
    decode,
    encode,
)

logger = logging.getLogger(__name__)
_tracer = tracing.tracer(__name__)

# Ingests handled at once by one replica; each spools at most one artifact to disk.
MAX_CONCURRENT_INGESTS = 8
# Paths come from the tool: a log line shows at most this much of one.
LOGGED_PATH_CHARS = 200


class ArtifactsService:
    """Answers billy.artifacts.ingest; replicas share the load through a queue group."""

    name = "artifacts"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._nc: NATS | None = None
        self._store: ArtifactStore | None = None
        self._events: EventPublisher | None = None
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_INGESTS)
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._nc = await jetstream.connect(self._settings, "billy-artifacts")
        js, buckets = await jetstream.declare(self._nc, self._settings)
        self._store = ArtifactStore(buckets.staging, buckets.artifacts)
        self._events = EventPublisher(js, "artifacts")
        await self._nc.subscribe(
            subjects.ARTIFACT_INGEST_SUBJECT, queue=subjects.ARTIFACTS_QUEUE, cb=self._on_ingest
        )
        await answer_pings(self._nc, self.name, self._settings.executor_name)

    async def stop(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)
        if self._nc is not None:
            await self._nc.drain()

    async def _on_ingest(self, msg: Msg) -> None:
        # Each ingest runs in its own task so a large artifact does not hold up the others.
        await self._slots.acquire()
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._slots.release())

    async def _handle(self, msg: Msg) -> None:
        try:
            ingest = decode(msg.data, ArtifactIngest)
        except WireError as exc:
            logger.warning("ingest_malformed error=%s", exc)
            rejection = ArtifactRejection(path="", reason="malformed_ingest", message=str(exc))
            await self._reply(msg, ArtifactVerdict(stored=False, rejection=rejection))
            return
        with _tracer.start_as_current_span(
            "billy.artifact.store",
            context=tracing.extract(msg.headers),
            kind=trace.SpanKind.SERVER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "billy.run_id": ingest.run_id,
                "billy.artifact.path": ingest.path,
            },
        ):
            try:
                verdict = await self._ingest(ingest)
            except Exception as exc:
                # NATS failing under staging get, artifacts put or discard: the executor
                # gets an answer now rather than waiting out its timeout.
                verdict = await self._unavailable(ingest, exc)
        await self._reply(msg, verdict)

    async def _unavailable(self, ingest: ArtifactIngest, exc: Exception) -> ArtifactVerdict:
        _run_log(ingest).error(
            "artifact_ingest_failed path=%r path_chars=%d error=%s: %s",
            ingest.path[:LOGGED_PATH_CHARS],
            len(ingest.path),
            type(exc).__name__,
            exc,
        )
        try:
            await self._store.discard(ingest.staged)
        except Exception as discard_exc:  # staged objects expire after an hour anyway
            logger.warning("staged_discard_failed object=%s error=%s", ingest.staged, discard_exc)
        metrics.ARTIFACTS_REJECTED.labels("artifacts_unavailable").inc()
        message = f"artifacts service failed: {type(exc).__name__}: {exc}"
        rejection = ArtifactRejection(ingest.path, "artifacts_unavailable", message)
        return ArtifactVerdict(stored=False, rejection=rejection)

    async def _ingest(self, ingest: ArtifactIngest) -> ArtifactVerdict:
        assert self._store is not None
        log = _run_log(ingest)
        started = time.perf_counter()

        rejection = rejection_of(ingest)
        if rejection is None:
            try:
                ref = await self._store.promote(
                    ingest.staged, ingest.run_id, ingest.path, ingest.size_bytes
                )
            except StagedObjectError as exc:
                rejection = ArtifactRejection(ingest.path, "not_received", str(exc))
        if rejection is not None:
            await self._store.discard(ingest.staged)
            metrics.ARTIFACTS_REJECTED.labels(rejection.reason).inc()
            log.info(
                "artifact_rejected path=%r path_chars=%d reason=%s",
                ingest.path[:LOGGED_PATH_CHARS],
                len(ingest.path),
                rejection.reason,
            )
            await self._emit(ingest, "artifact_rejected", started, rejection=rejection)
            return ArtifactVerdict(stored=False, rejection=rejection)

        elapsed_s = time.perf_counter() - started
        metrics.ARTIFACTS_STORED.inc()
        metrics.ARTIFACTS_STORED_BYTES.inc(ref.size_bytes)
        metrics.ARTIFACT_STORE_DURATION.observe(elapsed_s)
        log.info(
            "artifact_stored path=%r size_bytes=%d sha256=%s elapsed_ms=%.1f",
            ref.path,
            ref.size_bytes,
            ref.sha256,
            elapsed_s * 1000,
        )
        try:
            await self._emit(ingest, "artifact_stored", started, ref=ref)
        except Exception as exc:
            # The artifact is in the bucket: the run's result must still list it.
            log.error("artifact_stored_not_reported path=%r error=%s", ref.path, exc)
        return ArtifactVerdict(stored=True, ref=ref)

    async def _emit(self, ingest: ArtifactIngest, type_, started: float, ref=None, rejection=None):
        assert self._events is not None
        if ref is not None:
            data = {
                "path": ref.path,
                "size_bytes": ref.size_bytes,
                "sha256": ref.sha256,
                "bucket": ref.bucket,
                "object": ref.object,
            }
        else:
            data = {"path": ingest.path, "kind": ingest.kind, "size_bytes": ingest.size_bytes}
        await self._events.emit(
            RunEvent(
                run_id=ingest.run_id,
                type=type_,
                tenant=ingest.tenant,
                tool=ingest.tool,
                trace_id=tracing.current_trace_id(),
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
                reason=rejection.reason if rejection else None,
                message=rejection.message if rejection else None,
                data=data,
            )
        )

    async def _reply(self, msg: Msg, verdict: ArtifactVerdict) -> None:
        if msg.reply:
            await msg.respond(encode(verdict))


def _run_log(ingest: ArtifactIngest):
    return bind(
        logger,
        run_id=ingest.run_id,
        tool=ingest.tool,
        tenant=ingest.tenant,
        trace_id=tracing.current_trace_id(),
    )
