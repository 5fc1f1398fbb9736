"""From what the runner observed to the run's one terminal RunResult.

The runner reports how the container ended; this module adds what the ToolSpec asks of
the outputs: stdout parsed as JSON (and checked against its schema), required artifacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jsonschema

from services.executor.handoff import ArtifactHandoff
from services.executor.model import RunOutcome
from shared.toolspec import ToolSpec
from shared.wire import RunResult, WorkItem, encode

# Rejections that mean a limit was hit, as opposed to a file the tool should not make;
# not_collected: the output archive cap cut it.
LIMIT_REASONS = frozenset({"too_large", "too_many", "total_too_large", "not_collected"})


@dataclass
class Verdict:
    status: str
    reason: str | None
    message: str | None
    output: Any = None


def judge(outcome: RunOutcome, spec: ToolSpec, handoff: ArtifactHandoff) -> Verdict:
    """The terminal status: the container's, then the outputs' requirements."""
    if outcome.status != "succeeded":
        return Verdict(outcome.status, outcome.reason, outcome.message)
    if handoff.unavailable:
        return Verdict("infra_error", "artifacts_unavailable", handoff.unavailable)

    output = None
    if spec.outputs.stdout == "json":
        if outcome.stdout_truncated:
            return Verdict(
                "limit_exceeded",
                "stdout_bytes",
                f"JSON output of {outcome.stdout_bytes} bytes exceeds the limit of "
                f"{len(outcome.stdout)}",
            )
        try:
            output = json.loads(outcome.stdout)
        except ValueError as exc:
            return Verdict("failed", "invalid_output", f"stdout is not valid JSON: {exc}")
        if spec.outputs.stdout_schema is not None:
            problem = _schema_problem(output, spec.outputs.stdout_schema)
            if problem:
                return Verdict("failed", "output_schema", problem, output)

    stored = {ref.path for ref in handoff.stored}
    for required in spec.outputs.required_artifacts:
        if required in stored:
            continue
        rejection = next((r for r in handoff.rejected if r.path == required), None)
        if rejection is None:
            # Perhaps beyond the archive cut: the one rejection without a path says so.
            rejection = next((r for r in handoff.rejected if r.path == ""), None)
        if rejection is not None and rejection.reason in LIMIT_REASONS:
            message = rejection.message
            if rejection.path != required:
                message = f"{required}: {message}"
            return Verdict("limit_exceeded", rejection.reason, message, output)
        why = rejection.message if rejection else "the tool did not write it"
        return Verdict("failed", "missing_artifact", f"{required}: {why}", output)
    return Verdict("succeeded", None, None, output)


def _schema_problem(output: Any, schema: dict[str, Any]) -> str | None:
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(output))
    if error is None:
        return None
    where = "/" + "/".join(str(p) for p in error.absolute_path)
    return f"output at {where}: {error.message}"


def build_result(
    item: WorkItem,
    outcome: RunOutcome,
    verdict: Verdict,
    handoff: ArtifactHandoff,
    *,
    executor: str,
    trace_id: str | None,
    finished_at: float,
) -> RunResult:
    return RunResult(
        run_id=item.run_id,
        request_id=item.request_id,
        tenant=item.tenant,
        tool=item.tool,
        status=verdict.status,
        reason=verdict.reason,
        message=verdict.message,
        exit_code=outcome.exit_code,
        stdout=_text(outcome.stdout, outcome.stdout_truncated, outcome.stdout_bytes),
        stderr=_text(outcome.stderr, outcome.stderr_truncated, outcome.stderr_bytes),
        stdout_truncated=outcome.stdout_truncated,
        stderr_truncated=outcome.stderr_truncated,
        stdout_bytes=outcome.stdout_bytes,
        stderr_bytes=outcome.stderr_bytes,
        output=verdict.output,
        artifacts=list(handoff.stored),
        rejected_artifacts=list(handoff.rejected),
        timings=outcome.timings,
        executor=executor,
        trace_id=trace_id,
        finished_at=finished_at,
    )


def _text(data: bytes, truncated: bool, total_bytes: int) -> str:
    text = data.decode("utf-8", errors="replace")
    if truncated:
        text += f"\n[billy: truncated after {len(data)} of {total_bytes} bytes]\n"
    return text


def fit_result(result: RunResult, max_bytes: int) -> RunResult:
    """The result cut down until it encodes within `max_bytes`.

    A tool controls what its output encodes to (a control byte becomes six bytes of JSON),
    and the result travels whole in the ledger and the finished event, both bounded by the
    server's max_payload: halve the longer of stdout and stderr, then drop the parsed
    output, until it fits.
    """
    for _ in range(64):
        if len(encode(result)) <= max_bytes:
            return result
        longer = "stdout" if len(result.stdout) >= len(result.stderr) else "stderr"
        text = getattr(result, longer)
        if len(text) > 1024:
            kept = len(text) // 2
            setattr(result, longer, text[:kept] + f"\n[billy: cut to {kept} characters to fit]\n")
            setattr(result, f"{longer}_truncated", True)
        elif result.output is not None:
            result.output = None
            result.message = (result.message or "") + " (parsed output too large to keep)"
        else:
            break
    return result
