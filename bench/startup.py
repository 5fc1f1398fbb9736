"""Benchmark: container start-up latency under runc and under runsc (gVisor), side by side,
on the same image with the executor's hardened configuration.

    .venv/bin/python -m bench.startup [--runs 20] [--warmup 3] [--no-runner]

Two paths per runtime, interleaved run by run so that drift in the machine's load hits
both runtimes alike:
- docker run: `docker run --rm ... true` through the CLI, its flags derived from the
  runner's own create body (policy.container_config via bench.run.docker_run_argv);
- DockerRunner: the test tool `shell` with script `true`, run by the executor's runner
  (volume, keeper, container, upload, attach, start, wait, collect, remove).
It prints p50, p95 and mean in ms and the ratio runsc/runc; docs/gvisor.md has results.
Exit code 1 when a run failed or a container, volume or runsc process was left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker

from bench.run import (
    check_image,
    docker_cli,
    docker_run_argv,
    load_line,
    machine_lines,
    percentile,
)
from services.admission.limits import effective_limits
from services.executor.command import Argv
from services.executor.model import OutputEntry, RunContext
from services.executor.policy import container_config
from services.executor.runner import DockerRunner
from shared.errors import BillyToolsError
from shared.settings import REPO_ROOT
from shared.toolspec import ToolCatalog, ToolSpec

logger = logging.getLogger(__name__)

TEST_TOOLS_DIR = REPO_ROOT / "tests" / "tools"
TOOL = "shell"
RUNTIMES = ("runc", "runsc")
BARE_COMMAND = ["true"]
RUNNER_ARGUMENTS = {"script": "true"}
TENANT = "bench"
DEFAULT_RUNS = 20
DEFAULT_WARMUP_RUNS = 3
RUN_TIMEOUT_S = 30.0
FAILURES_SHOWN = 5


class StartupBenchError(BillyToolsError):
    """The start-up benchmark could not set up or run; the message says what to do."""


@dataclass
class Batch:
    """The measured runs of one path under one runtime."""

    path: str
    runtime: str
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def figures(self) -> tuple[float, float, float]:
        """p50, p95 and mean of the succeeded runs, in ms."""
        values = self.latencies_ms
        mean_ms = statistics.fmean(values) if values else float("nan")
        return percentile(values, 0.5), percentile(values, 0.95), mean_ms


class ContainerIds:
    """A RunReporter that keeps the id of each container the runner created."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    async def event(self, type, *, duration_ms=None, reason=None, message=None, data=None):
        if type == "container_created":
            self.ids.append((data or {})["container_id"])


class NoArtifacts:
    """An ArtifactSink that drops what it is offered; `true` writes nothing anyway."""

    async def offer(self, entry: OutputEntry, content: Any) -> None:
        return None


def bench_context(spec: ToolSpec, session: str, number: int, arguments: dict) -> RunContext:
    return RunContext(
        run_id=f"startup-{session}-{number}",
        tenant=TENANT,
        tool=spec.name,
        executor=f"bench-startup-{session}",
        spec=spec,
        arguments=arguments,
        inputs=[],
        limits=effective_limits(spec, None),
    )


