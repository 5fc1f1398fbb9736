"""Rules on a tool image (as `docker image inspect` shows it): who the image would run as,
whether its working directory or executables point into /proc, and which registry digests
it carries.

The image build applies every rule; the executor applies the /proc rule again to whatever
image it is about to run, because an image pulled from a registry was not built here.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Literal

RefusalReason = Literal["image_runs_as_root", "image_proc_path"]

PROC_DIR = "/proc"
ROOT_NAMES = {"", "root", "0"}


@dataclass(frozen=True)
class Refusal:
    """Why an image is refused: a reason code and a message with the offending value."""

    reason: RefusalReason
    message: str


def repo_digests(inspected: dict[str, Any]) -> set[str]:
    """The registry digests Docker verified for an image (on push or pull), without names."""
    return {entry.rpartition("@")[2] for entry in inspected.get("RepoDigests") or []}


def runs_as_root(user: str | None) -> bool:
    """Whether an image's Config.User leaves the process as root: unset, `root` or uid 0."""
    name = (user or "").split(":", 1)[0].strip()
    return name in ROOT_NAMES


def is_under_proc(path: str, working_dir: str = "/") -> bool:
    """Whether `path` (relative ones against `working_dir`) is /proc or below it."""
    absolute = posixpath.normpath(posixpath.join("/", working_dir or "/", path))
    # normpath keeps a leading "//"; it means "/" on Linux.
    absolute = "/" + absolute.lstrip("/")
    return absolute == PROC_DIR or absolute.startswith(PROC_DIR + "/")


def proc_paths(config: dict[str, Any], executables: list[str] | None = None) -> list[str]:
    """`field path` of the working directory, PATH entries and executables under /proc."""
    working_dir = config.get("WorkingDir") or "/"
    found = []
    if is_under_proc(working_dir):
        found.append(f"WorkingDir {working_dir}")
    for entry in search_path(config):
        if is_under_proc(entry, working_dir):
            found.append(f"Env PATH entry {entry}")
    # The first element is what runs: the executable, or the shell of a shell form.
    named = [(field, (config.get(field) or [""])[0]) for field in ("Entrypoint", "Cmd")]
    named += [("ToolSpec executable", executable) for executable in executables or []]
    for field, executable in named:
        # A bare name is looked up in PATH (checked above), not under the working directory.
        if "/" in executable and is_under_proc(executable, working_dir):
            found.append(f"{field} {executable}")
    return found


def search_path(config: dict[str, Any]) -> list[str]:
    """The entries of the image's PATH variable."""
    for variable in config.get("Env") or []:
        name, _, value = variable.partition("=")
        if name == "PATH":
            return [entry for entry in value.split(":") if entry]
    return []


def proc_refusal(
    reference: str, config: dict[str, Any], executables: list[str] | None = None
) -> Refusal | None:
    """The refusal of an image whose working directory or an executable is under /proc."""
    found = proc_paths(config, executables)
    if not found:
        return None
    return Refusal(
        "image_proc_path",
        f"image {reference}: {'; '.join(found)} points into {PROC_DIR}; "
        "a tool's working directory and executables must be regular paths",
    )


def root_refusal(reference: str, config: dict[str, Any], user_named: bool) -> Refusal | None:
    """The refusal of an image that runs as root while its ToolSpec names no user."""
    user = config.get("User") or ""
    if user_named or not runs_as_root(user):
        return None
    shown = repr(user) if user else "unset"
    return Refusal(
        "image_runs_as_root",
        f"image {reference}: User is {shown}, so it would run as root, and the ToolSpec "
        "names no user; add `USER 65534:65534` to the Dockerfile or `user:` to tool.yaml",
    )
