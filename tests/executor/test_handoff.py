"""ArtifactHandoff with small fakes of the NATS client and the staging store: what it does
when the artifacts service cannot be used, and with paths too long to send."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.errors import ConnectionClosedError, MaxPayloadError
from nats.errors import TimeoutError as NatsTimeoutError

from services.artifacts.validation import MAX_PATH_CHARS
from services.executor.handoff import ArtifactHandoff
from services.executor.model import OutputEntry
from shared.wire import ArtifactRejection, ArtifactVerdict, encode
from tests.executor.conftest import effective_limits


@dataclass
class FakeReply:
    data: bytes


@dataclass
class FakeNats:
    """Answers each request with the next item of `answers`: an exception or reply bytes."""

    answers: list[Any] = field(default_factory=list)
    requests: int = 0

    async def request(self, subject, payload, **kwargs):
        self.requests += 1
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return FakeReply(answer)


@dataclass
class FakeStaging:
    puts: list[str] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)

    async def put(self, name, content):
        content.read()
        self.puts.append(name)

    async def delete(self, name):
        self.deletes.append(name)


@pytest.fixture
def make_handoff(make_spec):
    def make(nc: FakeNats, staging: FakeStaging) -> ArtifactHandoff:
        limits = effective_limits(make_spec(["true"]))
        return ArtifactHandoff(
            nc, staging, run_id="run-1", tenant="t", tool="test-tool", limits=limits
        )

    return make


def file_entry(path: str, data: bytes = b"x") -> tuple[OutputEntry, io.BytesIO]:
    entry = OutputEntry(path=path, raw_path=path.encode(), kind="file", size_bytes=len(data))
    return entry, io.BytesIO(data)


async def test_entries_after_the_artifacts_service_became_unavailable_are_only_counted(
    make_handoff, reporter
):
    nc, staging = FakeNats([NatsTimeoutError()]), FakeStaging()
    handoff = make_handoff(nc, staging)

    for i in range(5):
        await handoff.offer(*file_entry(f"f{i}.txt"))
    await handoff.finish(reporter)

    assert (nc.requests, staging.puts, staging.deletes) == (1, ["run-1/0"], ["run-1/0"])
    assert handoff.unavailable
    assert [(r.path, r.reason) for r in handoff.rejected] == [
        ("f0.txt", "artifacts_unavailable"),
        ("f1.txt", "artifacts_unavailable"),
    ]
    assert handoff.rejected[1].message.startswith("4 further output files not offered")
    [event] = reporter.of_type("artifact_rejected")
    assert event.data == {"path": "f1.txt", "not_offered": 4}


@pytest.mark.parametrize(
    "failure",
    [ConnectionClosedError(), MaxPayloadError(), b"not a verdict"],
    ids=["connection_closed", "max_payload", "unreadable_reply"],
)
async def test_failed_ingest_request_discards_the_staged_object_and_marks_unavailable(
    make_handoff, failure
):
    nc, staging = FakeNats([failure]), FakeStaging()
    handoff = make_handoff(nc, staging)

    await handoff.offer(*file_entry("report.csv"))

    assert staging.deletes == ["run-1/0"]
    assert handoff.unavailable
    [rejection] = handoff.rejected
    assert (rejection.path, rejection.reason) == ("report.csv", "artifacts_unavailable")


async def test_unavailable_answer_of_the_artifacts_service_stops_further_requests(make_handoff):
    unavailable = ArtifactRejection("a.txt", "artifacts_unavailable", "artifacts put failed")
    nc = FakeNats([encode(ArtifactVerdict(stored=False, rejection=unavailable))])
    handoff = make_handoff(nc, FakeStaging())

    await handoff.offer(*file_entry("a.txt"))
    await handoff.offer(*file_entry("b.txt"))

    assert nc.requests == 1
    assert handoff.unavailable == "artifacts put failed"


async def test_path_longer_than_the_limit_is_refused_without_a_request(make_handoff, reporter):
    nc, staging = FakeNats(), FakeStaging()
    handoff = make_handoff(nc, staging)
    path = "d/" * 50_000 + "f.txt"

    await handoff.offer(*file_entry(path))
    await handoff.finish(reporter)

    assert (nc.requests, staging.puts) == (0, [])
    [rejection] = handoff.rejected
    assert rejection.reason == "invalid_path"
    assert rejection.path == path[:MAX_PATH_CHARS]
    assert str(len(path)) in rejection.message
    [event] = reporter.of_type("artifact_rejected")
    assert event.reason == "invalid_path"
    assert len(event.data["path"]) == MAX_PATH_CHARS
