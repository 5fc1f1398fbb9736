"""DockerRunner: runs one tool in a hardened container and always cleans up after it.

Steps of a run: ensure the image, build argv, create the workspace volume (a tmpfs of
workspace_bytes), start its keeper while creating the container, fill the workspace,
attach, start, wait (with the wall-clock timeout), inspect, collect the outputs from the
keeper, remove both containers and the volume. Each step is reported as a run
event. Docker failures end the run in infra_error; nothing the tool does raises.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from collections.abc import Coroutine
from typing import Any

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer

from services.executor.collector import collect_outputs
from services.executor.command import Argv, build_argv
from services.executor.errors import CommandError, ImageRefusedError, InfraError, docker_errors
from services.executor.image import ensure_image
from services.executor.model import ArtifactSink, RunContext, RunOutcome, RunReporter
from services.executor.output import OutputCapture, drain
from services.executor.policy import container_config
from services.executor.runtimes import DaemonRuntimes
from services.executor.workspace import (
    DEFAULT_KEEPER_IMAGE,
    create_volume,
    keeper_name,
    remove_volume,
    start_keeper,
    upload_workspace,
    workspace_archive,
    workspace_full,
)
from shared import tracing
from shared.logs import bind
from shared.wire import RunStatus, RunTimings

logger = logging.getLogger(__name__)

PING_TIMEOUT_S = 5.0
# After the tool exited, dockerd closes the attach stream once the rest is flushed.
DRAIN_AFTER_EXIT_S = 10.0
REMOVE_TIMEOUT_S = 30.0
DOCKER_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")


class DockerRunner:
    """A ToolRunner on a Docker Engine: one hardened container and volume per run."""

    def __init__(
        self,
        docker: aiodocker.Docker,
        registry: str | None = None,
        keeper_image: str = DEFAULT_KEEPER_IMAGE,
    ) -> None:
        self._docker = docker
        self._registry = registry
        self._runtimes = DaemonRuntimes(docker)
        self._keeper_image = keeper_image

    async def run(
        self, context: RunContext, reporter: RunReporter, sink: ArtifactSink
    ) -> RunOutcome:
        """Run the tool to completion; the container and volume are gone when this returns."""
        run = _Run(
            self._docker,
            self._registry,
            context,
            reporter,
            sink,
            self._runtimes,
            keeper_image=self._keeper_image,
        )
        return await run.execute()

    async def ping(self) -> bool:
        """Whether the Docker daemon answers."""
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                async with self._docker._query("_ping", versioned_api=False) as response:
                    return (await response.text()).strip() == "OK"
        except (aiodocker.DockerError, aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def remove_leftovers(self, executor: str) -> int:
        """Remove containers and volumes this executor left behind (after a crash)."""
        labels = ["billy.managed=true", f"billy.executor={executor}"]
        with docker_errors(f"list leftovers of executor {executor}"):
            containers = await self._docker.containers.list(all=True, filters={"label": labels})
            volumes = await self._docker.volumes.list(filters={"label": labels})
        # One that cannot be removed now (409 removal in progress, 500) must not keep the
        # executor from starting: it is logged and the next start tries again.
        removed_containers = 0
        for container in containers:
            removed_containers += await _removed(remove_container(self._docker, container.id))
        # Containers first: a volume in use cannot be removed.
        removed_volumes = 0
        for volume in volumes.get("Volumes") or []:
            removed_volumes += await _removed(remove_volume(self._docker, volume["Name"]))
        logger.info(
            "leftovers_removed executor=%s containers=%d volumes=%d",
            executor,
            removed_containers,
            removed_volumes,
        )
        return removed_containers + removed_volumes


async def _removed(removal: Coroutine[Any, Any, None]) -> int:
    """1 when the removal succeeded, 0 (logged) when Docker refused it."""
    try:
        await removal
    except InfraError as exc:
        logger.warning("leftover_not_removed error=%s", exc)
        return 0
    return 1


async def remove_container(docker: aiodocker.Docker, id_or_name: str) -> None:
    """Force-remove a container (killing it if it runs); one already gone is fine."""
    with docker_errors(f"remove container {id_or_name[:64]}"):
        try:
            await DockerContainer(docker, id=id_or_name).delete(force=True, v=True)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise


def object_name(run_id: str) -> str:
    """Name of the run's container and volume: readable, and unique per attempt."""
    safe_run_id = DOCKER_NAME_UNSAFE.sub("-", run_id)[:64]
    return f"billy-{safe_run_id}-{secrets.token_hex(3)}"


