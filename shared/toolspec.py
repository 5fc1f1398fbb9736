"""ToolSpec: the one canonical description of a tool, loaded from tool-images/<tool>/tool.yaml.

Admission validates requests against it and puts it into the work item; the executor
turns it into a container. docs/docker-execution.md explains every field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.errors import ToolSpecError, UnknownToolError

SPEC_FILE = "tool.yaml"
LOCK_FILE = "images.lock.json"
TOKEN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")

MiB = 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageBuild(_Strict):
    """How the image is built here (`billy-tools images build`)."""

    context: str = "."
    dockerfile: str = "Dockerfile"
    base: str | None = Field(
        None,
        description="Local image used as the BASE build argument; None keeps the default.",
    )
    args: dict[str, str] = Field(default_factory=dict)


class ImageSpec(_Strict):
    """The tool's image: a reference plus what pins it."""

    ref: str = Field(description="Image reference, e.g. billy/doc-stats:1.0.0.")
    digest: str | None = Field(
        None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="Registry digest; the executor pulls ref@digest when a registry is set.",
    )
    id: str | None = Field(
        None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="Image id recorded at build time; a local image must match it.",
    )
    build: ImageBuild | None = None


class TimeoutSpec(_Strict):
    default_s: float = Field(30.0, gt=0)
    max_s: float = Field(300.0, gt=0)
    stop_grace_s: float = Field(2.0, ge=0, le=60)

    @model_validator(mode="after")
    def _default_within_max(self) -> TimeoutSpec:
        if self.default_s > self.max_s:
            raise ValueError(f"default_s {self.default_s} exceeds max_s {self.max_s}")
        return self


class Limits(_Strict):
    """Resource limits; a request may lower timeout, memory and cpus, never raise them."""

    cpus: float = Field(1.0, gt=0, le=64)
    memory_bytes: ByteSize = Field(ByteSize(256 * MiB), ge=6 * MiB)
    pids: int = Field(128, ge=8, le=32768)
    timeout: TimeoutSpec = Field(default_factory=TimeoutSpec)
    stdout_bytes: ByteSize = Field(ByteSize(1 * MiB), ge=1)
    stderr_bytes: ByteSize = Field(ByteSize(256 * 1024), ge=1)
    artifact_bytes: ByteSize = Field(ByteSize(10 * MiB), ge=1)
    artifacts_total_bytes: ByteSize = Field(ByteSize(50 * MiB), ge=1)
    artifact_count: int = Field(32, ge=0, le=100_000)
    workspace_bytes: ByteSize = Field(ByteSize(100 * MiB), ge=MiB)
    input_bytes: ByteSize = Field(ByteSize(512 * 1024), ge=0)


class Filesystem(_Strict):
    read_only_root: bool = True
    tmp_bytes: ByteSize = Field(ByteSize(64 * MiB), ge=MiB)


class Network(_Strict):
    # Egress allowlists arrive as a second mode ("egress" with an allow list) later.
    mode: Literal["none"] = "none"


class Outputs(_Strict):
    stdout: Literal["text", "json"] = "text"
    stdout_schema: dict[str, Any] | None = Field(
        None, description="JSON Schema the parsed stdout must satisfy (stdout: json only)."
    )
    artifacts: list[str] = Field(
        default_factory=lambda: ["**"],
        description="Glob patterns, relative to /workspace/out, of files to collect.",
    )
    required_artifacts: list[str] = Field(
        default_factory=list,
        description="Paths that must be stored for the run to succeed.",
    )


class Concurrency(_Strict):
    # Enforced across executors later; for now the executor's local pool is the limit.
    max_runs: int = Field(4, ge=1)


