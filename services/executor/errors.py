"""Errors of the executor: one root, Docker failures translated at the boundary."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import aiohttp
from aiodocker.exceptions import DockerError

InfraReason = Literal[
    "docker_unavailable", "image_unavailable", "runtime_unavailable", "docker_error"
]

ImageRefusalReason = Literal["image_digest_mismatch", "image_proc_path"]

# aiodocker reports "cannot connect to the daemon" as this pseudo HTTP status.
DOCKER_UNREACHABLE_STATUS = 900


class ExecutorError(Exception):
    """Root of every error raised by the executor package."""


class InfraError(ExecutorError):
    """Docker failed under a run; the run ends in infra_error with this reason."""

    def __init__(self, reason: InfraReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ImageUnavailableError(InfraError):
    """The tool's image is missing locally, differs from the recorded id, or cannot be pulled."""

    def __init__(self, message: str) -> None:
        super().__init__("image_unavailable", message)


class RuntimeUnavailableError(InfraError):
    """The ToolSpec asks for a container runtime (e.g. runsc) that the daemon does not have."""

    def __init__(self, runtime: str, message: str) -> None:
        super().__init__("runtime_unavailable", message)
        self.runtime = runtime


class ImageRefusedError(ExecutorError):
    """The image found is not the one recorded for the tool, or its Config is refused;
    the run ends in rejected with this reason."""

    def __init__(self, reason: ImageRefusalReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class CommandError(ExecutorError):
    """An argument cannot become part of the tool's argv."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"argument {argument!r}: {message}")
        self.argument = argument


def infra_error_of(exc: Exception, doing: str) -> InfraError:
    """The InfraError that a Docker client failure while `doing` something stands for."""
    if isinstance(exc, DockerError):
        if exc.status == DOCKER_UNREACHABLE_STATUS:
            return InfraError("docker_unavailable", f"{doing}: {exc.message}")
        return InfraError("docker_error", f"{doing}: Docker answered {exc.status}: {exc.message}")
    if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError):
        return InfraError("docker_unavailable", f"{doing}: connection to Docker lost: {exc}")
    return InfraError("docker_error", f"{doing}: {type(exc).__name__}: {exc}")


@contextmanager
def docker_errors(doing: str) -> Iterator[None]:
    """Translate Docker client failures inside the block into InfraError."""
    try:
        yield
    except InfraError:
        raise
    except TimeoutError as exc:
        # aiodocker's request timeouts; callers keep their own asyncio.timeout outside.
        raise InfraError("docker_unavailable", f"{doing}: Docker did not answer in time") from exc
    except (DockerError, aiohttp.ClientError, OSError) as exc:
        raise infra_error_of(exc, doing) from exc
