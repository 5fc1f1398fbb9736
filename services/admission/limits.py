"""The limits a run gets: its ToolSpec's, lowered (never raised) by the request."""

from __future__ import annotations

from services.admission.errors import RequestRejected
from shared.toolspec import ToolSpec
from shared.wire import EffectiveLimits, RequestedLimits

# Docker refuses a memory limit under 6 MiB and CPU quotas finer than 0.01 CPU.
MIN_MEMORY_BYTES = 6 * 1024 * 1024
MIN_CPUS = 0.01


def effective_limits(spec: ToolSpec, requested: RequestedLimits | None) -> EffectiveLimits:
    """The spec's limits with the request's lower timeout, memory and cpus applied."""
    requested = requested or RequestedLimits()
    _check_within_spec(spec, requested)
    _check_above_minimum(spec, requested)

    limits = spec.limits
    return EffectiveLimits(
        cpus=_lowered(requested.cpus, limits.cpus),
        memory_bytes=int(_lowered(requested.memory_bytes, int(limits.memory_bytes))),
        pids=limits.pids,
        timeout_s=_lowered(requested.timeout_s, limits.timeout.default_s),
        stop_grace_s=limits.timeout.stop_grace_s,
        stdout_bytes=int(limits.stdout_bytes),
        stderr_bytes=int(limits.stderr_bytes),
        artifact_bytes=int(limits.artifact_bytes),
        artifacts_total_bytes=int(limits.artifacts_total_bytes),
        artifact_count=limits.artifact_count,
        workspace_bytes=int(limits.workspace_bytes),
        tmp_bytes=int(spec.filesystem.tmp_bytes),
    )


def _lowered(requested: float | None, default: float) -> float:
    return default if requested is None else requested


def _check_within_spec(spec: ToolSpec, requested: RequestedLimits) -> None:
    allowed = {
        "timeout_s": spec.limits.timeout.max_s,
        "memory_bytes": int(spec.limits.memory_bytes),
        "cpus": spec.limits.cpus,
    }
    excess = [
        f"{name} {asked} > {allowed[name]}"
        for name, asked in _asked(requested)
        if asked > allowed[name]
    ]
    if excess:
        raise RequestRejected(
            "limit_exceeds_spec",
            f"requested limits exceed what tool {spec.name} allows: {'; '.join(excess)}",
        )


def _check_above_minimum(spec: ToolSpec, requested: RequestedLimits) -> None:
    minimum = {"timeout_s": 0.0, "memory_bytes": MIN_MEMORY_BYTES, "cpus": MIN_CPUS}
    short = [
        f"{name} {asked} < {minimum[name]}"
        for name, asked in _asked(requested)
        if asked < minimum[name]
    ]
    if short:
        raise RequestRejected(
            "limit_below_minimum",
            f"requested limits for tool {spec.name} are below what a container can run "
            f"with: {'; '.join(short)}",
        )


def _asked(requested: RequestedLimits) -> list[tuple[str, float]]:
    fields = ("timeout_s", "memory_bytes", "cpus")
    return [
        (name, getattr(requested, name)) for name in fields if getattr(requested, name) is not None
    ]
