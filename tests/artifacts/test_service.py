"""The artifacts service against a real nats-server: store, hash, reject, keep serving."""

from __future__ import annotations

import hashlib
import threading
import uuid

import pytest
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError, ServiceUnavailableError

from services.artifacts import store as store_module
from services.artifacts.service import ArtifactsService
from shared import jetstream, subjects
from shared.wire import (
    ArtifactIngest,
    ArtifactLimits,
    ArtifactVerdict,
    RunEvent,
    decode,
    encode,
)

LIMITS = ArtifactLimits(artifact_bytes=1 << 20, artifacts_total_bytes=2 << 20, artifact_count=4)


@pytest.fixture(scope="module")
async def artifacts_service(settings):
    service = ArtifactsService(settings)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture(scope="module")
async def nats(settings):
    nc = await jetstream.connect(settings, "test-artifacts")
    js, buckets = await jetstream.declare(nc, settings)
    try:
        yield nc, js, buckets
    finally:
        await nc.close()


def make_ingest(run_id: str, **fields) -> ArtifactIngest:
    base = dict(
        run_id=run_id,
        tenant="acme",
        tool="shell",
        path="out.bin",
        kind="file",
        size_bytes=0,
        index=0,
        limits=LIMITS,
        stored_count=0,
        stored_bytes=0,
    )
    return ArtifactIngest(**{**base, **fields})


async def ingest(nc, message: ArtifactIngest) -> ArtifactVerdict:
    reply = await nc.request(subjects.ARTIFACT_INGEST_SUBJECT, encode(message), timeout=10)
    return decode(reply.data, ArtifactVerdict)


async def events_of(js, tenant: str, run_id: str) -> list[RunEvent]:
    sub = await js.subscribe(subjects.events_subject(tenant, run_id), ordered_consumer=True)
    found = []
    try:
        while True:
            msg = await sub.next_msg(timeout=1)
            found.append(decode(msg.data, RunEvent))
    except Exception:
        pass
    finally:
        await sub.unsubscribe()
    return found


async def test_staged_artifact_is_stored_with_its_sha256_and_event(artifacts_service, nats):
    nc, js, buckets = nats
    run_id = uuid.uuid4().hex
    data = b"col1,col2\n" * 5000
    await buckets.staging.put(f"{run_id}/0", data)

    verdict = await ingest(
        nc,
        make_ingest(run_id, path="tables/report.csv", size_bytes=len(data), staged=f"{run_id}/0"),
    )

    assert verdict.stored
    assert verdict.ref.sha256 == hashlib.sha256(data).hexdigest()
    assert verdict.ref.object == f"{run_id}/tables/report.csv"
    stored = await buckets.artifacts.get(verdict.ref.object)
    assert stored.data == data
    with pytest.raises(NotFoundError):
        await buckets.staging.get_info(f"{run_id}/0")
    events = await events_of(js, "acme", run_id)
    assert [e.type for e in events] == ["artifact_stored"]
    assert events[0].data["sha256"] == verdict.ref.sha256


async def test_symlink_is_rejected_with_an_event_and_nothing_stored(artifacts_service, nats):
    nc, js, buckets = nats
    run_id = uuid.uuid4().hex

    verdict = await ingest(
        nc, make_ingest(run_id, path="passwd", kind="symlink", link_target="/etc/passwd")
    )

    assert not verdict.stored
    assert verdict.rejection.reason == "not_a_regular_file"
    with pytest.raises(NotFoundError):
        await buckets.artifacts.get_info(f"{run_id}/passwd")
    events = await events_of(js, "acme", run_id)
    assert [(e.type, e.reason) for e in events] == [("artifact_rejected", "not_a_regular_file")]


async def test_staged_size_differing_from_the_announced_size_is_rejected(artifacts_service, nats):
    nc, _, buckets = nats
    run_id = uuid.uuid4().hex
    await buckets.staging.put(f"{run_id}/0", b"12345")

    verdict = await ingest(nc, make_ingest(run_id, size_bytes=3, staged=f"{run_id}/0"))

    assert not verdict.stored
    assert verdict.rejection.reason == "not_received"
    assert "5 bytes" in verdict.rejection.message


async def test_malformed_ingest_gets_an_answer_and_the_service_keeps_serving(
    artifacts_service, nats
):
    nc, _, buckets = nats
    reply = await nc.request(subjects.ARTIFACT_INGEST_SUBJECT, b"{not json", timeout=5)
    verdict = decode(reply.data, ArtifactVerdict)
    assert verdict.rejection.reason == "malformed_ingest"

    run_id = uuid.uuid4().hex
    await buckets.staging.put(f"{run_id}/0", b"ok")
    assert (await ingest(nc, make_ingest(run_id, size_bytes=2, staged=f"{run_id}/0"))).stored


async def handled(service: ArtifactsService, nc, message: ArtifactIngest) -> ArtifactVerdict:
    """The verdict of this replica itself (another may share the queue group in a session)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        msg = Msg(nc, subject=subjects.ARTIFACT_INGEST_SUBJECT, reply=inbox, data=encode(message))
        await service._handle(msg)
        reply = await sub.next_msg(timeout=5)
    finally:
        await sub.unsubscribe()
    return decode(reply.data, ArtifactVerdict)


async def test_failing_artifacts_put_answers_unavailable_and_discards_the_staged_object(
    artifacts_service, nats, monkeypatch
):
    nc, _, buckets = nats
    run_id = uuid.uuid4().hex
    await buckets.staging.put(f"{run_id}/0", b"data")

    async def put_failing(*args, **kwargs):
        raise ServiceUnavailableError()

    monkeypatch.setattr(artifacts_service._store._artifacts, "put", put_failing)
    message = make_ingest(run_id, size_bytes=4, staged=f"{run_id}/0")
    verdict = await handled(artifacts_service, nc, message)

    assert not verdict.stored
    assert verdict.rejection.reason == "artifacts_unavailable"
    assert "ServiceUnavailableError" in verdict.rejection.message
    with pytest.raises(NotFoundError):
        await buckets.staging.get_info(f"{run_id}/0")


async def test_stored_artifact_whose_event_cannot_be_emitted_is_still_answered_stored(
    artifacts_service, nats, monkeypatch
):
    nc, _, buckets = nats
    run_id = uuid.uuid4().hex
    await buckets.staging.put(f"{run_id}/0", b"data")

    async def emit_failing(*args, **kwargs):
        raise NatsTimeoutError()

    monkeypatch.setattr(artifacts_service._events, "emit", emit_failing)
    message = make_ingest(run_id, size_bytes=4, staged=f"{run_id}/0")
    verdict = await handled(artifacts_service, nc, message)

    assert verdict.stored
    assert (await buckets.artifacts.get(verdict.ref.object)).data == b"data"


async def test_sha256_is_computed_off_the_event_loop_thread(nats, monkeypatch):
    _, _, buckets = nats
    run_id = uuid.uuid4().hex
    data = b"x" * 300_000
    await buckets.staging.put(f"{run_id}/0", data)
    hashing_threads = []
    real_sha256_of = store_module._sha256_of

    def recording_sha256_of(spool):
        hashing_threads.append(threading.get_ident())
        return real_sha256_of(spool)

    monkeypatch.setattr(store_module, "_sha256_of", recording_sha256_of)
    store = store_module.ArtifactStore(buckets.staging, buckets.artifacts)
    ref = await store.promote(f"{run_id}/0", run_id, "big.bin", len(data))

    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert len(hashing_threads) == 1
    assert hashing_threads[0] != threading.get_ident()
