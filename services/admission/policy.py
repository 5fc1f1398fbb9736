"""The operator policy at admission: tools it refuses to serve, requests beyond its caps."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from services.admission.errors import RequestRejected
from shared.operator_policy import OperatorPolicy, describe
from shared.toolspec import ToolSpec
from shared.wire import RequestedLimits

logger = logging.getLogger(__name__)

POLICY_VIOLATION = "policy_violation"


def served_and_refused(
    specs: Iterable[ToolSpec], policy: OperatorPolicy
) -> tuple[list[ToolSpec], dict[str, str]]:
    """The ToolSpecs within the policy, and why each of the others is refused, by tool."""
    served: list[ToolSpec] = []
    refused: dict[str, str] = {}
    for spec in specs:
        violations = policy.check_toolspec(spec)
        if not violations:
            served.append(spec)
            continue
        for violation in violations:
            logger.warning(
                "tool_refused tool=%s field=%s asked=%s allowed=%s policy=%s",
                spec.name,
                violation.field,
                violation.asked,
                violation.allowed,
                policy.source,
            )
        refused[spec.name] = (
            f"tool {spec.name} is not served: its ToolSpec asks for more than the operator "
            f"policy ({policy.source}) allows: {describe(violations)}"
        )
    return served, refused


def check_requested_limits(
    policy: OperatorPolicy, spec: ToolSpec, requested: RequestedLimits | None
) -> None:
    """Reject a request whose limits pass the operator's caps for the tool."""
    if requested is None:
        return
    violations = policy.check_requested(spec.name, requested)
    if violations:
        raise RequestRejected(
            POLICY_VIOLATION,
            f"requested limits for tool {spec.name} exceed the operator policy "
            f"({policy.source}): {describe(violations)}",
        )
