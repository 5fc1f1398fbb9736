"""The Python client of billy-tools: submit runs, follow their events, fetch results and
artifacts. Billy and the `billy-tools` CLI both use it.

    async with BillyToolsClient.connect(settings) as client:
        reply = await client.submit("echo", {"text": "hi"})
        result = await client.result(reply.run_id, timeout_s=60)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.errors import MaxPayloadError, NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import BucketNotFoundError, NotFoundError, ObjectNotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared import subjects, tracing
from shared.errors import BillyToolsError
from shared.ledger import RunLedger
from shared.settings import Settings
from shared.wire import (
    TERMINAL_STATUSES,
    AdmissionReply,
    ArgumentError,
    ArtifactRef,
    InputFile,
    RequestedLimits,
    RunEvent,
    RunRecord,
    RunRequest,
    RunResult,
    ToolList,
    decode,
    encode,
)

logger = logging.getLogger(__name__)
_tracer = tracing.tracer(__name__)

# Attempts per server when first connecting; afterwards the client reconnects forever.
CONNECT_ATTEMPTS = 2
DOWNLOAD_SUFFIX = ".part"
# A run_id is one NATS subject token and one KV key: no '.', '*', '>', spaces or controls.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")


class ClientError(BillyToolsError):
    """Root error of the billy-tools client."""


class NatsUnavailable(ClientError):
    """The NATS server did not accept a connection."""


class AdmissionUnavailable(ClientError):
    """No admission service answered the request."""


class StackNotReady(ClientError):
    """A stream or bucket the client needs does not exist (no service declared it yet)."""


class RunRejected(ClientError):
    """Admission refused the request; `errors` holds each failing argument path."""

    def __init__(self, reply: AdmissionReply) -> None:
        self.reply = reply
        self.reason = reply.reason or "rejected"
        self.errors: list[ArgumentError] = list(reply.errors)
        detail = "; ".join(f"{e.path}: {e.message}" for e in self.errors)
        text = reply.message or detail or self.reason
        super().__init__(f"run rejected ({self.reason}): {text}")


class AdmissionFailed(ClientError):
    """Admission answered with status `error` (its own failure, not the request's)."""

    def __init__(self, reply: AdmissionReply) -> None:
        self.reply = reply
        super().__init__(f"admission failed ({reply.reason or 'error'}): {reply.message or ''}")


class RunNotFound(ClientError):
    """The run ledger has no record of that run_id."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} not found in {subjects.RUNS_BUCKET}")
        self.run_id = run_id


class InvalidRunId(ClientError):
    """A run_id that could not be one: it would widen a subject filter or a ledger key."""

    def __init__(self, run_id: str) -> None:
        super().__init__(
            f"run id {run_id!r} is not valid: 1 to 128 letters, digits, '_' or '-' "
            f"(no '.', '*', '>' or spaces)"
        )
        self.run_id = run_id


class ArtifactWriteError(ClientError):
    """An artifact could not be written where it was meant to go."""


class ResultTimeout(ClientError):
    """The run did not reach a terminal status in time."""

    def __init__(self, run_id: str, timeout_s: float, status: str | None) -> None:
        super().__init__(
            f"run {run_id} not finished within {timeout_s:g} s (last status: {status or 'none'})"
        )
        self.run_id = run_id
        self.status = status


class ArtifactNotFound(ClientError):
    """The run has no stored artifact at that path."""

    def __init__(self, run_id: str, path: str, known: list[str]) -> None:
        super().__init__(
            f"run {run_id} has no artifact {path!r} ({len(known)} stored: "
            f"{', '.join(known[:10]) or 'none'})"
        )
        self.run_id = run_id
        self.path = path


class ArtifactIntegrityError(ClientError):
    """A downloaded artifact differs from its ArtifactRef (size or sha256)."""


class UnsafeArtifactPath(ClientError):
    """An artifact path would land outside the directory it is saved into."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"refusing artifact path {path!r}: {reason}")
        self.path = path


def checked_run_id(run_id: str) -> str:
    """`run_id` itself; raises InvalidRunId when it is not a single NATS token."""
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise InvalidRunId(run_id)
    return run_id


def new_request_id() -> str:
    return str(uuid.uuid4())


def input_files(inputs: Mapping[str, bytes | Path] | None) -> list[InputFile]:
    """InputFiles from name -> bytes or a Path to read."""
    files = []
    for name, value in (inputs or {}).items():
        data = value.read_bytes() if isinstance(value, Path) else bytes(value)
        files.append(InputFile(name=name, data=data))
    return files


def safe_artifact_path(out_dir: Path, artifact_path: str) -> Path:
    """Where to save `artifact_path` under `out_dir`; raises UnsafeArtifactPath when it
    would escape it (absolute, '..', NUL, control characters, symlinks leading out)."""
    if not artifact_path or "\x00" in artifact_path:
        raise UnsafeArtifactPath(artifact_path, "empty or contains NUL")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in artifact_path):
        raise UnsafeArtifactPath(artifact_path, "contains control characters")
    if "\\" in artifact_path:
        raise UnsafeArtifactPath(artifact_path, "contains a backslash")
    relative = PurePosixPath(artifact_path)
    if relative.is_absolute():
        raise UnsafeArtifactPath(artifact_path, "is absolute")
    if any(part in ("..", ".") for part in artifact_path.split("/")):
        raise UnsafeArtifactPath(artifact_path, "has a '.' or '..' component")
    if any(len(part.encode()) > 255 for part in relative.parts):
        raise UnsafeArtifactPath(artifact_path, "has a component over 255 bytes")

    # Resolving follows symlinks already on disk, so a planted link cannot lead out either.
    root = out_dir.resolve()
    target = (root / Path(*relative.parts)).resolve()
    if target == root or not target.is_relative_to(root):
        raise UnsafeArtifactPath(artifact_path, f"resolves outside {root}")
    return target


