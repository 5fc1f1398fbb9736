"""Structured logging: an event name followed by key=value context on every line.

log = bind(logger, run_id=run.run_id, tool=run.tool, tenant=run.tenant, trace_id=tid)
log.info("run_started image=%s", ref)
-> run_started image=billy/x:1 run_id=... tool=... tenant=... trace_id=...
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any


class RunLogger(logging.LoggerAdapter):
    """Appends the bound context (run_id, tool, tenant, trace_id, ...) to each message."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        context = " ".join(f"{k}={v}" for k, v in (self.extra or {}).items() if v is not None)
        return (f"{msg} {context}" if context else msg), kwargs

    def bind(self, **context: Any) -> RunLogger:
        return RunLogger(self.logger, {**(self.extra or {}), **context})


def bind(logger: logging.Logger, **context: Any) -> RunLogger:
    """A logger that adds `context` as key=value pairs to every line."""
    return RunLogger(logger, context)


def context_of(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """The standard run context fields out of a record-like mapping."""
    return {k: mapping.get(k) for k in ("run_id", "tool", "tenant", "trace_id")}


def configure(level: str = "INFO", service: str = "billy-tools") -> None:
    """Send logs to stderr as `time level service logger: message`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter stays at WARNING unless asked for.
    for noisy in ("nats", "aiodocker", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
