"""BillyToolsClient against a real nats-server, the real admission, executor and artifacts
services (in this process) and the real Docker daemon, running the test tools."""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from pathlib import Path

import aiodocker
import pytest

from shared import subjects
from shared.client import (
    AdmissionUnavailable,
    ArtifactNotFound,
    BillyToolsClient,
    InvalidRunId,
    NatsUnavailable,
    ResultTimeout,
    RunRejected,
    UnsafeArtifactPath,
    safe_artifact_path,
)
from shared.images import build_images
from shared.settings import Settings
from shared.toolspec import ToolCatalog
from shared.wire import ArtifactRef
from tests.conftest import (
    TEST_TOOLS_DIR,
    NatsServer,
    free_port,
    managed_leftovers,
    running_nats,
    whole_stack,
)

RESULT_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def client_nats(tmp_path_factory: pytest.TempPathFactory):
    """A nats-server of this module's own, so that no other test's services answer here."""
    with running_nats(tmp_path_factory.mktemp("client-nats")) as server:
        yield server


@pytest.fixture(scope="module")
def client_settings(client_nats: NatsServer, tmp_path_factory) -> Settings:
    return Settings(
        nats_url=client_nats.url,
        tools_dir=TEST_TOOLS_DIR,
        state_dir=tmp_path_factory.mktemp("client-state"),
        executor_name=f"test-client-{uuid.uuid4().hex[:8]}",
        executor_concurrency=2,
        executor_ack_wait_s=10,
        executor_progress_interval_s=2,
        docker_retry_interval_s=0.5,
    )


async def ensure_test_images(docker: aiodocker.Docker, settings: Settings) -> None:
    """Build the echo and shell test images when they are missing (no registry here)."""
    catalog = ToolCatalog.load(TEST_TOOLS_DIR)
    for tool in ("echo", "shell"):
        try:
            await docker.images.inspect(catalog.get(tool).image.ref)
        except aiodocker.DockerError:
            await build_images([TEST_TOOLS_DIR], {tool}, False, settings)


@pytest.fixture(scope="module")
async def services(client_settings: Settings, docker: aiodocker.Docker):
    """Admission, artifacts and an executor, started in order and stopped in reverse."""
    await ensure_test_images(docker, client_settings)
    catalog = ToolCatalog.load(TEST_TOOLS_DIR)
    async with whole_stack(client_settings, catalog) as started:
        yield started
    leftovers = await managed_leftovers(docker, client_settings.executor_name)
    assert leftovers == {"containers": [], "volumes": [], "networks": []}


@pytest.fixture
async def client(services, client_settings: Settings):
    async with BillyToolsClient.connect(client_settings) as connected:
        yield connected


def tenant() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


# -- submit, result, events -------------------------------------------------------------


async def test_submit_then_result_returns_echo_stdout_and_succeeded(client):
    reply = await client.submit("echo", {"message": "hello billy"}, tenant=tenant())

    result = await client.result(reply.run_id, timeout_s=RESULT_TIMEOUT_S)

    assert reply.status == "queued"
    assert result.run_id == reply.run_id
    assert result.status == "succeeded"
    assert result.exit_code == 0
    assert result.stdout == "hello billy\n"
    assert result.trace_id == reply.trace_id


async def test_run_returns_the_result_and_get_run_the_terminal_record(client):
    result = await client.run("echo", {"message": "x"}, result_timeout_s=RESULT_TIMEOUT_S)

    record = await client.get_run(result.run_id)

    assert result.status == "succeeded"
    assert record is not None
    assert record.status == "succeeded"
    assert record.result.stdout == "x\n"


async def test_submit_carries_the_callers_traceparent_into_the_run(client):
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"

    reply = await client.submit("echo", {"message": "traced"}, traceparent=traceparent)
    result = await client.result(reply.run_id, timeout_s=RESULT_TIMEOUT_S)

    assert reply.trace_id == trace_id
    assert result.trace_id == trace_id


async def test_events_replay_from_the_first_event_after_the_run_finished(client):
    reply = await client.submit("echo", {"message": "replay"})
    await client.result(reply.run_id, timeout_s=RESULT_TIMEOUT_S)

    async with asyncio.timeout(10):
        events = [event async for event in client.events(reply.run_id)]

    types = [event.type for event in events]
    assert types[0] == "queued"
    assert types[-1] == "finished"
    assert {"container_started", "exited", "container_removed"} <= set(types)
    assert {event.run_id for event in events} == {reply.run_id}
    assert events[-1].status == "succeeded"


