"""The terminal verdict of a run, and its result fitted to the wire."""

from __future__ import annotations

from types import SimpleNamespace

from services.executor.model import RunOutcome
from services.executor.result import fit_result, judge
from shared.toolspec import ToolSpec
from shared.wire import ArtifactRejection, RunResult, encode

CUT = "output archive cut at 34668544 bytes"


def spec_requiring(path: str) -> ToolSpec:
    return ToolSpec.model_validate(
        {
            "name": "result-unit",
            "version": "1.0.0",
            "image": {"ref": "billy/result-unit:1"},
            "command": ["true"],
            "outputs": {"artifacts": ["**"], "required_artifacts": [path]},
        }
    )


def handoff_with(*rejected: ArtifactRejection) -> SimpleNamespace:
    # judge() reads only these three attributes of an ArtifactHandoff.
    return SimpleNamespace(stored=[], rejected=list(rejected), unavailable=None)


def test_required_artifact_cut_inside_by_the_archive_cap_is_limit_exceeded():
    cut = ArtifactRejection("report.csv", "not_collected", f"{CUT}, after 5 of 9 bytes")

    verdict = judge(RunOutcome("succeeded"), spec_requiring("report.csv"), handoff_with(cut))

    assert (verdict.status, verdict.reason, verdict.message) == (
        "limit_exceeded",
        "not_collected",
        cut.message,
    )


def test_required_artifact_after_the_archive_cut_is_limit_exceeded_not_missing():
    summary = ArtifactRejection("", "not_collected", f"{CUT}; further entries not collected")

    verdict = judge(RunOutcome("succeeded"), spec_requiring("report.csv"), handoff_with(summary))

    assert (verdict.status, verdict.reason) == ("limit_exceeded", "not_collected")
    assert verdict.message == f"report.csv: {summary.message}"


def test_required_artifact_not_written_without_a_cut_is_missing():
    verdict = judge(RunOutcome("succeeded"), spec_requiring("report.csv"), handoff_with())

    assert (verdict.status, verdict.reason) == ("failed", "missing_artifact")
    assert verdict.message == "report.csv: the tool did not write it"


def test_result_with_hostile_output_is_cut_to_fit_the_wire():
    # Control bytes encode to six bytes each in JSON: 300 KiB of them is ~1.8 MB encoded.
    result = RunResult(
        run_id="r",
        request_id="q",
        tenant="t",
        tool="x",
        status="succeeded",
        stdout="\x01" * 300_000,
        stderr="ok",
        output={"text": "\x02" * 100_000},
    )
    fitted = fit_result(result, 256 * 1024)

    assert len(encode(fitted)) <= 256 * 1024
    assert fitted.stdout_truncated
    assert "cut to" in fitted.stdout
    assert fitted.stderr == "ok"


def test_result_that_fits_is_left_as_it_is():
    result = RunResult(
        run_id="r", request_id="q", tenant="t", tool="x", status="failed", stdout="hello"
    )
    assert fit_result(result, 64 * 1024) == result
    assert not result.stdout_truncated