@dataclass
class SavedArtifacts:
    """What save_artifacts wrote, and what it refused to write (with why)."""

    saved: list[tuple[ArtifactRef, Path]] = field(default_factory=list)
    refused: list[tuple[ArtifactRef, str]] = field(default_factory=list)


class BillyToolsClient:
    """A connection to billy-tools over NATS: submit, events, result, artifacts, tools."""

    def __init__(self, nc: NATS, settings: Settings) -> None:
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream()
        self._settings = settings
        self._runs: KeyValue | None = None
        self._artifacts: ObjectStore | None = None

    @classmethod
    def connect(cls, settings: Settings | None = None, name: str = "billy-tools-client"):
        """Connect; use as `await BillyToolsClient.connect(s)` or `async with ...connect(s)`."""
        return _Connecting(cls, settings or Settings(), name)

    @classmethod
    async def open(cls, settings: Settings, name: str) -> BillyToolsClient:
        """Connect to NATS, failing after CONNECT_ATTEMPTS per server instead of forever."""

        async def on_error(exc: Exception) -> None:
            logger.debug("nats_error client=%s error=%s", name, exc)

        try:
            nc = await nats.connect(
                servers=settings.nats_servers(),
                name=name,
                user=settings.nats_user,
                password=(
                    settings.nats_password.get_secret_value() if settings.nats_password else None
                ),
                connect_timeout=2,
                reconnect_time_wait=0.5,
                max_reconnect_attempts=CONNECT_ATTEMPTS - 1,
                error_cb=on_error,
            )
        except (NoServersError, OSError, TimeoutError, nats.errors.Error) as exc:
            raise NatsUnavailable(
                f"cannot connect to NATS at {settings.nats_url}: {exc or type(exc).__name__}"
            ) from exc
        # Once connected, ride out server restarts instead of giving up after two tries.
        nc.options["max_reconnect_attempts"] = -1
        return cls(nc, settings)

    async def close(self) -> None:
        if self._nc.is_closed:
            return
        try:
            await self._nc.drain()
        except Exception as exc:  # a half-broken connection still has to be closed
            logger.debug("nats_drain_failed error=%s", exc)
            await self._nc.close()

    async def __aenter__(self) -> BillyToolsClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def nc(self) -> NATS:
        return self._nc

    # -- submitting -------------------------------------------------------------------

    async def submit(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
        inputs: Mapping[str, bytes | Path] | None = None,
        tenant: str = "default",
        request_id: str | None = None,
        limits: RequestedLimits | None = None,
        timeout_s: float = 5,
        traceparent: str | None = None,
    ) -> AdmissionReply:
        """Submit a run; the reply holds its run_id. Raises RunRejected, AdmissionUnavailable."""
        request = RunRequest(
            request_id=request_id or new_request_id(),
            tool=tool,
            tenant=tenant,
            arguments=dict(arguments or {}),
            inputs=input_files(inputs),
            limits=limits,
        )
        parent = (
            tracing.extract({subjects.TRACEPARENT_HEADER: traceparent}) if traceparent else None
        )
        with _tracer.start_as_current_span(
            "billy.submit", context=parent, kind=SpanKind.CLIENT
        ) as span:
            _set_submit_attributes(span, request)
            reply = await self._request_admission(request, timeout_s)
            if reply.run_id:
                span.set_attribute("billy.run_id", reply.run_id)
            if reply.status != "queued":
                span.set_status(Status(StatusCode.ERROR, reply.reason or reply.status))
        return _checked(reply)

    async def _request_admission(self, request: RunRequest, timeout_s: float) -> AdmissionReply:
        payload = encode(request)
        headers = tracing.inject({})
        try:
            msg = await self._nc.request(
                subjects.SUBMIT_SUBJECT, payload, timeout=timeout_s, headers=headers
            )
        except NoRespondersError as exc:
            raise AdmissionUnavailable(
                f"no admission service answers on {subjects.SUBMIT_SUBJECT} at "
                f"{self._settings.nats_url}"
            ) from exc
        except NatsTimeoutError as exc:
            raise AdmissionUnavailable(
                f"admission did not answer {subjects.SUBMIT_SUBJECT} within {timeout_s:g} s"
            ) from exc
        except MaxPayloadError as exc:
            raise ClientError(
                f"request of {len(payload)} bytes exceeds the server's max_payload of "
                f"{self._nc.max_payload} bytes"
            ) from exc
        reply = decode(msg.data, AdmissionReply)
        logger.info(
            "run_submitted request_id=%s tool=%s tenant=%s status=%s run_id=%s",
            request.request_id,
            request.tool,
            request.tenant,
            reply.status,
            reply.run_id,
        )
        return reply

    async def run(
        self,
        tool: str,
        arguments: dict[str, Any] | None = None,
        result_timeout_s: float | None = None,
        **submit_options: Any,
    ) -> RunResult:
        """Submit a run and wait for its result (submit_options go to `submit`)."""
        reply = await self.submit(tool, arguments, **submit_options)
        return await self.result(reply.run_id, timeout_s=result_timeout_s)

    async def tools(self, timeout_s: float = 5) -> ToolList:
        """The tools admission knows, from billy.tools.list."""
        try:
            msg = await self._nc.request(subjects.TOOLS_SUBJECT, b"", timeout=timeout_s)
        except NoRespondersError as exc:
            raise AdmissionUnavailable(
                f"no admission service answers on {subjects.TOOLS_SUBJECT} at "
                f"{self._settings.nats_url}"
            ) from exc
        except NatsTimeoutError as exc:
            raise AdmissionUnavailable(
                f"admission did not answer {subjects.TOOLS_SUBJECT} within {timeout_s:g} s"
            ) from exc
        return decode(msg.data, ToolList)

    # -- following --------------------------------------------------------------------

    async def events(
        self, run_id: str | None = None, tenant: str | None = None, follow: bool = True
    ) -> AsyncIterator[RunEvent]:
        """A run's events from its first one, ending after `finished`; without run_id, every
        new event (of a tenant) from now on. follow=False stops once caught up."""
        async with await self.open_events(run_id, tenant, follow) as stream:
            async for event in stream:
                yield event

    async def open_events(
        self, run_id: str | None = None, tenant: str | None = None, follow: bool = True
    ) -> EventStream:
        """Like `events`, but returns once the subscription is live on the server, so that
        nothing published afterwards can be missed."""
        if run_id is not None:
            checked_run_id(run_id)
            subject, deliver = subjects.run_events_filter(run_id), DeliverPolicy.ALL
        else:
            subject, deliver = subjects.tenant_events_filter(tenant), DeliverPolicy.NEW
        try:
            sub = await self._js.subscribe(
                subject,
                stream=subjects.EVENTS_STREAM,
                ordered_consumer=True,
                deliver_policy=deliver,
            )
        except NotFoundError as exc:
            raise StackNotReady(self._missing(f"stream {subjects.EVENTS_STREAM}")) from exc
        return EventStream(sub, run_id, follow)

    async def get_run(self, run_id: str) -> RunRecord | None:
        """The run's ledger record, or None when there is none."""
        checked_run_id(run_id)
        return await RunLedger(await self._runs_bucket()).get(run_id)

    async def result(self, run_id: str, timeout_s: float | None = None) -> RunResult:
        """Wait for the run's terminal status (watching its ledger key) and return its result."""
        checked_run_id(run_id)
        runs = await self._runs_bucket()
        watcher = await runs.watch(run_id)
        last_status: str | None = None
        try:
            async with asyncio.timeout(timeout_s):
                async for entry in watcher:
                    if entry is None or not entry.value:
                        continue
                    record = decode(entry.value, RunRecord)
                    last_status = record.status
                    if record.status in TERMINAL_STATUSES:
                        return record.result or _result_of(record)
        except TimeoutError as exc:
            raise ResultTimeout(run_id, timeout_s or 0, last_status) from exc
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()
        raise ClientError(f"watch on run {run_id} ended before a terminal status")

    # -- artifacts --------------------------------------------------------------------

    async def artifacts(self, run_id: str) -> list[ArtifactRef]:
        """The artifacts stored for a finished run (empty while it runs)."""
        record = await self.get_run(run_id)
        if record is None:
            raise RunNotFound(run_id)
        return list(record.result.artifacts) if record.result else []

    async def fetch_artifact(self, run_id: str, path: str, dest: Path) -> ArtifactRef:
        """Stream one artifact into `dest` (via dest.part, checked against its sha256)."""
        refs = await self.artifacts(run_id)
        ref = next((r for r in refs if r.path == path), None)
        if ref is None:
            raise ArtifactNotFound(run_id, path, [r.path for r in refs])
        store = await self._artifacts_bucket(ref.bucket)

        partial = dest.with_name(dest.name + DOWNLOAD_SUFFIX)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with partial.open("wb") as sink:
                await store.get(ref.object, writeinto=sink)
            _verify_download(partial, ref)
            os.replace(partial, dest)
        except ObjectNotFoundError as exc:
            raise ArtifactNotFound(run_id, path, [r.path for r in refs]) from exc
        except OSError as exc:
            raise ArtifactWriteError(
                f"cannot write artifact {path!r} to {dest}: {exc.strerror or exc}"
            ) from exc
        finally:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
        logger.info("artifact_fetched run_id=%s path=%s bytes=%d", run_id, path, ref.size_bytes)
        return ref

    async def save_artifacts(
        self, run_id: str, out_dir: Path, refs: list[ArtifactRef] | None = None
    ) -> SavedArtifacts:
        """Fetch the run's artifacts under out_dir; a path that would escape it is refused
        (never written), one that cannot be written is skipped; both are reported."""
        report = SavedArtifacts()
        for ref in await self.artifacts(run_id) if refs is None else refs:
            try:
                target = safe_artifact_path(out_dir, ref.path)
                await self.fetch_artifact(run_id, ref.path, target)
            except (UnsafeArtifactPath, ArtifactWriteError) as exc:
                logger.warning(
                    "artifact_refused run_id=%s path=%r reason=%s", run_id, ref.path, exc
                )
                report.refused.append((ref, str(exc)))
                continue
            report.saved.append((ref, target))
        return report

    # -- buckets ----------------------------------------------------------------------

    async def _runs_bucket(self) -> KeyValue:
        if self._runs is None:
            try:
                self._runs = await self._js.key_value(subjects.RUNS_BUCKET)
            except (BucketNotFoundError, NotFoundError) as exc:
                raise StackNotReady(self._missing(f"bucket {subjects.RUNS_BUCKET}")) from exc
        return self._runs

    async def _artifacts_bucket(self, bucket: str) -> ObjectStore:
        if self._artifacts is None or bucket != subjects.ARTIFACTS_BUCKET:
            try:
                store = await self._js.object_store(bucket)
            except (BucketNotFoundError, NotFoundError) as exc:
                raise StackNotReady(self._missing(f"object store {bucket}")) from exc
            if bucket != subjects.ARTIFACTS_BUCKET:
                return store
            self._artifacts = store
        return self._artifacts

    def _missing(self, what: str) -> str:
        return f"{what} not found at {self._settings.nats_url}; is the stack up (billy-tools up)?"


