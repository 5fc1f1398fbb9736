"""Artifact rules: what may be stored. Pure functions, applied to every ArtifactIngest.

The executor applies the size rules early too, only to avoid moving bytes that would be
refused; the decision, and the event that reports it, are made here.
"""

from __future__ import annotations

import unicodedata

from shared.wire import ArtifactIngest, ArtifactRejection

MAX_PATH_CHARS = 1024
MAX_PATH_DEPTH = 32


def path_problem(path: str) -> str | None:
    """Why `path` is not a safe relative artifact path, or None when it is."""
    if not path:
        return "empty path"
    if len(path) > MAX_PATH_CHARS:
        return f"path has {len(path)} characters; the limit is {MAX_PATH_CHARS}"
    if "\ufffd" in path:
        return "path is not valid UTF-8"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in path):
        return "path contains a control or format character"
    if path.startswith("/") or "\\" in path:
        return "path must be relative and use '/'"
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "path has an empty, '.' or '..' component"
    if len(parts) > MAX_PATH_DEPTH:
        return f"path is {len(parts)} levels deep; the limit is {MAX_PATH_DEPTH}"
    return None


def rejection_of(ingest: ArtifactIngest) -> ArtifactRejection | None:
    """The reason `ingest` must not be stored, or None when it may be."""
    limits = ingest.limits

    def reject(reason: str, message: str) -> ArtifactRejection:
        return ArtifactRejection(path=ingest.path, reason=reason, message=message)

    problem = path_problem(ingest.path)
    if problem:
        return reject("invalid_path", problem)
    if ingest.kind != "file":
        target = f" -> {ingest.link_target}" if ingest.link_target else ""
        return reject("not_a_regular_file", f"{ingest.kind}{target} is not a regular file")
    if ingest.size_bytes > limits.artifact_bytes:
        return reject(
            "too_large",
            f"{ingest.size_bytes} bytes exceeds the limit of {limits.artifact_bytes} per file",
        )
    if ingest.stored_count + 1 > limits.artifact_count:
        return reject(
            "too_many", f"run already stored {ingest.stored_count} of {limits.artifact_count}"
        )
    if ingest.stored_bytes + ingest.size_bytes > limits.artifacts_total_bytes:
        return reject(
            "total_too_large",
            f"{ingest.stored_bytes} + {ingest.size_bytes} bytes exceeds the run's limit of "
            f"{limits.artifacts_total_bytes}",
        )
    if ingest.staged is None:
        return reject("not_received", "the executor did not send the file's bytes")
    return None
