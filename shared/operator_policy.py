"""The operator policy: how far a ToolSpec may move from the security baseline, and who said so.

A tool author writes the ToolSpec; the operator writes the policy file. Admission serves a
tool only when its ToolSpec stays within the policy's caps and uses no relaxation the
policy does not approve for that very tool, and rejects a request asking more than the
caps (reason `policy_violation`). Each exception names who approved it and why, so the file
is the audit record. docs/security-baseline.md explains every field.

Where it comes from: BILLY_POLICY_FILE, else <tools_dir>/policy.yaml when it exists, else
the built-in strict baseline (these defaults: no exception, network none).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator

from shared.errors import BillyToolsError
from shared.settings import Settings
from shared.toolspec import TOKEN, ToolSpec
from shared.wire import RequestedLimits

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
BUILT_IN = "built-in baseline"

Runtime = Literal["runc", "runsc"]
NetworkMode = Literal["none"]


class PolicyFileError(BillyToolsError):
    """The operator policy file cannot be read or is not a valid policy."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Caps(_Strict):
    """Upper bounds of what any ToolSpec may declare; a request can only lower them."""

    cpus: float = Field(2.0, gt=0)
    memory_bytes: ByteSize = Field(ByteSize(1 * GiB), gt=0)
    pids: int = Field(256, gt=0)
    timeout_max_s: float = Field(600.0, gt=0)
    tmp_bytes: ByteSize = Field(ByteSize(256 * MiB), gt=0)
    workspace_bytes: ByteSize = Field(ByteSize(1 * GiB), gt=0)
    stdout_bytes: ByteSize = Field(ByteSize(8 * MiB), gt=0)
    stderr_bytes: ByteSize = Field(ByteSize(8 * MiB), gt=0)
    input_bytes: ByteSize = Field(ByteSize(8 * MiB), gt=0)
    artifact_bytes: ByteSize = Field(ByteSize(64 * MiB), gt=0)
    artifacts_total_bytes: ByteSize = Field(ByteSize(256 * MiB), gt=0)
    artifact_count: int = Field(1024, gt=0)


class CapsOverride(_Strict):
    """Caps one tool gets above (or below) the policy-wide ones."""

    cpus: float | None = Field(None, gt=0)
    memory_bytes: ByteSize | None = Field(None, gt=0)
    pids: int | None = Field(None, gt=0)
    timeout_max_s: float | None = Field(None, gt=0)
    tmp_bytes: ByteSize | None = Field(None, gt=0)
    workspace_bytes: ByteSize | None = Field(None, gt=0)
    stdout_bytes: ByteSize | None = Field(None, gt=0)
    stderr_bytes: ByteSize | None = Field(None, gt=0)
    input_bytes: ByteSize | None = Field(None, gt=0)
    artifact_bytes: ByteSize | None = Field(None, gt=0)
    artifacts_total_bytes: ByteSize | None = Field(None, gt=0)
    artifact_count: int | None = Field(None, gt=0)


class ToolException(_Strict):
    """What one tool may do beyond the policy-wide rules, and who approved it."""

    tool: str = Field(pattern=TOKEN)
    caps: CapsOverride = Field(default_factory=CapsOverride)
    allow_writable_root: bool = Field(
        False, description="The tool may set filesystem.read_only_root: false."
    )
    runtimes: list[Runtime] | None = Field(
        None, description="Runtimes this tool may use instead of the policy-wide list."
    )
    approved_by: str = Field(min_length=1, description="Who approved the exception.")
    reason: str = Field(min_length=1, description="Why the tool needs it.")
    approved_on: datetime.date | None = None


