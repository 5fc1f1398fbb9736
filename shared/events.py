"""Publishing run events to the BILLY_EVENTS stream, with the trace context in headers."""

from __future__ import annotations

import logging
import uuid

from nats.js import JetStreamContext

from shared import subjects, tracing
from shared.retry import through_outages
from shared.wire import RunEvent, RunResult, encode, to_builtins

logger = logging.getLogger(__name__)


def finished_msg_id(run_id: str) -> str:
    """The one message id of a run's finished event: publishing it again is a no-op."""
    return f"{run_id}.finished"


def finished_event(result: RunResult) -> RunEvent:
    """The finished event of a run, carrying its whole result."""
    return RunEvent(
        run_id=result.run_id,
        type="finished",
        tenant=result.tenant,
        tool=result.tool,
        trace_id=result.trace_id,
        duration_ms=result.timings.total_ms,
        status=result.status,
        reason=result.reason,
        message=result.message,
        data={"result": to_builtins(result)},
    )


class EventPublisher:
    """Publishes each run event once, to billy.events.<tenant>.<run_id>."""

    def __init__(self, js: JetStreamContext, source: str) -> None:
        self._js = js
        self._source = source

    async def emit(self, event: RunEvent, msg_id: str | None = None) -> None:
        """Publish `event`; a fixed `msg_id` makes publishing it again a no-op for the stream."""
        event.source = event.source or self._source
        # A retry after a lost ack carries the same message id, so the stream keeps one copy.
        headers = tracing.inject(
            {
                subjects.RUN_ID_HEADER: event.run_id,
                subjects.MSG_ID_HEADER: msg_id or uuid.uuid4().hex,
            }
        )
        subject = subjects.events_subject(event.tenant, event.run_id)
        payload = encode(event)
        await through_outages(
            lambda: self._js.publish(subject, payload, headers=headers),
            f"event {event.type} of run {event.run_id}",
        )
        logger.debug("event_published type=%s run_id=%s", event.type, event.run_id)