class ToolSpec(_Strict):
    """One tool: identity, image, command, arguments, outputs, limits and policy."""

    name: Annotated[str, Field(pattern=TOKEN)]
    version: str = Field(min_length=1, max_length=64)
    description: str = ""
    image: ImageSpec
    entrypoint: list[str] | None = Field(
        None, description="Overrides the image's entrypoint; never run through a shell."
    )
    command: list[str] = Field(
        min_length=1,
        description="argv; an element '{name}' is replaced by argument `name`, expanded "
        "for lists and dropped when the argument is absent.",
    )
    arguments_schema: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "additionalProperties": False}
    )
    outputs: Outputs = Field(default_factory=Outputs)
    limits: Limits = Field(default_factory=Limits)
    filesystem: Filesystem = Field(default_factory=Filesystem)
    network: Network = Field(default_factory=Network)
    runtime: Literal["runc", "runsc"] = Field(
        "runc",
        description="Container runtime: runc (default), or runsc (gVisor, a user-space kernel "
        "between the tool and the host) for tools that run arbitrary code; docs/gvisor.md.",
    )
    secrets: list[str] = Field(default_factory=list)
    concurrency: Concurrency = Field(default_factory=Concurrency)
    user: str = Field("65534:65534", pattern=r"^[0-9]+(:[0-9]+)?$")
    env: dict[str, str] = Field(default_factory=dict, description="Non-secret environment.")

    @field_validator("arguments_schema", "outputs")
    @classmethod
    def _schemas_are_valid(cls, value: Any) -> Any:
        schema = value.stdout_schema if isinstance(value, Outputs) else value
        if schema is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
                raise ValueError(f"not a valid JSON Schema at {where}: {exc.message}") from exc
        return value

    @field_validator("user")
    @classmethod
    def _not_root(cls, value: str) -> str:
        if value.split(":")[0] == "0":
            raise ValueError("tools run as a non-root user; uid 0 is not allowed")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"invalid environment variable name {name!r}")
            if name.startswith("BILLY_") or name in {"TRACEPARENT", "TRACESTATE"}:
                raise ValueError(f"environment variable {name} is reserved for the runtime")
        return value

    def placeholders(self) -> list[str]:
        """Argument names that the command refers to."""
        found = []
        for element in [*(self.entrypoint or []), *self.command]:
            match = PLACEHOLDER.match(element)
            if match:
                found.append(match.group(1))
        return found


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(root)"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def load_toolspec(path: Path, image_lock: dict[str, Any] | None = None) -> ToolSpec:
    """Load one tool.yaml; a recorded image id/digest from the lock fills image.id/digest."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ToolSpecError(str(path), f"cannot read: {exc}") from exc
    if not isinstance(raw, dict):
        raise ToolSpecError(str(path), "expected a mapping at the top level")
    if image_lock and isinstance(raw.get("image"), dict) and raw.get("name") in image_lock:
        recorded = image_lock[raw["name"]]
        raw["image"] = {
            **raw["image"],
            **{k: v for k, v in recorded.items() if k in ("id", "digest")},
        }
    try:
        return ToolSpec.model_validate(raw)
    except ValidationError as exc:
        raise ToolSpecError(str(path), _describe(exc)) from exc


def read_image_lock(tools_dir: Path) -> dict[str, Any]:
    """The image ids and digests that `billy-tools images build` recorded, by tool."""
    path = tools_dir / LOCK_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ToolSpecError(str(path), f"cannot read image lock: {exc}") from exc


class ToolCatalog:
    """The ToolSpecs found under a tools directory, by name."""

    def __init__(self, specs: dict[str, ToolSpec], spec_dirs: dict[str, Path] | None = None):
        self._specs = dict(specs)
        self.spec_dirs = dict(spec_dirs or {})

    @classmethod
    def load(cls, *tools_dirs: Path) -> ToolCatalog:
        """Load every <dir>/<tool>/tool.yaml; the directory name must match the tool name."""
        specs: dict[str, ToolSpec] = {}
        dirs: dict[str, Path] = {}
        for tools_dir in tools_dirs:
            lock = read_image_lock(tools_dir)
            for spec_path in sorted(tools_dir.glob(f"*/{SPEC_FILE}")):
                spec = load_toolspec(spec_path, lock)
                if spec.name != spec_path.parent.name:
                    raise ToolSpecError(
                        str(spec_path),
                        f"name: {spec.name!r} differs from its folder {spec_path.parent.name!r}",
                    )
                if spec.name in specs:
                    raise ToolSpecError(str(spec_path), f"name: {spec.name!r} defined twice")
                specs[spec.name] = spec
                dirs[spec.name] = spec_path.parent
        return cls(specs, dirs)

    def get(self, name: str) -> ToolSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownToolError(name) from None

    def names(self) -> list[str]:
        return sorted(self._specs)

    def __iter__(self):
        return iter(self._specs[name] for name in self.names())

    def __len__(self) -> int:
        return len(self._specs)
