"""gVisor: a tool whose ToolSpec says `runtime: runsc` runs in runsc's user-space kernel,
and leaves no runsc process behind; a daemon without runsc ends such a run in infra_error
runtime_unavailable. The runsc cases are skipped where `docker info` lists no runsc."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import aiodocker
import pytest

from services.executor.errors import RuntimeUnavailableError
from services.executor.model import RunContext
from services.executor.runner import DockerRunner
from services.executor.runtimes import DaemonRuntimes, check_runtime, runtimes_of
from shared.toolspec import ToolCatalog, ToolSpec
from tests.conftest import managed_leftovers, wait_for
from tests.executor.conftest import RecordingReporter, RecordingSink, effective_limits

TOOL = "shell-gvisor"
NO_LEFTOVERS = {"containers": [], "volumes": [], "networks": []}
# What `GET /info` says on a daemon without runsc, as seen on this machine kind.
INFO_WITHOUT_RUNSC = {"Runtimes": {"runc": {"path": "runc"}}, "DefaultRuntime": "runc"}


def daemon_runtimes() -> set[str]:
    """Runtime names that `docker info` lists; empty when the daemon does not answer."""
    shown = subprocess.run(
        ["docker", "info", "--format", "{{json .Runtimes}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return set(json.loads(shown.stdout)) if shown.returncode == 0 else set()


HAS_RUNSC = "runsc" in daemon_runtimes()
requires_runsc = pytest.mark.skipif(
    not HAS_RUNSC,
    reason="`docker info` lists no runsc runtime: install Debian's runsc package and run "
    "scripts/setup.sh, which registers it (docs/gvisor.md)",
)


def runsc_processes(container_id: str) -> list[str]:
    """Host processes of runsc (sandbox, gofer) whose command line names the container."""
    found = subprocess.run(["pgrep", "-af", "runsc"], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if container_id in line]


@pytest.fixture
def executor() -> str:
    return f"test-gvisor-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def no_leftovers(docker: aiodocker.Docker, executor: str):
    """Fail the test when its run left a container or volume; remove them either way."""
    yield
    leftovers = await managed_leftovers(docker, executor)
    if leftovers != NO_LEFTOVERS:
        await DockerRunner(docker).remove_leftovers(executor)
    assert leftovers == NO_LEFTOVERS


def shell_context(spec: ToolSpec, executor: str, script: str) -> RunContext:
    return RunContext(
        run_id=f"run-{uuid.uuid4().hex}",
        tenant="test-tenant",
        tool=spec.name,
        executor=executor,
        spec=spec,
        arguments={"script": script},
        inputs=[],
        limits=effective_limits(spec),
    )


# --- the check, on a fake `docker info` ---------------------------------------------------


def test_runtimes_of_reads_the_names_of_the_info_runtimes():
    assert runtimes_of(INFO_WITHOUT_RUNSC) == {"runc"}
    assert runtimes_of({}) == frozenset()


def test_check_runtime_names_the_missing_runtime_and_the_offered_ones():
    with pytest.raises(RuntimeUnavailableError) as raised:
        check_runtime("runsc", runtimes_of(INFO_WITHOUT_RUNSC))

    assert raised.value.reason == "runtime_unavailable"
    assert raised.value.runtime == "runsc"
    assert "'runsc'" in raised.value.message
    assert "(it has: runc)" in raised.value.message
    check_runtime("runc", runtimes_of(INFO_WITHOUT_RUNSC))


class FakeInfoDocker:
    """Just enough of aiodocker.Docker for DaemonRuntimes: system.info(), counted."""

    def __init__(self, info: dict) -> None:
        self.info = info
        self.calls = 0
        self.system = SimpleNamespace(info=self._info)

    async def _info(self) -> dict:
        self.calls += 1
        return self.info


async def test_daemon_runtimes_asks_once_and_again_only_for_a_missing_runtime():
    fake = FakeInfoDocker(INFO_WITHOUT_RUNSC)
    runtimes = DaemonRuntimes(fake)

    await runtimes.require("runc")
    await runtimes.require("runc")
    assert fake.calls == 1

    with pytest.raises(RuntimeUnavailableError):
        await runtimes.require("runsc")
    assert fake.calls == 2

    # The daemon got runsc (SIGHUP after setup): the next run sees it.
    fake.info = {"Runtimes": {"runc": {}, "runsc": {"path": "/usr/bin/runsc"}}}
    await runtimes.require("runsc")
    assert fake.calls == 3


async def test_runner_on_a_daemon_without_runsc_ends_in_infra_error_before_creating_anything(
    catalog: ToolCatalog,
):
    # The runner asks `docker info` before any other Docker call; the fake answers only that.
    runner = DockerRunner(FakeInfoDocker(INFO_WITHOUT_RUNSC))
    reporter = RecordingReporter()
    context = shell_context(catalog.get(TOOL), "test-gvisor-fake", "echo never")

    outcome = await runner.run(context, reporter, RecordingSink())

    assert (outcome.status, outcome.reason) == ("infra_error", "runtime_unavailable")
    assert "'runsc'" in outcome.message
    assert reporter.types() == []


# --- the real daemon --------------------------------------------------------------------


@pytest.mark.skipif(HAS_RUNSC, reason="the daemon has runsc; the fake daemon above covers this")
async def test_runsc_tool_on_this_daemon_without_runsc_ends_in_runtime_unavailable(
    docker, catalog, executor, no_leftovers
):
    context = shell_context(catalog.get(TOOL), executor, "echo never")

    outcome = await DockerRunner(docker).run(context, RecordingReporter(), RecordingSink())

    assert (outcome.status, outcome.reason) == ("infra_error", "runtime_unavailable")
    assert "'runsc'" in outcome.message


@requires_runsc
async def test_gvisor_tool_runs_under_runsc_in_its_own_kernel_and_leaves_no_runsc_process(
    docker, catalog, executor, no_leftovers
):
    # The tool holds on until the test has looked at it, then lets go through /tmp/go.
    script = (
        "cat /proc/version; dmesg | head -n 1; echo from-gvisor > $BILLY_OUTPUT_DIR/g.txt; "
        "while [ ! -e /tmp/go ]; do sleep 0.05; done; echo released"
    )
    context = shell_context(catalog.get(TOOL), executor, script)
    reporter = RecordingReporter()
    seen: dict = {}

    async def look_while_running() -> None:
        # By id: the run's labels are on its workspace keeper too.
        [created] = reporter.of_type("container_created")
        container = await docker.containers.get(created.data["container_id"])
        seen["processes"] = await wait_for(lambda: runsc_processes(container.id))
        seen["inspected"] = await container.show()
        seen["container_id"] = container.id
        go = await container.exec(["touch", "/tmp/go"], user="65534:65534")
        await go.start(detach=True)

    reporter.hooks["container_started"] = look_while_running
    sink = RecordingSink()
    outcome = await DockerRunner(docker).run(context, reporter, sink)

    assert outcome.status == "succeeded", (outcome.reason, outcome.message, outcome.stderr)
    # The workspace crosses the sandbox boundary both ways: arguments in, artifact out.
    assert sink.by_path()["g.txt"][1] == b"from-gvisor\n"
    proc_version, dmesg_first, released = outcome.stdout.decode().splitlines()
    assert proc_version != Path("/proc/version").read_text().strip()
    assert "Starting gVisor" in dmesg_first
    assert released == "released"
    inspected = seen["inspected"]
    assert inspected["HostConfig"]["Runtime"] == "runsc"
    assert inspected["State"]["Running"] is True
    assert any("runsc-sandbox" in line for line in seen["processes"])
    assert runsc_processes(seen["container_id"]) == []
