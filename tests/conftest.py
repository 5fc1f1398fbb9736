"""Fixtures shared by every test: a real nats-server on a free port with a temporary
store, and the real Docker daemon. Each fixture removes what it created."""

from __future__ import annotations

import asyncio
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

from shared.settings import REPO_ROOT, Settings

TEST_TOOLS_DIR = Path(__file__).parent / "tools"


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


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def executor_name() -> str:
    """One executor name per test session, so that leftovers can be traced to it."""
    return f"test-{uuid.uuid4().hex[:8]}"


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
    )


@pytest.fixture(scope="session")
async def docker() -> AsyncIterator[aiodocker.Docker]:
    client = aiodocker.Docker(url=os.environ.get("DOCKER_HOST"))
    try:
        yield client
    finally:
        await client.close()


async def managed_leftovers(docker: aiodocker.Docker, executor: str | None = None) -> dict:
    """Containers and volumes labelled billy.managed (of one executor, if named)."""
    label = f"billy.executor={executor}" if executor else "billy.managed=true"
    containers = await docker.containers.list(all=True, filters={"label": [label]})
    volumes = (await docker.volumes.list(filters={"label": [label]})).get("Volumes") or []
    networks = await docker.networks.list(filters={"label": [label]})
    return {
        "containers": [c.id[:12] for c in containers],
        "volumes": [v["Name"] for v in volumes],
        "networks": [n["Name"] for n in networks],
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
