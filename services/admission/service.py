"""The admission service: validates run requests against their ToolSpec and queues them.

Flow: billy.runs.submit (request/reply) -> decode, check bounds, schema, inputs and limits
-> claim the tenant's request_id (idempotency) -> WorkItem on the BILLY_WORK stream ->
RunRecord "queued" in the ledger -> "queued" run event -> reply with the run_id.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from opentelemetry import trace

from services.admission import metrics
from services.admission.errors import AdmissionError, AdmissionUnavailable, RequestRejected
from services.admission.limits import effective_limits
from services.admission.policy import POLICY_VIOLATION, check_requested_limits, served_and_refused
from services.admission.validation import (
    ArgumentValidator,
    check_inputs,
    check_request_size,
    decode_request,
    max_request_bytes,
)
from shared import jetstream, signing, subjects, tracing
from shared.events import EventPublisher, finished_event, finished_msg_id
from shared.ledger import RunLedger, queued_record, request_key, result_without_outcome
from shared.logs import RunLogger, bind
from shared.operator_policy import OperatorPolicy, policy_of
from shared.service import answer_pings
from shared.settings import Settings
from shared.toolspec import ToolCatalog, ToolSpec
from shared.wire import (
    AdmissionReply,
    RequestedLimits,
    RunEvent,
    RunRecord,
    RunRequest,
    ToolList,
    ToolSummary,
    WorkItem,
    encode,
)

logger = logging.getLogger(__name__)
_tracer = tracing.tracer(__name__)

# Requests answered at once by one replica; more wait in the subscription's buffer.
MAX_IN_FLIGHT = 64
# A claim younger than this may belong to an admission still in flight: wait for its
# ledger record rather than queueing the run a second time.
CLAIM_SETTLE_S = 5.0
CLAIM_POLL_S = 0.02
STOP_TIMEOUT_S = 30.0
MAX_LISTED_TOOLS = 20
# NATS and JetStream failures that a later attempt may not meet.
NATS_FAILURES = (nats.errors.Error, asyncio.TimeoutError)


class RequestClaim(msgspec.Struct):
    """Value of a billy_requests entry: the run a tenant's request_id became."""

    run_id: str
    digest: str
    claimed_at: float


@dataclass
class Claim:
    """A request_id claim as admission holds it; `ours` is False for an earlier one."""

    key: str
    run_id: str
    revision: int
    claimed_at: float
    ours: bool


def new_run_id() -> str:
    """A time-sortable run_id: 12 hex digits of Unix milliseconds, 20 random hex digits."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def request_digest(request: RunRequest) -> str:
    """sha256 of the canonical request: sorted keys, no limits the same as empty limits."""
    canonical = msgspec.structs.replace(request, limits=request.limits or RequestedLimits())
    return hashlib.sha256(msgspec.json.encode(canonical, order="sorted")).hexdigest()


class RequestClaims:
    """Idempotency: the first submission of a tenant's request_id claims it for one run."""

    def __init__(self, bucket: KeyValue) -> None:
        self._bucket = bucket

    async def claim(self, request: RunRequest, digest: str) -> Claim:
        """Claim the request_id, or return the earlier claim of the same request."""
        key = request_key(request.tenant, request.request_id)
        value = RequestClaim(run_id=new_run_id(), digest=digest, claimed_at=time.time())
        # A claim released between our create and get is claimed again on the next round.
        for _ in range(3):
            try:
                revision = await self._bucket.create(key, encode(value))
                return Claim(key, value.run_id, revision, value.claimed_at, ours=True)
            except KeyWrongLastSequenceError:
                pass
            earlier = await self._get(key)
            if earlier is not None:
                return self._same_request(request, digest, key, *earlier)
        raise AdmissionUnavailable(
            "ledger_unavailable", f"request_id claim {key} kept changing under 3 attempts"
        )

    async def release(self, claim: Claim) -> None:
        """Delete our claim, so that sending the request again can succeed."""
        try:
            await self._bucket.delete(claim.key, last=claim.revision)
        except NATS_FAILURES as exc:
            logger.warning("claim_release_failed run_id=%s error=%r", claim.run_id, exc)

    async def _get(self, key: str) -> tuple[RequestClaim, int] | None:
        try:
            entry = await self._bucket.get(key)
        except NotFoundError:
            return None
        return msgspec.json.decode(entry.value, type=RequestClaim), entry.revision or 0

    @staticmethod
    def _same_request(
        request: RunRequest, digest: str, key: str, earlier: RequestClaim, revision: int
    ) -> Claim:
        if earlier.digest != digest:
            raise RequestRejected(
                "request_id_conflict",
                f"request_id {request.request_id!r} of tenant {request.tenant} was already "
                f"used for a different request (run {earlier.run_id})",
            )
        return Claim(key, earlier.run_id, revision, earlier.claimed_at, ours=False)


