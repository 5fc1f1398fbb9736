"""EventReporter: turns a runner's steps into run events, log lines and metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from services.executor import metrics
from shared import tracing
from shared.events import EventPublisher
from shared.logs import RunLogger
from shared.wire import EventType, RunEvent

logger = logging.getLogger(__name__)
_tracer = tracing.tracer(__name__)

# Steps that become spans, drawn after the fact from the duration the runner measured.
SPAN_NAMES = {
    "image_ensured": "billy.image.ensure",
    "image_pulled": "billy.image.pull",
    "container_created": "billy.container.create",
    "container_started": "billy.container.start",
    "exited": "billy.container.wait",
    "container_removed": "billy.container.remove",
}


class EventReporter:
    """The RunReporter of one run: each step becomes one event and one log line."""

    def __init__(
        self,
        events: EventPublisher,
        *,
        run_id: str,
        tenant: str,
        tool: str,
        trace_id: str | None,
        log: RunLogger,
    ) -> None:
        self._events = events
        self._run = {"run_id": run_id, "tenant": tenant, "tool": tool, "trace_id": trace_id}
        self._log = log
        self._create_ms = 0.0

    async def event(
        self,
        type: EventType,
        *,
        duration_ms: float | None = None,
        reason: str | None = None,
        message: str | None = None,
        data: dict[str, Any] | None = None,
        status: str | None = None,
        msg_id: str | None = None,
    ) -> None:
        self._observe(type, duration_ms)
        self._span(type, duration_ms, data)
        self._log.info("run_%s duration_ms=%s reason=%s", type, _ms(duration_ms), reason or "-")
        await self._events.emit(
            RunEvent(
                type=type,
                duration_ms=duration_ms,
                reason=reason,
                message=message,
                status=status,
                data=data or {},
                **self._run,
            ),
            msg_id=msg_id,
        )

    def _span(self, type: EventType, duration_ms: float | None, data: dict | None) -> None:
        name = SPAN_NAMES.get(type)
        if name is None or duration_ms is None:
            return
        end_ns = time.time_ns()
        span = _tracer.start_span(
            name,
            start_time=end_ns - int(duration_ms * 1e6),
            attributes={"billy.run_id": self._run["run_id"], "billy.tool": self._run["tool"]},
        )
        if data and "exit_code" in data:
            span.set_attribute("process.exit.code", data["exit_code"])
        span.end(end_time=end_ns)

    def _observe(self, type: EventType, duration_ms: float | None) -> None:
        # Container start latency is create + start, as a user waiting for it sees it.
        if type == "container_created" and duration_ms is not None:
            self._create_ms = duration_ms
        elif type == "container_started" and duration_ms is not None:
            metrics.CONTAINER_START.observe((self._create_ms + duration_ms) / 1000)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