class BareDocker:
    """`docker run --rm` of `true`, configured as the runner configures the tool."""

    def __init__(self, session: str, cid_dir: Path) -> None:
        self.session = session
        self.label = f"billy.bench.startup={session}"
        self.volume_prefix = f"billy-bench-startup-{session}-"
        self.cid_dir = cid_dir
        self.count = 0

    def argv(self, spec: ToolSpec, number: int) -> list[str]:
        """The command line of run `number`: its own volume and a file for its container id."""
        context = bench_context(spec, self.session, number, {})
        volume = f"{self.volume_prefix}{number}"
        config = container_config(context, spec.image.id, Argv(None, BARE_COMMAND), volume)
        argv = docker_run_argv(config, self.label)
        # The id, to look for runsc processes of the container after it was removed.
        return [*argv[:2], f"--cidfile={self.cid_dir / str(number)}", *argv[2:]]

    async def run(self, spec: ToolSpec, batch: Batch | None) -> None:
        """One timed run; recorded in `batch` unless it is a warm-up (None)."""
        self.count += 1
        argv = self.argv(spec, self.count)
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(RUN_TIMEOUT_S):
                _, stderr = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            stderr = f"over {RUN_TIMEOUT_S:g} s".encode()
        elapsed_ms = (time.perf_counter() - started) * 1000
        if batch is None:
            return
        if process.returncode == 0:
            batch.latencies_ms.append(elapsed_ms)
        else:
            batch.failures.append(f"exit {process.returncode}: {stderr.decode().strip()[:200]}")

    def container_ids(self) -> list[str]:
        return [path.read_text().strip() for path in self.cid_dir.iterdir()]

    async def remove_leftovers(self) -> list[str]:
        """Remove containers of cut-short runs and every run's volume; what was left."""
        containers = (await docker_cli("ps", "-aq", "--filter", f"label={self.label}")).split()
        if containers:
            await docker_cli("rm", "-f", *containers)
        volumes = await docker_cli("volume", "ls", "-q", "--filter", f"name={self.volume_prefix}")
        names = [name for name in volumes.split() if name.startswith(self.volume_prefix)]
        if names:
            await docker_cli("volume", "rm", *names)
        return containers


class RunnerPath:
    """The tool run by the executor's DockerRunner, timed from run() to its return."""

    def __init__(self, docker: aiodocker.Docker, session: str) -> None:
        self.runner = DockerRunner(docker)
        self.session = session
        self.executor = f"bench-startup-{session}"
        self.reporter = ContainerIds()
        self.count = 0

    async def run(self, spec: ToolSpec, batch: Batch | None) -> None:
        self.count += 1
        context = bench_context(spec, self.session, self.count, RUNNER_ARGUMENTS)
        started = time.perf_counter()
        outcome = await self.runner.run(context, self.reporter, NoArtifacts())
        elapsed_ms = (time.perf_counter() - started) * 1000
        if batch is None:
            return
        if outcome.status == "succeeded":
            batch.latencies_ms.append(elapsed_ms)
        else:
            batch.failures.append(f"{outcome.status} {outcome.reason}: {outcome.message}")

    async def remove_leftovers(self) -> int:
        return await self.runner.remove_leftovers(self.executor)


async def measure(paths: dict[str, Any], specs: dict[str, ToolSpec], runs: int, warmup: int):
    """Warm up, then `runs` runs per path and runtime, alternating which runtime goes first."""
    batches = {(name, rt): Batch(name, rt) for name in paths for rt in RUNTIMES}
    for name, path in paths.items():
        progress(f"{name}: {warmup} warm-up runs per runtime")
        for _ in range(warmup):
            for runtime in RUNTIMES:
                await path.run(specs[runtime], None)

        progress(f"{name}: {runs} runs per runtime")
        for number in range(runs):
            order = RUNTIMES if number % 2 == 0 else tuple(reversed(RUNTIMES))
            for runtime in order:
                await path.run(specs[runtime], batches[(name, runtime)])
    return list(batches.values())


