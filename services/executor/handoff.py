"""ArtifactHandoff: the ArtifactSink that passes a run's output files to the artifacts
service (bytes through the billy_staging object store, the decision by request/reply).

Once the run has stored artifact_count artifacts, further entries are only counted; finish()
reports them as one too_many rejection and one event instead of one request each. Entries the
archive cap left out are reported by finish() too (not_collected), unless their header
already shows them over a limit: the artifacts service decides those, as for any other.
Once the artifacts service could not be used, further entries are only counted too, and
finish() reports them as one artifacts_unavailable rejection.
"""

from __future__ import annotations

import logging
from typing import IO

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.object_store import ObjectStore

from services.artifacts.validation import MAX_PATH_CHARS
from services.executor.errors import ExecutorError
from services.executor.model import OutputEntry, RunReporter
from shared import subjects, tracing
from shared.logs import bind
from shared.wire import (
    ArtifactIngest,
    ArtifactLimits,
    ArtifactRef,
    ArtifactRejection,
    ArtifactVerdict,
    EffectiveLimits,
    decode,
    encode,
)

logger = logging.getLogger(__name__)

# Storing means reading the staged copy back and writing it again: allow for large files.
INGEST_TIMEOUT_BASE_S = 15.0
INGEST_TIMEOUT_PER_MIB_S = 1.0