class AdmissionService:
    """Answers billy.runs.submit and billy.tools.list; replicas share a queue group."""

    name = "admission"

    def __init__(
        self,
        settings: Settings,
        catalog: ToolCatalog | None = None,
        policy: OperatorPolicy | None = None,
    ) -> None:
        self._settings = settings
        self._catalog = catalog
        self._policy = policy
        # Tools the operator policy refuses, with the reason a request for them gets.
        self._refused: dict[str, str] = {}
        self._instance = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self._specs: dict[str, ToolSpec] = {}
        self._validators: dict[str, ArgumentValidator] = {}
        self._spec_documents: dict[str, dict] = {}
        self._max_request_bytes = 0
        self._tool_list = b""
        self._nc: NATS | None = None
        # Set by start().
        self._js: JetStreamContext
        self._claims: RequestClaims
        self._ledger: RunLedger
        self._events: EventPublisher
        self._subscriptions: list[Subscription] = []
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Load the catalog, connect, declare, subscribe, answer pings."""
        tracing.configure(f"billy-{self.name}")
        self._load_catalog()
        self._nc = await jetstream.connect(self._settings, f"billy-admission-{self._instance}")
        try:
            self._js, buckets = await jetstream.declare(self._nc, self._settings)
            self._claims = RequestClaims(buckets.requests)
            self._ledger = RunLedger(buckets.runs)
            self._events = EventPublisher(self._js, self.name)
            await self._subscribe(self._nc)
            await answer_pings(self._nc, self.name, self._instance)
            # Once flushed, the server routes requests to us: start() means ready.
            await self._nc.flush()
        except BaseException:
            await self._nc.close()
            raise
        logger.info(
            "admission_started instance=%s tools=%d refused=%d",
            self._instance,
            len(self._validators),
            len(self._refused),
        )

    async def stop(self) -> None:
        """Stop taking requests, answer those in flight, then drain the connection."""
        for subscription in self._subscriptions:
            await subscription.drain()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_S)
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.drain()
        logger.info("admission_stopped instance=%s", self._instance)

    def _load_catalog(self) -> None:
        if self._catalog is None:
            self._catalog = ToolCatalog.load(self._settings.tools_dir)
        if self._policy is None:
            self._policy = policy_of(self._settings)
        specs, self._refused = served_and_refused(self._catalog, self._policy)
        self._specs = {spec.name: spec for spec in specs}
        self._validators = {spec.name: ArgumentValidator(spec) for spec in specs}
        self._spec_documents = {spec.name: spec.model_dump(mode="json") for spec in specs}
        self._max_request_bytes = max_request_bytes(specs)
        summaries = [
            ToolSummary(spec.name, spec.version, spec.description, spec.arguments_schema)
            for spec in specs
        ]
        self._tool_list = encode(ToolList(tools=summaries))

    async def _subscribe(self, nc: NATS) -> None:
        queue = subjects.ADMISSION_QUEUE
        self._subscriptions = [
            await nc.subscribe(subjects.SUBMIT_SUBJECT, queue=queue, cb=self._on_submit),
            await nc.subscribe(subjects.TOOLS_SUBJECT, queue=queue, cb=self._on_tools),
        ]

    async def _on_tools(self, msg: Msg) -> None:
        if msg.reply:
            await self._respond(msg, self._tool_list)

    async def _on_submit(self, msg: Msg) -> None:
        if not msg.reply:
            logger.warning(
                "request_dropped reason=no_reply_subject subject=%s size_bytes=%d",
                msg.subject,
                len(msg.data),
            )
            return
        # Each request runs in its own task so that a slow JetStream round trip does not
        # hold up the others; the semaphore bounds how many run at once.
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._slots.release())

    async def _answer(self, msg: Msg) -> None:
        started = time.perf_counter()
        with _tracer.start_as_current_span(
            "billy.admission",
            context=tracing.extract(msg.headers),
            kind=trace.SpanKind.SERVER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.operation": "process",
                "messaging.message.body.size": len(msg.data),
            },
        ) as span:
            request, reply = await self._decide(msg, span)
            reply.trace_id = tracing.current_trace_id()
            span.set_attribute("billy.admission.status", reply.status)
            if reply.status == "error":
                span.set_status(trace.StatusCode.ERROR, reply.reason)
            await self._respond(msg, encode(reply))
            self._record(request, reply, time.perf_counter() - started)

    async def _decide(self, msg: Msg, span: trace.Span) -> tuple[RunRequest | None, AdmissionReply]:
        request = None
        try:
            check_request_size(len(msg.data), self._max_request_bytes)
            request = decode_request(msg.data)
            span.set_attributes({"billy.tool": request.tool, "billy.tenant": request.tenant})
            reply = await self._admit(request)
            span.set_attribute("billy.run_id", reply.run_id)
        except AdmissionError as exc:
            reply = exc.reply()
        except Exception as exc:
            # Whatever went wrong with this request, the service keeps serving the next.
            span.record_exception(exc)
            logger.exception(
                "admission_failed tool=%s tenant=%s",
                request.tool if request else None,
                request.tenant if request else None,
            )
            reply = AdmissionReply(
                status="error",
                reason="internal_error",
                message="admission failed unexpectedly; its log holds the traceback",
            )
        reply.request_id = request.request_id if request else None
        return request, reply

    async def _admit(self, request: RunRequest) -> AdmissionReply:
        spec = self._spec_of(request.tool)
        self._validators[spec.name].check(request.arguments)
        check_inputs(request.inputs, spec)
        # The operator's caps first: their answer names the cap, not the ToolSpec.
        check_requested_limits(self._policy, spec, request.limits)
        limits = effective_limits(spec, request.limits)

        claim = await self._claim(request)
        earlier = None if claim.ours else await self._settled_record(claim)
        if earlier is not None and earlier.status != "queued":
            return AdmissionReply(status="queued", run_id=claim.run_id, duplicate=True)

        # The record and the queued event come before the work item, so that no executor
        # ever holds a run the ledger does not know. An earlier claim whose run is still
        # queued may never have reached the stream: publishing again is harmless, since
        # JetStream drops a repeated Nats-Msg-Id.
        item = WorkItem(
            run_id=claim.run_id,
            request_id=request.request_id,
            tenant=request.tenant,
            tool=spec.name,
            spec=self._spec_documents[spec.name],
            arguments=request.arguments,
            limits=limits,
            queued_at=time.time(),
            inputs=request.inputs,
        )
        payload = await self._encoded(item, claim)
        if earlier is None:
            await self._record_run(item)
            await self._emit_queued(item)
        await self._enqueue(item, payload, claim)
        return AdmissionReply(status="queued", run_id=claim.run_id, duplicate=not claim.ours)

    def _spec_of(self, tool: str) -> ToolSpec:
        if tool in self._refused:
            raise RequestRejected(POLICY_VIOLATION, self._refused[tool])
        try:
            return self._specs[tool]
        except KeyError as exc:
            names = sorted(self._specs)
            listed = ", ".join(names[:MAX_LISTED_TOOLS]) or "none"
            if len(names) > MAX_LISTED_TOOLS:
                listed += f" and {len(names) - MAX_LISTED_TOOLS} more"
            raise RequestRejected(
                "unknown_tool", f"unknown tool {tool!r}; known tools: {listed}"
            ) from exc

    async def _claim(self, request: RunRequest) -> Claim:
        try:
            return await self._claims.claim(request, request_digest(request))
        except NATS_FAILURES as exc:
            raise AdmissionUnavailable(
                "ledger_unavailable",
                f"bucket {subjects.REQUESTS_BUCKET} did not take the request_id claim: {exc!r}",
            ) from exc

    async def _settled_record(self, claim: Claim) -> RunRecord | None:
        """The earlier claim's ledger record, waiting while its admission may be in flight."""
        deadline = claim.claimed_at + CLAIM_SETTLE_S
        while True:
            try:
                record = await self._ledger.get(claim.run_id)
            except NATS_FAILURES as exc:
                raise AdmissionUnavailable(
                    "ledger_unavailable", f"run ledger did not answer for {claim.run_id}: {exc!r}"
                ) from exc
            if record is not None or time.time() >= deadline:
                return record
            await asyncio.sleep(CLAIM_POLL_S)

    async def _encoded(self, item: WorkItem, claim: Claim) -> bytes:
        """The work item's payload; too large for the stream, the request is rejected
        before anything of the run is recorded."""
        payload = encode(item)
        if len(payload) > jetstream.MAX_WORK_ITEM_BYTES:
            await self._claims.release(claim)
            raise RequestRejected(
                "work_item_too_large",
                f"work item is {len(payload)} bytes; the work stream takes at most "
                f"{jetstream.MAX_WORK_ITEM_BYTES}",
            )
        return payload

    async def _enqueue(self, item: WorkItem, payload: bytes, claim: Claim) -> PubAck:
        # Nats-Msg-Id makes JetStream drop a second publish of the same run.
        headers = tracing.inject(
            {subjects.MSG_ID_HEADER: item.run_id, subjects.RUN_ID_HEADER: item.run_id}
        )
        if self._settings.work_signing_key is not None:
            key = self._settings.work_signing_key.get_secret_value()
            headers[signing.SIGNATURE_HEADER] = signing.sign(key, payload)
        try:
            return await self._js.publish(
                subjects.WORK_SUBJECT, payload, stream=subjects.WORK_STREAM, headers=headers
            )
        except NATS_FAILURES as exc:
            _run_log(item).warning("enqueue_failed error=%r", exc)
            await self._abandon(item, f"stream {subjects.WORK_STREAM} did not take it: {exc!r}")
            await self._claims.release(claim)
            raise AdmissionUnavailable(
                "queue_unavailable",
                f"stream {subjects.WORK_STREAM} did not take run {item.run_id}: {exc!r}",
            ) from exc

    async def _record_run(self, item: WorkItem) -> None:
        record = queued_record(item, tracing.current_trace_id())
        try:
            await self._ledger.create(record)
        except NATS_FAILURES as exc:
            # The claim stays: sending the request again finishes admitting this run.
            _run_log(item).warning("ledger_create_failed error=%r", exc)
            raise AdmissionUnavailable(
                "ledger_unavailable",
                f"run {item.run_id} is queued but its ledger record failed: {exc!r}; "
                "send the request again to finish admitting it",
            ) from exc

    async def _abandon(self, item: WorkItem, why: str) -> None:
        """End a recorded run that never reached the queue, so it does not wait forever."""
        result = result_without_outcome(
            item, "infra_error", "queue_unavailable", why, tracing.current_trace_id()
        )
        try:
            if await self._ledger.finish(result):
                event = finished_event(result)
                await self._events.emit(event, msg_id=finished_msg_id(result.run_id))
        except NATS_FAILURES as exc:
            _run_log(item).warning("abandon_failed error=%r", exc)

    async def _emit_queued(self, item: WorkItem) -> None:
        event = RunEvent(
            run_id=item.run_id,
            type="queued",
            tenant=item.tenant,
            tool=item.tool,
            trace_id=tracing.current_trace_id(),
            status="queued",
            data={"stream": subjects.WORK_STREAM},
        )
        try:
            await self._events.emit(event)
        except NATS_FAILURES as exc:
            # The run is admitted; its executor's events still tell the rest of its story.
            _run_log(item).warning("queued_event_failed error=%r", exc)

    async def _respond(self, msg: Msg, payload: bytes) -> None:
        try:
            await msg.respond(payload)
        except NATS_FAILURES as exc:
            logger.warning("reply_failed subject=%s error=%r", msg.subject, exc)

    def _record(self, request: RunRequest | None, reply: AdmissionReply, elapsed_s: float) -> None:
        known = request is not None and request.tool in self._validators
        reason = reply.reason or ("duplicate" if reply.duplicate else None)
        metrics.observe(
            request.tool if known else metrics.UNKNOWN_TOOL, reply.status, reason, elapsed_s
        )
        log = bind(
            logger,
            run_id=reply.run_id,
            request_id=reply.request_id,
            tool=request.tool if request else None,
            tenant=request.tenant if request else None,
            trace_id=reply.trace_id,
        )
        # Never the arguments or the message: both may quote the client's data.
        decision = "duplicate" if reply.duplicate else reply.status
        log.info("admission_%s reason=%s elapsed_ms=%.1f", decision, reason, elapsed_s * 1000)


def _run_log(item: WorkItem) -> RunLogger:
    """The module logger with the run's context on every line."""
    return bind(
        logger,
        run_id=item.run_id,
        tool=item.tool,
        tenant=item.tenant,
        trace_id=tracing.current_trace_id(),
    )
