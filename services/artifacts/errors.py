"""Errors of the artifacts service."""

from shared.errors import BillyToolsError


class ArtifactsError(BillyToolsError):
    """Root of the artifacts service's errors."""


class StagedObjectError(ArtifactsError):
    """The staged bytes of an artifact are missing or differ from what was announced."""

    def __init__(self, staged: str, message: str) -> None:
        super().__init__(f"staged object {staged}: {message}")
        self.staged = staged