async def test_events_follow_a_live_run_and_stop_after_finished(client):
    reply = await client.submit("shell", {"script": "echo working; echo done"})

    async with asyncio.timeout(RESULT_TIMEOUT_S):
        events = [event async for event in client.events(reply.run_id)]

    assert events[-1].type == "finished"
    assert [e.type for e in events].count("finished") == 1


async def test_events_without_run_id_follow_new_runs_of_one_tenant(client):
    own_tenant = tenant()
    seen = []

    async with await client.open_events(tenant=own_tenant) as stream:
        await client.submit("echo", {"message": "other"}, tenant=tenant())
        reply = await client.submit("echo", {"message": "mine"}, tenant=own_tenant)
        async with asyncio.timeout(RESULT_TIMEOUT_S):
            async for event in stream:
                seen.append(event)
                if event.type == "finished":
                    break

    assert seen[0].type == "queued"
    assert {event.tenant for event in seen} == {own_tenant}
    assert {event.run_id for event in seen} == {reply.run_id}


async def test_events_without_follow_stop_once_caught_up(client):
    reply = await client.submit("echo", {"message": "caught up"})
    async with asyncio.timeout(RESULT_TIMEOUT_S):
        followed = [e.type async for e in client.events(reply.run_id)]

    async with asyncio.timeout(10):
        replayed = [e.type async for e in client.events(reply.run_id, follow=False)]
        unknown = [e async for e in client.events(uuid.uuid4().hex, follow=False)]

    assert replayed == followed
    assert unknown == []


# -- errors -----------------------------------------------------------------------------


async def test_submit_with_invalid_arguments_raises_run_rejected_with_each_path(client):
    with pytest.raises(RunRejected) as caught:
        await client.submit("echo", {"message": 5, "extra": True})

    paths = {error.path for error in caught.value.errors}
    assert caught.value.reason == "invalid_arguments"
    assert "/message" in paths
    assert "invalid_arguments" in str(caught.value)


async def test_submit_of_an_unknown_tool_raises_run_rejected(client):
    with pytest.raises(RunRejected) as caught:
        await client.submit("no-such-tool", {})

    assert "no-such-tool" in str(caught.value)


async def test_submit_without_admission_raises_admission_unavailable(tmp_path):
    server = NatsServer(tmp_path)
    server.start()
    try:
        async with BillyToolsClient.connect(Settings(nats_url=server.url)) as client:
            with pytest.raises(AdmissionUnavailable, match=subjects.SUBMIT_SUBJECT):
                await client.submit("echo", {"message": "nobody listens"})
            with pytest.raises(AdmissionUnavailable, match=subjects.TOOLS_SUBJECT):
                await client.tools()
    finally:
        server.stop()


async def test_connect_to_a_closed_port_raises_nats_unavailable_naming_the_url():
    url = f"nats://127.0.0.1:{free_port()}"

    with pytest.raises(NatsUnavailable, match=url):
        await BillyToolsClient.connect(Settings(nats_url=url))


async def test_result_of_an_unknown_run_times_out_with_a_clear_error(client):
    run_id = uuid.uuid4().hex

    with pytest.raises(ResultTimeout, match=f"run {run_id} not finished within 0.3 s"):
        await client.result(run_id, timeout_s=0.3)


async def test_get_run_of_an_unknown_run_is_none(client):
    assert await client.get_run(uuid.uuid4().hex) is None


async def test_tools_lists_the_test_tools_with_their_schemas(client):
    tool_list = await client.tools()

    by_name = {tool.name: tool for tool in tool_list.tools}
    assert {"echo", "shell"} <= set(by_name)
    assert by_name["echo"].arguments_schema["required"] == ["message"]


# -- artifacts --------------------------------------------------------------------------

WRITE_ARTIFACTS = (
    "mkdir -p /workspace/out/sub && printf 'alpha' > /workspace/out/a.txt && "
    "head -c 40000 /dev/zero | tr '\\0' 'z' > /workspace/out/sub/big.txt"
)


@pytest.fixture(scope="module")
async def artifact_run(services, client_settings):
    async with BillyToolsClient.connect(client_settings) as connected:
        return await connected.run(
            "shell", {"script": WRITE_ARTIFACTS}, result_timeout_s=RESULT_TIMEOUT_S
        )


