"""Riding out short NATS outages (a server restart, a leader election) on the operations
that must not be lost: run events and run ledger updates."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nats import errors as nats_errors
from nats.js import errors as js_errors
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that say "not now", not "never": the same call may succeed once NATS is back.
TRANSIENT_NATS_ERRORS = (
    TimeoutError,  # nats.errors.TimeoutError is one
    nats_errors.ConnectionClosedError,
    nats_errors.ConnectionReconnectingError,
    nats_errors.NoRespondersError,
    nats_errors.OutboundBufferLimitError,
    nats_errors.StaleConnectionError,
    js_errors.ServiceUnavailableError,
    js_errors.NoStreamResponseError,
)

# Long enough for a server restart; short enough that a run is not held for minutes.
OUTAGE_BUDGET_S = 30.0


async def through_outages(
    operation: Callable[[], Awaitable[T]], what: str, budget_s: float = OUTAGE_BUDGET_S
) -> T:
    """Call `operation`, retrying transient NATS errors for up to `budget_s` seconds."""

    def log_retry(state: RetryCallState) -> None:
        logger.warning(
            "nats_retry what=%s attempt=%d error=%r",
            what,
            state.attempt_number,
            state.outcome.exception() if state.outcome else None,
        )

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT_NATS_ERRORS),
        stop=stop_after_delay(budget_s),
        wait=wait_exponential(multiplier=0.1, max=2.0),
        before_sleep=log_retry,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await operation()
    raise AssertionError(f"unreachable: {what}")  # AsyncRetrying either returns or raises
