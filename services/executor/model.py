"""What a ToolRunner consumes and produces.

The executor service (service.py) turns a WorkItem into a RunContext, hands it to a
ToolRunner (runner.py: DockerRunner), forwards the runner's steps as run events through a
RunReporter, and passes every output entry to an ArtifactSink (the artifacts service).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Any, Literal, Protocol

from shared.toolspec import ToolSpec
from shared.wire import EffectiveLimits, EventType, InputFile, RunStatus, RunTimings

EntryKind = Literal["file", "dir", "symlink", "hardlink", "fifo", "device", "other"]


@dataclass
class RunContext:
    """One run as the runner sees it."""

    run_id: str
    tenant: str
    tool: str
    executor: str
    spec: ToolSpec
    arguments: dict[str, Any]
    inputs: list[InputFile]
    limits: EffectiveLimits
    trace_env: dict[str, str] = field(default_factory=dict)  # TRACEPARENT, TRACESTATE

    def labels(self) -> dict[str, str]:
        """Labels of every Docker object created for this run."""
        return {
            "billy.managed": "true",
            "billy.run_id": self.run_id,
            "billy.tool": self.tool,
            "billy.tenant": self.tenant,
            "billy.executor": self.executor,
        }


@dataclass
class OutputEntry:
    """One entry found under /workspace/out after the tool exited.

    `path` is relative to the output directory, decoded as UTF-8 with invalid bytes
    replaced by U+FFFD; `raw_path` keeps the bytes. Neither is ever used as a host path.
    """

    path: str
    raw_path: bytes
    kind: EntryKind
    size_bytes: int
    link_target: str | None = None


class RunReporter(Protocol):
    """Receives each step of a run; the executor publishes it as a run event."""

    async def event(
        self,
        type: EventType,
        *,
        duration_ms: float | None = None,
        reason: str | None = None,
        message: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None: ...


class ArtifactSink(Protocol):
    """Receives the output entries of a run, in archive order."""

    async def offer(self, entry: OutputEntry, content: IO[bytes] | None) -> None:
        """`content` reads a regular file's bytes; None when the runner did not read them
        (not a regular file, or its header already shows it over a limit)."""


@dataclass
class RunOutcome:
    """What the runner observed. The executor service turns it into a RunResult."""

    status: RunStatus  # succeeded, failed, timed_out, oom_killed or infra_error
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_bytes: int = 0  # everything the tool wrote, kept or not
    stderr_bytes: int = 0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    timings: RunTimings = field(default_factory=RunTimings)


class ToolRunner(Protocol):
    """Runs one tool to completion, whatever happens, and cleans up after it."""

    async def run(
        self, context: RunContext, reporter: RunReporter, sink: ArtifactSink
    ) -> RunOutcome: ...