async def test_artifacts_lists_the_stored_artifacts_of_a_run(client, artifact_run):
    refs = await client.artifacts(artifact_run.run_id)

    assert artifact_run.status == "succeeded"
    by_path = {ref.path: ref for ref in refs}
    assert set(by_path) == {"a.txt", "sub/big.txt"}
    assert by_path["a.txt"].sha256 == hashlib.sha256(b"alpha").hexdigest()
    assert by_path["sub/big.txt"].size_bytes == 40000


async def test_fetch_artifact_streams_it_into_dest_matching_its_sha256(
    client, artifact_run, tmp_path
):
    dest = tmp_path / "nested" / "big.txt"

    ref = await client.fetch_artifact(artifact_run.run_id, "sub/big.txt", dest)

    assert dest.read_bytes() == b"z" * 40000
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == ref.sha256
    assert not list(tmp_path.rglob("*.part"))


async def test_fetch_artifact_of_an_unknown_path_names_the_stored_ones(
    client, artifact_run, tmp_path
):
    with pytest.raises(ArtifactNotFound, match=re.escape("a.txt")):
        await client.fetch_artifact(artifact_run.run_id, "missing.txt", tmp_path / "x")

    assert not (tmp_path / "x").exists()


async def test_save_artifacts_saves_safe_paths_and_refuses_escaping_ones(
    client, artifact_run, tmp_path
):
    out_dir = tmp_path / "out"
    real = next(ref for ref in artifact_run.artifacts if ref.path == "a.txt")
    hostile = ArtifactRef(
        path="../escaped.txt",
        size_bytes=real.size_bytes,
        sha256=real.sha256,
        bucket=real.bucket,
        object=real.object,
    )

    saved = await client.save_artifacts(artifact_run.run_id, out_dir, [real, hostile])

    assert [path for _, path in saved.saved] == [(out_dir / "a.txt").resolve()]
    assert (out_dir / "a.txt").read_bytes() == b"alpha"
    assert [ref.path for ref, _ in saved.refused] == ["../escaped.txt"]
    assert not (tmp_path / "escaped.txt").exists()


async def test_save_artifacts_into_an_existing_file_reports_it_instead_of_raising(
    client, artifact_run, tmp_path
):
    not_a_dir = tmp_path / "taken"
    not_a_dir.write_text("already here")

    saved = await client.save_artifacts(artifact_run.run_id, not_a_dir)

    assert saved.saved == []
    assert sorted(ref.path for ref, _ in saved.refused) == ["a.txt", "sub/big.txt"]
    assert all(f"cannot write artifact {ref.path!r}" in why for ref, why in saved.refused)
    assert not_a_dir.read_text() == "already here"


# -- run ids ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a.b", "*", ">", "a b", "", "run\t1", "x" * 129])
async def test_methods_taking_a_run_id_refuse_one_that_is_not_a_subject_token(client, bad):
    with pytest.raises(InvalidRunId, match="is not valid"):
        await client.get_run(bad)
    with pytest.raises(InvalidRunId):
        await client.result(bad, timeout_s=0.3)
    with pytest.raises(InvalidRunId):
        await client.artifacts(bad)
    with pytest.raises(InvalidRunId):
        await client.open_events(bad)


# -- safe artifact paths (unit) ---------------------------------------------------------


@pytest.mark.parametrize(
    "hostile",
    [
        "../x",
        "a/../../x",
        "..",
        ".",
        "a/./b",
        "/etc/passwd",
        "",
        "a\x00b",
        "a\nb",
        "..\\..\\x",
        "a/" + "n" * 256,
    ],
)
def test_safe_artifact_path_refuses_paths_leaving_the_out_dir(tmp_path, hostile):
    with pytest.raises(UnsafeArtifactPath):
        safe_artifact_path(tmp_path, hostile)


def test_safe_artifact_path_refuses_a_symlink_planted_in_the_out_dir(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "link").symlink_to(tmp_path)

    with pytest.raises(UnsafeArtifactPath, match="resolves outside"):
        safe_artifact_path(out_dir, "link/x.txt")


@pytest.mark.parametrize("name", ["a.txt", "d/e/f.txt", "..hidden", "ünï code.txt", "a..b"])
def test_safe_artifact_path_keeps_ordinary_names_under_the_out_dir(tmp_path, name):
    target = safe_artifact_path(tmp_path, name)

    assert target.is_relative_to(tmp_path.resolve())
    assert target == (tmp_path / Path(name)).resolve()