async def runsc_leftovers(container_ids: list[str]) -> list[str]:
    """runsc processes on the host (sandbox, gofer) of any of these containers."""
    process = await asyncio.create_subprocess_exec(
        "pgrep", "-af", "runsc", stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await process.communicate()
    lines = stdout.decode(errors="replace").splitlines()
    return [line[:120] for line in lines if any(cid and cid in line for cid in container_ids)]


REPORT_HEADER = (
    f"{'path':<13} {'runtime':<10} {'runs':>4} {'failed':>6} "
    f"{'p50_ms':>7} {'p95_ms':>7} {'mean_ms':>7}"
)


def report_lines(batches: list[Batch]) -> list[str]:
    """Per path: one line per runtime, then the ratio runsc/runc of each figure."""
    lines = [REPORT_HEADER]
    for path in dict.fromkeys(batch.path for batch in batches):
        by_runtime = {batch.runtime: batch for batch in batches if batch.path == path}
        lines += [batch_line(by_runtime[runtime]) for runtime in RUNTIMES]
        lines.append(ratio_line(path, by_runtime["runsc"], by_runtime["runc"]))
    return lines


def batch_line(batch: Batch) -> str:
    p50, p95, mean_ms = batch.figures()
    runs = len(batch.latencies_ms) + len(batch.failures)
    return (
        f"{batch.path:<13} {batch.runtime:<10} {runs:>4} {len(batch.failures):>6} "
        f"{p50:>7.0f} {p95:>7.0f} {mean_ms:>7.0f}"
    )


def ratio_line(path: str, runsc: Batch, runc: Batch) -> str:
    pairs = zip(runsc.figures(), runc.figures(), strict=True)
    ratios = " ".join(f"{a / b:>7.2f}" if b else f"{'-':>7}" for a, b in pairs)
    return f"{path:<13} {'runsc/runc':<10} {'':>4} {'':>6} {ratios}"


async def runtime_lines() -> list[str]:
    """The daemon's version and runtimes; fails when runsc is not among them."""
    version = await docker_cli("version", "--format", "{{.Server.Version}}")
    runtimes = await docker_cli("info", "--format", "{{json .Runtimes}}")
    if '"runsc"' not in runtimes:
        raise StartupBenchError(
            f"the Docker daemon has no runsc runtime ({runtimes}); install Debian's runsc "
            "and run scripts/setup.sh, which registers it (docs/gvisor.md)"
        )
    process = await asyncio.create_subprocess_exec(
        "runsc", "--version", stdout=asyncio.subprocess.PIPE
    )
    runsc_version = (await process.communicate())[0].decode().splitlines()[0]
    return [f"docker    Engine {version}, runtimes {runtimes}", f"runsc     {runsc_version}"]


async def bench(args: argparse.Namespace, cid_dir: Path) -> int:
    session = secrets.token_hex(4)
    shell = ToolCatalog.load(TEST_TOOLS_DIR).get(TOOL)
    image_id = await check_image(shell)
    # The same tool and image; only the runtime differs.
    specs = {runtime: shell.model_copy(update={"runtime": runtime}) for runtime in RUNTIMES}
    bare = BareDocker(session, cid_dir)
    print(*machine_lines(), *await runtime_lines(), load_line("start"), sep="\n")
    print(f"image     {shell.image.ref} ({image_id[:19]})")
    print(f"bare      {' '.join(bare.argv(specs['runsc'], 0))}")
    print(f"runner    DockerRunner, tool {TOOL}, arguments {RUNNER_ARGUMENTS}\n", flush=True)

    async with aiodocker.Docker() as docker:
        paths: dict[str, Any] = {"docker run": bare}
        runner = RunnerPath(docker, session)
        if args.runner:
            paths["DockerRunner"] = runner
        try:
            batches = await measure(paths, specs, args.runs, args.warmup)
        finally:
            left = await bare.remove_leftovers()
            removed = await runner.remove_leftovers()
            runsc_left = await runsc_leftovers(bare.container_ids() + runner.reporter.ids)

    print(*report_lines(batches), "", load_line("end"), sep="\n")
    failures = [f"{b.path} {b.runtime}: {f}" for b in batches for f in b.failures]
    for line in failures[:FAILURES_SHOWN]:
        print(f"failed    {line}")
    if left or removed or runsc_left:
        print(f"leftover  containers {left}, runner objects {removed}, runsc {runsc_left}")
    return 1 if failures or left or removed or runsc_left else 0


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="measured runs each")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP_RUNS)
    parser.add_argument(
        "--no-runner", dest="runner", action="store_false", help="only the docker run path"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        parser.error("--runs must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="billy-bench-startup-") as cid_dir:
        try:
            return asyncio.run(bench(args, Path(cid_dir)))
        except BillyToolsError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
