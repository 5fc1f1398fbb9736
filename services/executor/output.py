"""The tool's stdout and stderr, read through attach and kept within their caps.

Every byte is read and counted, so the tool never blocks on a full pipe; only the first
`stdout_bytes` / `stderr_bytes` are kept. aiodocker's attach Stream pauses the socket
when its queue holds more than 128 KiB, and dockerd frames are at most 32 KiB, so the
executor's memory stays bounded whatever the tool prints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import aiohttp
from aiodocker.stream import Stream

from services.executor.model import RunReporter
from shared.logs import RunLogger

logger = logging.getLogger(__name__)


@dataclass
class CapturedStream:
    """The kept head of one stream, and the count of everything seen."""

    name: str
    limit_bytes: int
    kept: bytearray = field(default_factory=bytearray)
    seen_bytes: int = 0

    @property
    def truncated(self) -> bool:
        return self.seen_bytes > self.limit_bytes

    def feed(self, data: bytes) -> bool:
        """Keep what fits and count all of it; True when this chunk first passes the cap."""
        was_truncated = self.truncated
        room = self.limit_bytes - len(self.kept)
        if room > 0:
            self.kept += data[:room]
        self.seen_bytes += len(data)
        return self.truncated and not was_truncated


class OutputCapture:
    """stdout and stderr of one run."""

    def __init__(self, stdout_limit_bytes: int, stderr_limit_bytes: int) -> None:
        self.stdout = CapturedStream("stdout", stdout_limit_bytes)
        self.stderr = CapturedStream("stderr", stderr_limit_bytes)

    def stream(self, fileno: int) -> CapturedStream | None:
        return {1: self.stdout, 2: self.stderr}.get(fileno)


async def drain(
    stream: Stream, capture: OutputCapture, reporter: RunReporter, log: RunLogger
) -> None:
    """Read the attached stream to its end; emit limit_hit the first time a cap is passed."""
    while True:
        try:
            message = await stream.read_out()
        except (aiohttp.ClientError, ConnectionError) as exc:
            # The tool's status still comes from wait/inspect; only output is lost.
            log.warning("output_stream_broken error=%s", exc)
            return
        if message is None:
            return
        captured = capture.stream(message.stream)
        if captured is not None and captured.feed(message.data):
            await _report_limit_hit(captured, reporter, log)


async def _report_limit_hit(captured: CapturedStream, reporter: RunReporter, log: RunLogger):
    log.info("output_truncated stream=%s limit_bytes=%d", captured.name, captured.limit_bytes)
    try:
        await reporter.event(
            "limit_hit",
            reason=f"{captured.name}_bytes",
            message=f"{captured.name} exceeded {captured.limit_bytes} bytes; truncated",
            data={"stream": captured.name, "limit_bytes": captured.limit_bytes},
        )
    except Exception:
        # Draining must go on whatever the reporter does, or the tool blocks on its pipe.
        log.exception("limit_hit_not_reported stream=%s", captured.name)