class EventStream:
    """A live ordered consumer on BILLY_EVENTS; iterate it, and close it (or use async with)."""

    def __init__(self, sub: JetStreamContext.PushSubscription, run_id: str | None, follow: bool):
        self._sub = sub
        self._run_id = run_id
        self._follow = follow

    async def __aiter__(self) -> AsyncIterator[RunEvent]:
        if not self._follow and await _nothing_to_deliver(self._sub):
            return
        async for msg in self._sub.messages:
            event = decode(msg.data, RunEvent)
            yield event
            if self._run_id and event.type == "finished":
                return
            if not self._follow and msg.metadata.num_pending == 0:
                return

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _Connecting:
    """What `BillyToolsClient.connect` returns: awaitable, or an async context manager."""

    def __init__(self, cls: type[BillyToolsClient], settings: Settings, name: str) -> None:
        self._open = lambda: cls.open(settings, name)
        self._client: BillyToolsClient | None = None

    def __await__(self) -> Generator[Any, None, BillyToolsClient]:
        return self._open().__await__()

    async def __aenter__(self) -> BillyToolsClient:
        self._client = await self._open()
        return self._client

    async def __aexit__(self, *exc_info: object) -> None:
        if self._client is not None:
            await self._client.close()


def _set_submit_attributes(span: trace.Span, request: RunRequest) -> None:
    span.set_attribute("messaging.system", "nats")
    span.set_attribute("messaging.destination.name", subjects.SUBMIT_SUBJECT)
    span.set_attribute("messaging.operation.type", "send")
    span.set_attribute("messaging.message.id", request.request_id)
    span.set_attribute("billy.tool", request.tool)
    span.set_attribute("billy.tenant", request.tenant)