def trace_id_of(trace_env: dict[str, str]) -> str | None:
    """The trace id of the run's TRACEPARENT, for log lines."""
    return tracing.trace_id_of({"traceparent": trace_env.get("TRACEPARENT", "")})


class _Run:
    """The state of one run while DockerRunner executes it."""

    def __init__(
        self,
        docker: aiodocker.Docker,
        registry: str | None,
        context: RunContext,
        reporter: RunReporter,
        sink: ArtifactSink,
        runtimes: DaemonRuntimes,
        keeper_image: str = DEFAULT_KEEPER_IMAGE,
    ) -> None:
        self.docker = docker
        self.runtimes = runtimes
        self.keeper_image = keeper_image
        self.registry = registry
        self.context = context
        self.reporter = reporter
        self.sink = sink
        self.log = bind(
            logger,
            run_id=context.run_id,
            tool=context.tool,
            tenant=context.tenant,
            trace_id=trace_id_of(context.trace_env),
        )
        limits = context.limits
        self.capture = OutputCapture(limits.stdout_bytes, limits.stderr_bytes)
        self.timings = RunTimings()
        self.name: str | None = None  # of the container and the volume, once asked for
        self.container: DockerContainer | None = None
        self.keeper_id: str | None = None  # holds the workspace tmpfs mounted
        self.exit_code: int | None = None
        self.started = time.monotonic()
        self.run_started = self.started

    async def execute(self) -> RunOutcome:
        try:
            outcome = await self._steps()
        except InfraError as exc:
            self.log.error("run_infra_error reason=%s message=%s", exc.reason, exc.message)
            outcome = self._outcome("infra_error", exc.reason, exc.message)
        finally:
            # Also on cancellation: the container and volume must not outlive the run.
            await _shielded(self._remove())
        self.timings.total_ms = _elapsed_ms(self.started)
        outcome.timings = self.timings
        return outcome

    async def _steps(self) -> RunOutcome:
        try:
            argv = build_argv(self.context.spec, self.context.arguments)
        except CommandError as exc:
            self.log.warning("run_rejected reason=argument_not_allowed message=%s", exc)
            return self._outcome("rejected", "argument_not_allowed", str(exc))

        # Before anything is created: a missing runtime (runsc) ends the run at once.
        await self.runtimes.require(self.context.spec.runtime)

        started = time.monotonic()
        try:
            image_id = await ensure_image(
                self.docker, self.context.spec.image, self.registry, self.reporter
            )
        except ImageRefusedError as exc:
            # Supply chain, not platform: the run is refused, not retried elsewhere.
            self.log.warning("run_rejected reason=%s message=%s", exc.reason, exc.message)
            return self._outcome("rejected", exc.reason, exc.message)
        self.timings.image_ms = _elapsed_ms(started)

        container = await self._create(image_id, argv)
        status, reason, message = await self._run_tool(container)

        started = time.monotonic()
        # From the keeper: the tool's container no longer mounts the workspace.
        collected = await collect_outputs(
            self.docker, self.keeper_id, self.context, self.reporter, self.sink, self.log
        )
        self.timings.collect_ms = _elapsed_ms(started)
        self.log.info(
            "outputs_collected offered=%d archive_bytes=%d truncated=%s collect_ms=%.0f",
            collected.offered,
            collected.archive_bytes,
            collected.truncated,
            self.timings.collect_ms,
        )
        return self._outcome(status, reason, message)

    async def _create(self, image_id: str, argv: Argv) -> DockerContainer:
        """Create the volume, start its keeper while creating the container, fill it."""
        started = time.monotonic()
        self.name = object_name(self.context.run_id)
        await create_volume(self.docker, self.name, self.context)
        keeper_id, self.container = await _both(
            start_keeper(self.docker, self.context, self.keeper_image, self.name),
            self._create_container(image_id, argv),
        )
        self.keeper_id = keeper_id
        await upload_workspace(self.docker, keeper_id, workspace_archive(self.context))

        self.timings.create_ms = _elapsed_ms(started)
        await self.reporter.event(
            "container_created",
            duration_ms=self.timings.create_ms,
            data={
                "container_id": self.container.id,
                "name": self.name,
                "image_id": image_id,
                "keeper_id": keeper_id,
            },
        )
        return self.container

    async def _create_container(self, image_id: str, argv: Argv) -> DockerContainer:
        config = container_config(self.context, image_id, argv, self.name)
        with docker_errors("create container"):
            return await self.docker.containers.create(config, name=self.name)

    async def _run_tool(self, container: DockerContainer) -> tuple[RunStatus, str | None, str]:
        """Attach, start, wait; the tool's status, reason and message."""
        started = time.monotonic()
        # Attached before start, so not a byte of output is missed.
        stream = container.attach(stdout=True, stderr=True, logs=False)
        try:
            with docker_errors("attach to container"):
                await stream.__aenter__()
            drain_task = asyncio.create_task(drain(stream, self.capture, self.reporter, self.log))
            try:
                await self._start(container, started)
                timed_out = await self._wait(container)
                await self._finish_drain(drain_task)
            finally:
                drain_task.cancel()
                await asyncio.gather(drain_task, return_exceptions=True)
        finally:
            await stream.close()
        return await self._exit_status(container, timed_out)

    async def _start(self, container: DockerContainer, started: float) -> None:
        with docker_errors("start container"):
            await container.start()
        self.run_started = time.monotonic()
        self.timings.start_ms = _elapsed_ms(started)
        self.log.info("run_started container=%s", container.id[:12])
        await self.reporter.event("container_started", duration_ms=self.timings.start_ms)

    async def _wait(self, container: DockerContainer) -> bool:
        """Wait for the tool to exit within timeout_s; stop it when not. True if it timed out."""
        limits = self.context.limits
        try:
            async with asyncio.timeout(limits.timeout_s):
                with docker_errors("wait for container"):
                    await container.wait()
            self.timings.run_ms = _elapsed_ms(self.run_started)
            return False
        except TimeoutError:
            pass

        grace_s = math.ceil(limits.stop_grace_s)
        self.log.info("run_timed_out timeout_s=%s stop_grace_s=%d", limits.timeout_s, grace_s)
        await self.reporter.event(
            "timeout_kill",
            reason="timeout",
            message=f"tool ran longer than {limits.timeout_s} s; stopping, {grace_s} s grace",
            data={"timeout_s": limits.timeout_s, "stop_grace_s": grace_s},
        )
        with docker_errors("stop container after timeout"):
            # SIGTERM to docker-init (forwarded to the tool), SIGKILL after the grace period.
            await container.stop(t=grace_s)
            await container.wait()
        self.timings.run_ms = _elapsed_ms(self.run_started)
        return True

    async def _finish_drain(self, drain_task: asyncio.Task) -> None:
        try:
            await asyncio.wait_for(drain_task, DRAIN_AFTER_EXIT_S)
        except TimeoutError:
            self.log.warning("output_not_closed wait_s=%s", DRAIN_AFTER_EXIT_S)

    async def _exit_status(
        self, container: DockerContainer, timed_out: bool
    ) -> tuple[RunStatus, str | None, str]:
        """Inspect the exited container, report how it ended, and classify it."""
        with docker_errors("inspect exited container"):
            state = (await container.show())["State"]
        self.exit_code = state.get("ExitCode")
        oom_killed = bool(state.get("OOMKilled"))
        memory_bytes = self.context.limits.memory_bytes
        if oom_killed:
            await self.reporter.event(
                "oom_kill",
                reason="memory_bytes",
                message=f"tool exceeded its memory limit of {memory_bytes} bytes",
                data={"memory_bytes": memory_bytes},
            )
        await self.reporter.event(
            "exited",
            duration_ms=self.timings.run_ms,
            data={"exit_code": self.exit_code, "oom_killed": oom_killed, "timed_out": timed_out},
        )
        self.log.info(
            "run_exited exit_code=%s oom_killed=%s timed_out=%s run_ms=%.0f",
            self.exit_code,
            oom_killed,
            timed_out,
            self.timings.run_ms,
        )
        full = False
        if self.exit_code != 0 and not (oom_killed or timed_out):
            full = await self._workspace_filled()
        return exit_status(self.exit_code, oom_killed, timed_out, self.context, full)

    async def _workspace_filled(self) -> bool:
        """Whether the workspace is full, reported as limit_hit: the likely cause of a failure.

        ENOSPC itself is invisible from outside; a full tmpfs is what it leaves behind.
        Asked only after a failure, since the exec costs some 70 ms.
        """
        try:
            full = await workspace_full(self.docker, self.keeper_id)
        except InfraError as exc:
            # Only an explanation is lost: the tool's own exit code still classifies the run.
            self.log.warning("workspace_not_measured error=%s", exc.message)
            return False
        if not full:
            return False
        workspace_bytes = self.context.limits.workspace_bytes
        self.log.info("workspace_full limit_bytes=%d", workspace_bytes)
        await self.reporter.event(
            "limit_hit",
            reason="workspace_bytes",
            message=f"workspace of {workspace_bytes} bytes is full; writes past it failed",
            data={"limit_bytes": workspace_bytes},
        )
        return True

    async def _remove(self) -> None:
        """Remove the container and the volume, whatever happened before."""
        if self.name is None:
            return
        started = time.monotonic()
        failures: list[str] = []
        try:
            async with asyncio.timeout(REMOVE_TIMEOUT_S):
                # By name: a create cut short by cancellation may have left an unknown id.
                try:
                    await _both(
                        remove_container(self.docker, self.name),
                        remove_container(self.docker, keeper_name(self.name)),
                    )
                except InfraError as exc:
                    failures.append(str(exc))
                # Whatever happened to the containers: a volume left behind leaks too.
                try:
                    await remove_volume(self.docker, self.name)
                except InfraError as exc:
                    failures.append(str(exc))
        except TimeoutError:
            failures.append(f"removal took longer than {REMOVE_TIMEOUT_S:.0f} s")
        if failures:
            self.log.error("run_cleanup_failed name=%s error=%s", self.name, "; ".join(failures))
            return
        self.timings.remove_ms = _elapsed_ms(started)
        if self.container is None:
            return
        try:
            await self.reporter.event("container_removed", duration_ms=self.timings.remove_ms)
        except Exception:
            self.log.exception("container_removed_not_reported")

    def _outcome(self, status: RunStatus, reason: str | None, message: str | None) -> RunOutcome:
        stdout, stderr = self.capture.stdout, self.capture.stderr
        return RunOutcome(
            status=status,
            reason=reason,
            message=message,
            exit_code=self.exit_code,
            stdout=bytes(stdout.kept),
            stderr=bytes(stderr.kept),
            stdout_bytes=stdout.seen_bytes,
            stderr_bytes=stderr.seen_bytes,
            stdout_truncated=stdout.truncated,
            stderr_truncated=stderr.truncated,
        )


