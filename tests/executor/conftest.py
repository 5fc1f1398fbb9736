"""Fixtures of the executor tests: ToolSpec and RunContext factories, and small fakes of
the RunReporter and ArtifactSink that record what the runner gave them."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import IO, Any

import pytest

from services.executor.model import OutputEntry, RunContext
from shared.toolspec import ToolSpec
from shared.wire import EffectiveLimits, InputFile
from tests.conftest import session_executor_name

FAKE_IMAGE_ID = "sha256:" + "ab" * 32


@dataclass
class RecordedEvent:
    type: str
    duration_ms: float | None
    reason: str | None
    message: str | None
    data: dict[str, Any]


@dataclass
class RecordingReporter:
    """A RunReporter that keeps every event; `hooks` run inside event() by type."""

    events: list[RecordedEvent] = field(default_factory=list)
    hooks: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)

    async def event(self, type, *, duration_ms=None, reason=None, message=None, data=None):
        self.events.append(RecordedEvent(type, duration_ms, reason, message, data or {}))
        hook = self.hooks.get(type)
        if hook is not None:
            await hook()

    def types(self) -> list[str]:
        return [event.type for event in self.events]

    def of_type(self, type: str) -> list[RecordedEvent]:
        return [event for event in self.events if event.type == type]


@dataclass
class RecordingSink:
    """An ArtifactSink that reads each offered content at once, as the real one must."""

    offers: list[tuple[OutputEntry, bytes | None]] = field(default_factory=list)

    async def offer(self, entry: OutputEntry, content: IO[bytes] | None) -> None:
        self.offers.append((entry, None if content is None else content.read()))

    def by_path(self) -> dict[str, tuple[OutputEntry, bytes | None]]:
        return {entry.path: (entry, content) for entry, content in self.offers}


def effective_limits(spec: ToolSpec, **overrides: Any) -> EffectiveLimits:
    """The ToolSpec's limits as admission would pass them, with `overrides` applied."""
    limits = spec.limits
    values = {
        "cpus": limits.cpus,
        "memory_bytes": int(limits.memory_bytes),
        "pids": limits.pids,
        "timeout_s": limits.timeout.default_s,
        "stop_grace_s": limits.timeout.stop_grace_s,
        "stdout_bytes": int(limits.stdout_bytes),
        "stderr_bytes": int(limits.stderr_bytes),
        "artifact_bytes": int(limits.artifact_bytes),
        "artifacts_total_bytes": int(limits.artifacts_total_bytes),
        "artifact_count": limits.artifact_count,
        "workspace_bytes": int(limits.workspace_bytes),
        "tmp_bytes": int(spec.filesystem.tmp_bytes),
    }
    values.update(overrides)
    return EffectiveLimits(**values)


@pytest.fixture(scope="session")
def runner_executor() -> str:
    """The executor name of these tests, so that leftovers can be traced to them."""
    return session_executor_name("runner")


@pytest.fixture
def make_spec() -> Callable[..., ToolSpec]:
    """Build a ToolSpec in code: image ref and id, command, then any other field."""

    def make(
        command: list[str],
        *,
        ref: str = "billy/busybox:local",
        image_id: str | None = FAKE_IMAGE_ID,
        **fields: Any,
    ) -> ToolSpec:
        image = {"ref": ref, "id": image_id, **fields.pop("image", {})}
        return ToolSpec(name="test-tool", version="1", image=image, command=command, **fields)

    return make


@pytest.fixture
def make_context(runner_executor: str) -> Callable[..., RunContext]:
    """Build a RunContext with a random run id; keyword limits override the spec's."""

    def make(
        spec: ToolSpec,
        *,
        arguments: dict[str, Any] | None = None,
        inputs: list[InputFile] | None = None,
        trace_env: dict[str, str] | None = None,
        **limits: Any,
    ) -> RunContext:
        return RunContext(
            run_id=f"run-{uuid.uuid4().hex}",
            tenant="test-tenant",
            tool=spec.name,
            executor=runner_executor,
            spec=spec,
            arguments=arguments or {},
            inputs=inputs or [],
            limits=effective_limits(spec, **limits),
            trace_env=trace_env or {},
        )

    return make


@pytest.fixture
def reporter() -> RecordingReporter:
    return RecordingReporter()


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()
