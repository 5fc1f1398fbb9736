"""Nothing is lost when the infrastructure misbehaves: Docker away, NATS restarted.

Each test runs its own nats-server and services, so that it can break them freely.
"""

from __future__ import annotations

import asyncio

import pytest

from services.admission.service import AdmissionService
from services.artifacts.service import ArtifactsService
from services.executor import service as executor_service
from services.executor.service import ExecutorService
from shared import subjects
from shared.client import BillyToolsClient
from shared.settings import Settings
from shared.wire import RequestedLimits
from tests.conftest import (
    NatsServer,
    collect_events,
    managed_leftovers,
    running,
    running_nats,
    session_executor_name,
    wait_for,
)


@pytest.fixture
def private_nats(tmp_path):
    with running_nats(tmp_path) as server:
        yield server


def settings_for(server: NatsServer, settings: Settings, **changes) -> Settings:
    return settings.model_copy(
        update={
            "nats_url": server.url,
            "executor_name": session_executor_name("resilience"),
            **changes,
        }
    )


async def test_runs_wait_while_docker_is_unavailable_and_finish_once_it_is_back(
    private_nats, settings, catalog, docker
):
    healthy = settings_for(private_nats, settings)
    no_docker = healthy.model_copy(
        update={
            "executor_name": session_executor_name("resilience"),
            "docker_host": "unix:///nonexistent/docker.sock",
        }
    )
    blind = ExecutorService(no_docker)
    async with (
        running(ArtifactsService(healthy), AdmissionService(healthy, catalog), blind),
        BillyToolsClient.connect(healthy) as client,
    ):
        reply = await client.submit("echo", {"message": "waited"})

        # The executor without Docker has looked and found it away: it must not take work.
        await wait_for(lambda: blind._docker_up is False, timeout_s=10)
        # A negative check: give it several chances to (wrongly) fetch before looking.
        await asyncio.sleep(3 * no_docker.docker_retry_interval_s)
        record = await client.get_run(reply.run_id)
        assert record.status == "queued"
        info = await client.nc.jetstream().consumer_info(
            subjects.WORK_STREAM, subjects.EXECUTOR_CONSUMER
        )
        assert info.num_pending + info.num_ack_pending == 1
        assert info.num_ack_pending == 0

        # An executor that has Docker takes the run that waited.
        async with running(ExecutorService(healthy)):
            result = await client.result(reply.run_id, timeout_s=60)
    assert result.status == "succeeded"
    assert result.executor == healthy.executor_name
    assert "waited" in result.stdout
    assert await managed_leftovers(docker, healthy.executor_name) == {
        "containers": [],
        "volumes": [],
        "networks": [],
    }


async def test_a_run_in_progress_survives_a_nats_server_restart(private_nats, settings, catalog):
    local = settings_for(private_nats, settings)
    async with (
        running(ArtifactsService(local), AdmissionService(local, catalog), ExecutorService(local)),
        BillyToolsClient.connect(local) as client,
    ):
        reply = await client.submit("shell", {"script": "sleep 2; echo after-restart"})
        await wait_for(
            lambda: _status_is(client, reply.run_id, "running"), timeout_s=30, interval_s=0.1
        )

        private_nats.stop()
        private_nats.start()  # same port, same JetStream store

        result = await _result_after_reconnect(client, reply.run_id)
        events = await collect_events(client, reply.run_id)

        # The stack serves new runs after the restart as well.
        after = await client.run("echo", {"message": "fresh"}, result_timeout_s=60)
    assert result.status == "succeeded", (result.reason, result.message)
    assert "after-restart" in result.stdout
    assert [e.type for e in events].count("finished") == 1
    assert after.status == "succeeded"


async def _status_is(client: BillyToolsClient, run_id: str, status: str) -> bool:
    record = await client.get_run(run_id)
    return record is not None and record.status == status


async def _result_after_reconnect(client: BillyToolsClient, run_id: str):
    # The client reconnects on its own; requests made while it does may time out.
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        try:
            return await client.result(run_id, timeout_s=30)
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


class NeverAnsweringRunner:
    """A runner stuck in a call that never returns, as a hung Docker daemon would leave it."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def run(self, context, reporter, sink):
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()


async def test_a_run_stuck_past_every_limit_is_stopped_by_the_watchdog(
    private_nats, settings, catalog, monkeypatch
):
    monkeypatch.setattr(executor_service, "WATCHDOG_MARGIN_S", 0.5)
    local = settings_for(private_nats, settings)
    runner = NeverAnsweringRunner()
    async with (
        running(
            ArtifactsService(local),
            AdmissionService(local, catalog),
            ExecutorService(local, runner=runner),
        ),
        BillyToolsClient.connect(local) as client,
    ):
        reply = await client.submit(
            "echo", {"message": "stuck"}, limits=RequestedLimits(timeout_s=0.5)
        )
        result = await client.result(reply.run_id, timeout_s=30)

    assert result.status == "infra_error"
    assert result.reason == "run_watchdog"
    assert runner.cancelled.is_set()
