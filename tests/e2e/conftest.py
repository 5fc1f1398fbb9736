"""The whole path in one process: admission, an executor and the artifacts service against
a real nats-server and the real Docker daemon, with the client Billy uses."""

from __future__ import annotations

import pytest

from services.admission.service import AdmissionService
from services.artifacts.service import ArtifactsService
from services.executor.service import ExecutorService
from shared.client import BillyToolsClient
from shared.settings import REPO_ROOT
from shared.toolspec import ToolCatalog
from tests.conftest import TEST_TOOLS_DIR, managed_leftovers


@pytest.fixture(scope="session")
def catalog() -> ToolCatalog:
    return ToolCatalog.load(REPO_ROOT / "tool-images", TEST_TOOLS_DIR)


@pytest.fixture(scope="session")
async def stack(settings, catalog, docker):
    """The three services, started in order and stopped in reverse, whatever happens."""
    started = []
    try:
        for service in (
            ArtifactsService(settings),
            AdmissionService(settings, catalog),
            ExecutorService(settings),
        ):
            await service.start()
            started.append(service)
        yield started
    finally:
        for service in reversed(started):
            await service.stop()
    leftovers = await managed_leftovers(docker, settings.executor_name)
    assert leftovers == {"containers": [], "volumes": [], "networks": []}


@pytest.fixture(scope="session")
async def client(stack, settings):
    async with BillyToolsClient.connect(settings) as connected:
        yield connected


async def collect_events(client: BillyToolsClient, run_id: str) -> list:
    return [event async for event in client.events(run_id)]