class ArtifactHandoff:
    """Offers each output entry to the artifacts service and keeps what it decided."""

    def __init__(
        self,
        nc: NATS,
        staging: ObjectStore,
        *,
        run_id: str,
        tenant: str,
        tool: str,
        limits: EffectiveLimits,
    ) -> None:
        self._nc = nc
        self._staging = staging
        self._run = {"run_id": run_id, "tenant": tenant, "tool": tool}
        self._log = bind(logger, **self._run, trace_id=tracing.current_trace_id())
        self._limits = ArtifactLimits(
            artifact_bytes=limits.artifact_bytes,
            artifacts_total_bytes=limits.artifacts_total_bytes,
            artifact_count=limits.artifact_count,
        )
        self._index = 0
        self._not_collected = 0
        self._first_not_collected: str | None = None
        self._not_offered = 0  # entries after the artifacts service became unavailable
        self._first_not_offered: str | None = None
        # Rejections made here, not by the artifacts service, with their event's data.
        self._left_out: list[tuple[ArtifactRejection, dict]] = []
        self.stored: list[ArtifactRef] = []
        self.rejected: list[ArtifactRejection] = []
        self.unavailable: str | None = None  # why the artifacts service could not be used

    @property
    def stored_bytes(self) -> int:
        return sum(ref.size_bytes for ref in self.stored)

    async def offer(self, entry: OutputEntry, content: IO[bytes] | None) -> None:
        index, self._index = self._index, self._index + 1
        if self.unavailable:
            # Each further entry would be staged and wait a full ingest timeout again.
            self._not_offered += 1
            self._first_not_offered = self._first_not_offered or entry.path[:MAX_PATH_CHARS]
            return
        if len(self.stored) >= self._limits.artifact_count:
            # The run is full: a request per further entry would only flood the artifacts
            # service and the run's events with the same too_many answer.
            self._not_collected += 1
            self._first_not_collected = self._first_not_collected or entry.path
            return
        if len(entry.path) > MAX_PATH_CHARS:
            # A PAX name can be megabytes: too large for a NATS message, refused here.
            self._refuse_long_path(entry)
            return
        staged = None
        if content is not None and self._within_limits(entry):
            staged = f"{self._run['run_id']}/{index}"
            try:
                await self._staging.put(staged, content)
            except Exception as exc:
                self.unavailable = f"staging {entry.path!r} failed: {exc}"
                self.rejected.append(
                    ArtifactRejection(entry.path, "artifacts_unavailable", self.unavailable)
                )
                return
        ingest = ArtifactIngest(
            **self._run,
            path=entry.path,
            kind=entry.kind,
            size_bytes=entry.size_bytes,
            index=index,
            limits=self._limits,
            stored_count=len(self.stored),
            stored_bytes=self.stored_bytes,
            staged=staged,
            link_target=entry.link_target,
        )
        try:
            verdict = await self._request(ingest)
        except ExecutorError as exc:
            # Recorded, not raised: the run still ends with a result (infra_error).
            self.unavailable = str(exc)
            self.rejected.append(ArtifactRejection(entry.path, "artifacts_unavailable", str(exc)))
            await self._discard(staged)
            return
        if verdict.stored and verdict.ref is not None:
            self.stored.append(verdict.ref)
        elif verdict.rejection is not None:
            self.rejected.append(verdict.rejection)
            if verdict.rejection.reason == "artifacts_unavailable":
                self.unavailable = verdict.rejection.message

    async def archive_cut(
        self, entry: OutputEntry | None, cut_at_bytes: int, received_bytes: int
    ) -> None:
        """Note that the output archive was cut at `cut_at_bytes`, inside `entry` if known."""
        if entry is not None and not self._within_limits(entry):
            # Its header is enough to refuse it: too_large, total_too_large or too_many.
            await self.offer(entry, None)
        elif entry is not None:
            message = (
                f"output archive cut at {cut_at_bytes} bytes, after {received_bytes} of this "
                f"file's {entry.size_bytes} bytes"
            )
            data = {"path": entry.path, "kind": entry.kind, "size_bytes": entry.size_bytes}
            self._left_out.append((ArtifactRejection(entry.path, "not_collected", message), data))
        # Nothing after the cut was read, not even whether there was anything: no path.
        message = f"output archive cut at {cut_at_bytes} bytes; further entries not collected"
        data = {"path": "", "cut_at_bytes": cut_at_bytes}
        self._left_out.append((ArtifactRejection("", "not_collected", message), data))

    async def finish(self, reporter: RunReporter) -> None:
        """Report what was left out, in archive order: past artifact_count, then by the cut."""
        if self._not_collected:
            limit = self._limits.artifact_count
            message = (
                f"{self._not_collected} further output files not collected; the limit is {limit}"
            )
            first = self._first_not_collected or ""
            data = {"path": first, "not_collected": self._not_collected, "artifact_count": limit}
            self._left_out.insert(0, (ArtifactRejection(first, "too_many", message), data))
            self._not_collected = 0
        if self._not_offered:
            message = f"{self._not_offered} further output files not offered: {self.unavailable}"
            first = self._first_not_offered or ""
            data = {"path": first, "not_offered": self._not_offered}
            rejection = ArtifactRejection(first, "artifacts_unavailable", message)
            self._left_out.insert(0, (rejection, data))
            self._not_offered = 0
        for rejection, data in self._left_out:
            self.rejected.append(rejection)
            await reporter.event(
                "artifact_rejected", reason=rejection.reason, message=rejection.message, data=data
            )
        self._left_out.clear()

    def _refuse_long_path(self, entry: OutputEntry) -> None:
        path = entry.path[:MAX_PATH_CHARS]
        message = f"path has {len(entry.path)} characters; the limit is {MAX_PATH_CHARS}"
        data = {"path": path, "kind": entry.kind, "size_bytes": entry.size_bytes}
        self._left_out.append((ArtifactRejection(path, "invalid_path", message), data))

    async def _discard(self, staged: str | None) -> None:
        if staged is None:
            return
        try:
            await self._staging.delete(staged)
        except Exception as exc:  # best effort: staged objects expire after an hour anyway
            self._log.warning("staged_discard_failed object=%s error=%s", staged, exc)

    def _within_limits(self, entry: OutputEntry) -> bool:
        # Only an early filter so that refused bytes are not moved; the artifacts
        # service makes (and reports) the decision.
        return (
            entry.kind == "file"
            and entry.size_bytes <= self._limits.artifact_bytes
            and len(self.stored) < self._limits.artifact_count
            and self.stored_bytes + entry.size_bytes <= self._limits.artifacts_total_bytes
        )

    async def _request(self, ingest: ArtifactIngest) -> ArtifactVerdict:
        timeout_s = INGEST_TIMEOUT_BASE_S + INGEST_TIMEOUT_PER_MIB_S * ingest.size_bytes / 2**20
        try:
            reply = await self._nc.request(
                subjects.ARTIFACT_INGEST_SUBJECT,
                encode(ingest),
                timeout=timeout_s,
                headers=tracing.inject(),
            )
            return decode(reply.data, ArtifactVerdict)
        except (NoRespondersError, NatsTimeoutError) as exc:
            raise ExecutorError(
                f"artifacts service did not answer for {ingest.path!r} within {timeout_s:.0f} s"
            ) from exc
        except Exception as exc:
            # Connection closed, payload over max_payload, a reply we cannot read: the run
            # still ends with a result, and the staged object is discarded.
            raise ExecutorError(
                f"artifacts request for {ingest.path!r} failed: {type(exc).__name__}: {exc}"
            ) from exc