def exit_status(
    exit_code: int | None,
    oom_killed: bool,
    timed_out: bool,
    context: RunContext,
    workspace_full: bool = False,
) -> tuple[RunStatus, str | None, str]:
    """Status, reason and message of an exited tool; a timeout wins over what it caused."""
    if timed_out:
        timeout_s = context.limits.timeout_s
        return "timed_out", "timeout", f"tool ran longer than {timeout_s} s; stopped"
    if oom_killed:
        memory_bytes = context.limits.memory_bytes
        message = (
            f"tool exceeded its memory limit of {memory_bytes} bytes; "
            f"killed with exit code {exit_code}"
        )
        return "oom_killed", "memory_bytes", message
    if exit_code == 0:
        return "succeeded", None, "tool exited with code 0"
    if workspace_full:
        workspace_bytes = context.limits.workspace_bytes
        message = (
            f"tool exited with code {exit_code} after filling its workspace of "
            f"{workspace_bytes} bytes"
        )
        return "limit_exceeded", "workspace_bytes", message
    return "failed", "exit_code", f"tool exited with code {exit_code}"


async def _both(first: Coroutine[Any, Any, Any], second: Coroutine[Any, Any, Any]):
    """Run two Docker steps at once; both end before the first error is raised."""
    results = await asyncio.gather(first, second, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def _shielded(cleanup: Coroutine[Any, Any, None]) -> None:
    """Run `cleanup` to its end even when the caller is cancelled meanwhile; then re-raise."""
    task = asyncio.ensure_future(cleanup)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()


def _elapsed_ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
