"""Fixtures shared by every test: a real nats-server on a free port with a temporary
store, and the real Docker daemon. Each fixture removes what it created."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.admission.service import AdmissionService
from services.artifacts.service import ArtifactsService
from services.executor.service import ExecutorService
from shared import tracing
from shared.client import BillyToolsClient
from shared.settings import REPO_ROOT, Settings
from shared.toolspec import ToolCatalog

TEST_TOOLS_DIR = Path(__file__).parent / "tools"
# Every executor a test session creates is named with this prefix, so that the final
# leftover check sees this session's Docker objects and not a concurrent session's.
SESSION_PREFIX = f"test-{uuid.uuid4().hex[:6]}"


def session_executor_name(role: str) -> str:
    """A fresh executor name belonging to this test session."""
    return f"{SESSION_PREFIX}-{role}-{uuid.uuid4().hex[:6]}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NatsServer:
    """A nats-server process with JetStream, on a free port, storing under `store_dir`."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = store_dir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        config = self.store_dir / "nats.conf"
        config.write_text(
            f"port: {self.port}\nmax_payload: 8MB\n"
            f'jetstream {{ store_dir: "{self.store_dir / "js"}" }}\n'
        )
        self.process = subprocess.Popen(
            [binary, "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server did not listen on {self.port} within 10 s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running_nats(store_dir: Path) -> Iterator[NatsServer]:
    """A nats-server storing under `store_dir`, stopped whatever happens."""
    server = NatsServer(store_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    with running_nats(tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture(scope="session")
def executor_name() -> str:
    """The in-process stack's executor name, so that leftovers can be traced to it."""
    return session_executor_name("stack")


@pytest.fixture(scope="session")
def settings(nats_server: NatsServer, executor_name: str, tmp_path_factory) -> Settings:
    return Settings(
        nats_url=nats_server.url,
        tools_dir=REPO_ROOT / "tool-images",
        state_dir=tmp_path_factory.mktemp("state"),
        executor_name=executor_name,
        executor_concurrency=2,
        executor_ack_wait_s=10,
        executor_progress_interval_s=2,
        docker_retry_interval_s=0.5,
        work_signing_key=uuid.uuid4().hex,
    )


@pytest.fixture(scope="session")
async def docker() -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker(url=os.environ.get("DOCKER_HOST"))
    try:
        yield client
    finally:
        await client.close()


async def managed_leftovers(
    docker: aiodocker.Docker, executor: str | None = None, executor_prefix: str | None = None
) -> dict:
    """Containers, volumes and networks labelled billy.managed: of one executor if named,
    of executors whose name starts with `executor_prefix` if given."""
    label = f"billy.executor={executor}" if executor else "billy.managed=true"
    containers = await docker.containers.list(all=True, filters={"label": [label]})
    volumes = (await docker.volumes.list(filters={"label": [label]})).get("Volumes") or []
    networks = await docker.networks.list(filters={"label": [label]})

    def ours(labels: dict | None) -> bool:
        return executor_prefix is None or (labels or {}).get("billy.executor", "").startswith(
            executor_prefix
        )

    return {
        "containers": [c.id[:12] for c in containers if ours(c._container.get("Labels"))],
        "volumes": [v["Name"] for v in volumes if ours(v.get("Labels"))],
        "networks": [n["Name"] for n in networks if ours(n.get("Labels"))],
    }


async def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.05):
    """Poll `predicate` (sync or async) until it returns a truthy value, or fail."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


@pytest.fixture(scope="session", autouse=True)
def spans() -> InMemorySpanExporter:
    """The real OpenTelemetry SDK, as the services configure it, recording in memory."""
    exporter = InMemorySpanExporter()
    tracing.configure("billy-tools-tests", exporter=exporter)
    return exporter


@pytest.fixture(scope="session", autouse=True)
async def no_managed_leftovers_after_the_suite():
    """Nothing labelled billy.managed may remain once every test has run.

    In CI nothing else runs, so there every billy.managed object counts, whoever labelled
    it (doctor canaries, bench runs, CLI stacks), except what was already there before the
    suite started; elsewhere only this session's executors count, since other sessions may
    be running.
    """
    prefix = None if os.environ.get("CI") else SESSION_PREFIX
    async with aiodocker.Docker(url=os.environ.get("DOCKER_HOST")) as client:
        before = await managed_leftovers(client, executor_prefix=prefix)
    yield
    async with aiodocker.Docker(url=os.environ.get("DOCKER_HOST")) as client:
        after = await managed_leftovers(client, executor_prefix=prefix)
    left = {kind: sorted(set(after[kind]) - set(before[kind])) for kind in after}
    assert left == {"containers": [], "volumes": [], "networks": []}, left


@pytest.fixture(scope="session")
def catalog() -> ToolCatalog:
    return ToolCatalog.load(REPO_ROOT / "tool-images", TEST_TOOLS_DIR)


@contextlib.asynccontextmanager
async def running(*services):
    """Start services in order; stop those started, in reverse, whatever happens."""
    started = []
    try:
        for service in services:
            await service.start()
            started.append(service)
        yield services
    finally:
        for service in reversed(started):
            await service.stop()


def whole_stack(settings: Settings, catalog: ToolCatalog):
    """Artifacts, admission and an executor in this process, as a context manager."""
    return running(
        ArtifactsService(settings), AdmissionService(settings, catalog), ExecutorService(settings)
    )


@pytest.fixture(scope="session")
async def stack(settings, catalog, docker):
    """The three services in this process for the whole session."""
    async with whole_stack(settings, catalog) as services:
        yield services
    leftovers = await managed_leftovers(docker, settings.executor_name)
    assert leftovers == {"containers": [], "volumes": [], "networks": []}


@pytest.fixture(scope="session")
async def client(stack, settings):
    """Billy's client, connected to the in-process stack."""
    async with BillyToolsClient.connect(settings) as connected:
        yield connected


async def collect_events(client: BillyToolsClient, run_id: str) -> list:
    """Every event of a finished run, in order."""
    return [event async for event in client.events(run_id)]
