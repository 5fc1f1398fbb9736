"""Errors of the admission service; each one becomes an AdmissionReply."""

from __future__ import annotations

from typing import Literal

from shared.errors import BillyToolsError
from shared.wire import AdmissionReply, ArgumentError


class AdmissionError(BillyToolsError):
    """Root of the admission service's errors: a reason and a reply status."""

    status: Literal["rejected", "error"] = "rejected"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def reply(self) -> AdmissionReply:
        """The AdmissionReply that tells the client about this error."""
        return AdmissionReply(status=self.status, reason=self.reason, message=self.message)


class RequestRejected(AdmissionError):
    """The request breaks its ToolSpec or our bounds; sending it again will not help."""


class InvalidArguments(RequestRejected):
    """The arguments fail the tool's schema or placeholders; `errors` lists every place."""

    def __init__(self, message: str, errors: list[ArgumentError]) -> None:
        super().__init__("invalid_arguments", message)
        self.errors = errors

    def reply(self) -> AdmissionReply:
        reply = super().reply()
        reply.errors = list(self.errors)
        return reply


class MalformedRequest(AdmissionError):
    """The request is not a RunRequest at all (bad JSON, wrong types, unknown fields)."""

    status = "error"

    def __init__(self, message: str) -> None:
        super().__init__("malformed_request", message)


class AdmissionUnavailable(AdmissionError):
    """NATS or JetStream failed us; the same request may succeed when sent again."""

    status = "error"
