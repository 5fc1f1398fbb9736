"""Artifact rules, as pure functions."""

import pytest

from services.artifacts.validation import path_problem, rejection_of
from shared.wire import ArtifactIngest, ArtifactLimits

LIMITS = ArtifactLimits(artifact_bytes=100, artifacts_total_bytes=250, artifact_count=3)


def ingest(**fields) -> ArtifactIngest:
    base = dict(
        run_id="r1",
        tenant="t",
        tool="x",
        path="report.csv",
        kind="file",
        size_bytes=10,
        index=0,
        limits=LIMITS,
        stored_count=0,
        stored_bytes=0,
        staged="r1/0",
    )
    return ArtifactIngest(**{**base, **fields})


@pytest.mark.parametrize(
    "path", ["../etc/passwd", "/etc/passwd", "a/../../b", "a//b", "./a", "", "a\nb", "a\ufffdb"]
)
def test_unsafe_paths_are_refused(path):
    assert path_problem(path) is not None
    assert rejection_of(ingest(path=path)).reason == "invalid_path"


@pytest.mark.parametrize("path", ["report.csv", "sub/dir/file.txt", "ünïcode.md", "a b.txt"])
def test_safe_paths_are_accepted(path):
    assert path_problem(path) is None
    assert rejection_of(ingest(path=path)) is None


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "device", "dir", "other"])
def test_anything_but_a_regular_file_is_refused(kind):
    rejection = rejection_of(ingest(kind=kind, staged=None, link_target="/etc/passwd"))
    assert rejection.reason == "not_a_regular_file"
    assert kind in rejection.message


def test_file_over_per_file_limit_is_refused_with_the_numbers():
    rejection = rejection_of(ingest(size_bytes=101))
    assert rejection.reason == "too_large"
    assert "101" in rejection.message
    assert "100" in rejection.message


def test_file_at_exactly_the_limit_is_accepted():
    assert rejection_of(ingest(size_bytes=100)) is None


def test_count_and_total_limits_are_enforced():
    assert rejection_of(ingest(stored_count=3)).reason == "too_many"
    assert rejection_of(ingest(stored_count=2, stored_bytes=200, size_bytes=60)).reason == (
        "total_too_large"
    )


def test_regular_file_without_bytes_is_refused_as_not_received():
    assert rejection_of(ingest(staged=None)).reason == "not_received"