class OperatorPolicy(_Strict):
    """Caps, allowed runtimes and network modes, and the approved per-tool exceptions."""

    caps: Caps = Field(default_factory=Caps)
    runtimes: list[Runtime] = Field(default_factory=lambda: ["runc", "runsc"], min_length=1)
    # Egress allowlists will add modes; until then "none" is the only one there is.
    network_modes: list[NetworkMode] = Field(default_factory=lambda: ["none"], min_length=1)
    exceptions: list[ToolException] = Field(default_factory=list)
    source: str = Field(BUILT_IN, exclude=True, description="The file it was loaded from.")

    @model_validator(mode="after")
    def _one_exception_per_tool(self) -> OperatorPolicy:
        tools = [exception.tool for exception in self.exceptions]
        repeated = sorted({tool for tool in tools if tools.count(tool) > 1})
        if repeated:
            raise ValueError(f"exceptions: more than one entry for {', '.join(repeated)}")
        return self

    def exception_for(self, tool: str) -> ToolException | None:
        """The approved exception of `tool`, if the policy has one."""
        return next((e for e in self.exceptions if e.tool == tool), None)

    def caps_for(self, tool: str) -> Caps:
        """The policy-wide caps with the tool's exception applied."""
        exception = self.exception_for(tool)
        if exception is None:
            return self.caps
        overrides = exception.caps.model_dump(exclude_none=True)
        return self.caps.model_copy(update=overrides)

    def runtimes_for(self, tool: str) -> list[str]:
        exception = self.exception_for(tool)
        if exception is not None and exception.runtimes is not None:
            return list(exception.runtimes)
        return list(self.runtimes)

    def check_toolspec(self, spec: ToolSpec) -> list[PolicyViolation]:
        """Every place where the ToolSpec asks for more than the policy allows it."""
        caps = self.caps_for(spec.name)
        violations = [
            PolicyViolation(spec.name, field, asked, allowed)
            for field, asked, allowed in _spec_limits(spec, caps)
            if asked > allowed
        ]
        return violations + self._relaxation_violations(spec)

    def check_requested(self, tool: str, requested: RequestedLimits) -> list[PolicyViolation]:
        """Requested limits above the tool's caps."""
        caps = self.caps_for(tool)
        allowed = {
            "timeout_s": caps.timeout_max_s,
            "memory_bytes": int(caps.memory_bytes),
            "cpus": caps.cpus,
        }
        violations = []
        for name, cap in allowed.items():
            asked = getattr(requested, name)
            if asked is not None and asked > cap:
                violations.append(PolicyViolation(tool, f"limits.{name}", asked, cap))
        return violations

    def approved_relaxations(self, spec: ToolSpec) -> dict[str, ToolException]:
        """The baseline items this ToolSpec relaxes with the policy's approval, by item."""
        exception = self.exception_for(spec.name)
        if exception is None or self._relaxation_violations(spec):
            return {}
        relaxed = {}
        if not spec.filesystem.read_only_root:
            relaxed["read_only_root"] = exception
        return relaxed

    def _relaxation_violations(self, spec: ToolSpec) -> list[PolicyViolation]:
        exception = self.exception_for(spec.name)
        violations = []
        writable_allowed = exception is not None and exception.allow_writable_root
        if not spec.filesystem.read_only_root and not writable_allowed:
            violations.append(PolicyViolation(spec.name, "filesystem.read_only_root", False, True))
        runtimes = self.runtimes_for(spec.name)
        if spec.runtime not in runtimes:
            violations.append(PolicyViolation(spec.name, "runtime", spec.runtime, runtimes))
        if spec.network.mode not in self.network_modes:
            violations.append(
                PolicyViolation(spec.name, "network.mode", spec.network.mode, self.network_modes)
            )
        return violations


@dataclass(frozen=True)
class PolicyViolation:
    """One field of a ToolSpec or request beyond what the operator policy allows."""

    tool: str
    field: str
    asked: Any
    allowed: Any

    def __str__(self) -> str:
        if isinstance(self.allowed, list):
            allowed = ", ".join(str(value) for value in self.allowed)
            return f"{self.field} {self.asked} is not allowed (allowed: {allowed})"
        if isinstance(self.allowed, bool):
            return f"{self.field} {str(self.asked).lower()} is not approved for this tool"
        return f"{self.field} {_number(self.asked)} exceeds the cap of {_number(self.allowed)}"


def describe(violations: list[PolicyViolation]) -> str:
    """The violations as one line: `field asked > allowed; ...`."""
    return "; ".join(str(violation) for violation in violations)


def load_operator_policy(path: Path | None) -> OperatorPolicy:
    """Load the policy file at `path`; None gives the built-in strict baseline."""
    if path is None:
        return OperatorPolicy()
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyFileError(str(path), f"cannot read: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyFileError(str(path), "expected a mapping at the top level")
    try:
        policy = OperatorPolicy.model_validate({**raw, "source": str(path)})
    except ValidationError as exc:
        raise PolicyFileError(str(path), _describe(exc)) from exc
    logger.info(
        "operator_policy_loaded path=%s exceptions=%d runtimes=%s",
        path,
        len(policy.exceptions),
        ",".join(policy.runtimes),
    )
    return policy


def policy_of(settings: Settings) -> OperatorPolicy:
    """The operator policy these settings name (see Settings.policy_file)."""
    return load_operator_policy(settings.operator_policy_path())


def _spec_limits(spec: ToolSpec, caps: Caps) -> list[tuple[str, float, float]]:
    """(ToolSpec field, declared value, cap) of every capped field."""
    limits = spec.limits
    return [
        ("limits.cpus", limits.cpus, caps.cpus),
        ("limits.memory_bytes", int(limits.memory_bytes), int(caps.memory_bytes)),
        ("limits.pids", limits.pids, caps.pids),
        ("limits.timeout.max_s", limits.timeout.max_s, caps.timeout_max_s),
        ("filesystem.tmp_bytes", int(spec.filesystem.tmp_bytes), int(caps.tmp_bytes)),
        ("limits.workspace_bytes", int(limits.workspace_bytes), int(caps.workspace_bytes)),
        ("limits.stdout_bytes", int(limits.stdout_bytes), int(caps.stdout_bytes)),
        ("limits.stderr_bytes", int(limits.stderr_bytes), int(caps.stderr_bytes)),
        ("limits.input_bytes", int(limits.input_bytes), int(caps.input_bytes)),
        ("limits.artifact_bytes", int(limits.artifact_bytes), int(caps.artifact_bytes)),
        (
            "limits.artifacts_total_bytes",
            int(limits.artifacts_total_bytes),
            int(caps.artifacts_total_bytes),
        ),
        ("limits.artifact_count", limits.artifact_count, caps.artifact_count),
    ]


def _number(value: Any) -> str:
    # 2.0 cpus reads as 2; byte counts stay exact.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(root)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)
