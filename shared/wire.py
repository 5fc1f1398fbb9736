"""The wire contract: msgspec Structs for everything that crosses NATS, encoded as JSON.

Times are Unix seconds (float), durations carry their unit in the field name. The JSON
Schemas in docs/schemas/ are generated from these Structs (`make schemas`); a test fails
when they drift.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct, field

from shared.errors import WireError

# Names that end up in subjects, labels and object names: a strict token.
Token = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
RequestId = Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")]
InputName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")]

RunStatus = Literal[
    "queued",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "oom_killed",
    "limit_exceeded",
    "rejected",
    "infra_error",
]
TERMINAL_STATUSES: frozenset[str] = frozenset(
    {
        "succeeded",
        "failed",
        "timed_out",
        "oom_killed",
        "limit_exceeded",
        "rejected",
        "infra_error",
    }
)

EventType = Literal[
    "queued",
    "dequeued",
    "image_ensured",
    "image_pulled",
    "container_created",
    "container_started",
    "limit_hit",
    "timeout_kill",
    "oom_kill",
    "exited",
    "artifact_stored",
    "artifact_rejected",
    "container_removed",
    "finished",
]


class InputFile(Struct, forbid_unknown_fields=True):
    """A file the client gives the run; placed at /workspace/in/<name>."""

    name: InputName
    data: bytes  # base64 in JSON


class RequestedLimits(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Limits a request may lower (never raise) from its ToolSpec's."""

    timeout_s: Annotated[float, Meta(gt=0)] | None = None
    memory_bytes: Annotated[int, Meta(gt=0)] | None = None
    cpus: Annotated[float, Meta(gt=0)] | None = None


class RunRequest(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What Billy publishes on billy.runs.submit."""

    request_id: RequestId
    tool: Token
    tenant: Token = "default"
    arguments: dict[str, Any] = field(default_factory=dict)
    inputs: list[InputFile] = field(default_factory=list)
    limits: RequestedLimits | None = None


class ArgumentError(Struct):
    """One failing place of a request: a JSON path and what is wrong there."""

    path: str
    message: str


class AdmissionReply(Struct, omit_defaults=True):
    """Admission's answer: queued (with the run_id), rejected, or error."""

    status: Literal["queued", "rejected", "error"]
    request_id: str | None = None
    run_id: str | None = None
    duplicate: bool = False
    reason: str | None = None
    message: str | None = None
    errors: list[ArgumentError] = field(default_factory=list)
    trace_id: str | None = None


class EffectiveLimits(Struct):
    """The limits a run gets: its ToolSpec's, lowered by the request."""

    cpus: float
    memory_bytes: int
    pids: int
    timeout_s: float
    stop_grace_s: float
    stdout_bytes: int
    stderr_bytes: int
    artifact_bytes: int
    artifacts_total_bytes: int
    artifact_count: int
    workspace_bytes: int
    tmp_bytes: int


class WorkItem(Struct):
    """A queued run on the work stream: everything an executor needs, spec included."""

    run_id: str
    request_id: str
    tenant: str
    tool: str
    spec: dict[str, Any]  # the ToolSpec, as admission validated it
    arguments: dict[str, Any]
    limits: EffectiveLimits
    queued_at: float
    inputs: list[InputFile] = field(default_factory=list)


class RunEvent(Struct, omit_defaults=True):
    """One step of a run, on billy.events.<tenant>.<run_id>."""

    run_id: str
    type: EventType
    tenant: str
    tool: str
    at: float = field(default_factory=time.time)
    trace_id: str | None = None
    source: str | None = None  # admission, executor name, or artifacts
    duration_ms: float | None = None
    status: RunStatus | None = None
    reason: str | None = None
    message: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


class ArtifactRef(Struct):
    """An artifact the artifacts service stored."""

    path: str
    size_bytes: int
    sha256: str
    bucket: str
    object: str


class ArtifactRejection(Struct):
    """An output file that was not stored, and why."""

    path: str
    reason: str
    message: str


class RunTimings(Struct, omit_defaults=True):
    """Where a run's time went, in milliseconds."""

    queued_ms: float | None = None
    image_ms: float | None = None
    create_ms: float | None = None
    start_ms: float | None = None
    run_ms: float | None = None
    collect_ms: float | None = None
    remove_ms: float | None = None
    total_ms: float | None = None


class RunResult(Struct, omit_defaults=True):
    """The outcome of a run: its one terminal status and what the tool produced."""

    run_id: str
    request_id: str
    tenant: str
    tool: str
    status: RunStatus
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    output: Any = None  # stdout parsed as JSON when the ToolSpec says so
    artifacts: list[ArtifactRef] = field(default_factory=list)
    rejected_artifacts: list[ArtifactRejection] = field(default_factory=list)
    timings: RunTimings = field(default_factory=RunTimings)
    executor: str | None = None
    trace_id: str | None = None
    finished_at: float | None = None


class RunRecord(Struct, omit_defaults=True):
    """The run ledger's entry for one run (bucket billy_runs, key = run_id)."""

    run_id: str
    request_id: str
    tenant: str
    tool: str
    status: RunStatus
    created_at: float
    updated_at: float
    trace_id: str | None = None
    executor: str | None = None
    attempts: int = 0
    result: RunResult | None = None


class ArtifactLimits(Struct):
    """The artifact limits of a run, as the executor passes them to the artifacts service."""

    artifact_bytes: int
    artifacts_total_bytes: int
    artifact_count: int


class ArtifactIngest(Struct, omit_defaults=True):
    """Executor -> artifacts service: one output file of a run.

    `staged` names the object in billy_staging holding the bytes; it is None when the
    executor did not move the bytes (not a regular file, or over a limit by its header),
    in which case the artifacts service records the rejection.
    """

    run_id: str
    tenant: str
    tool: str
    path: str
    kind: Literal["file", "dir", "symlink", "hardlink", "fifo", "device", "other"]
    size_bytes: int
    index: int  # 0-based position among the run's output entries
    limits: ArtifactLimits
    stored_count: int  # artifacts of this run stored before this one
    stored_bytes: int
    staged: str | None = None
    link_target: str | None = None


class ArtifactVerdict(Struct, omit_defaults=True):
    """Artifacts service -> executor: stored (with its ref) or rejected (with reason)."""

    stored: bool
    ref: ArtifactRef | None = None
    rejection: ArtifactRejection | None = None


class ToolSummary(Struct):
    """One entry of billy.tools.list."""

    name: str
    version: str
    description: str
    arguments_schema: dict[str, Any]


class ToolList(Struct):
    """Admission's answer on billy.tools.list."""

    tools: list[ToolSummary]


# One encoder and a decoder per type, reused: building them is the costly part.
_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder] = {}
T = TypeVar("T")


def encode(message: Struct) -> bytes:
    """Encode a wire message as JSON bytes."""
    return _encoder.encode(message)


def decode(data: bytes, kind: type[T]) -> T:
    """Decode JSON bytes as `kind`; raises WireError naming the failing field."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise WireError(f"invalid {kind.__name__}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise WireError(f"malformed {kind.__name__}: {exc}") from exc


def to_builtins(message: Any) -> Any:
    """A wire message as plain dicts and lists (for printing and JSON Schema checks)."""
    return msgspec.to_builtins(message)


WIRE_MESSAGES: tuple[type[Struct], ...] = (
    RunRequest,
    AdmissionReply,
    WorkItem,
    RunEvent,
    RunResult,
    RunRecord,
    ArtifactIngest,
    ArtifactVerdict,
    ToolList,
)