def _checked(reply: AdmissionReply) -> AdmissionReply:
    if reply.status == "rejected":
        raise RunRejected(reply)
    if reply.status == "error" or not reply.run_id:
        raise AdmissionFailed(reply)
    return reply


async def _nothing_to_deliver(sub) -> bool:
    """True when the consumer has neither delivered nor pending messages."""
    info = await sub.consumer_info()
    return info.num_pending == 0 and (info.delivered.consumer_seq or 0) == 0


def _result_of(record: RunRecord) -> RunResult:
    """A RunResult for a terminal record that carries none (e.g. rejected runs)."""
    return RunResult(
        run_id=record.run_id,
        request_id=record.request_id,
        tenant=record.tenant,
        tool=record.tool,
        status=record.status,
        executor=record.executor,
        trace_id=record.trace_id,
        finished_at=record.updated_at,
    )


def _verify_download(path: Path, ref: ArtifactRef) -> None:
    size_bytes = path.stat().st_size
    if size_bytes != ref.size_bytes:
        raise ArtifactIntegrityError(
            f"artifact {ref.path}: downloaded {size_bytes} bytes, expected {ref.size_bytes}"
        )
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1024 * 1024):
            digest.update(chunk)
    if digest.hexdigest() != ref.sha256:
        raise ArtifactIntegrityError(
            f"artifact {ref.path}: sha256 {digest.hexdigest()} differs from {ref.sha256}"
        )
