"""Benchmark: the test tool `echo` run end to end through billy-tools (client submit ->
admission -> JetStream -> executor -> Docker -> result), side by side with a bare
`docker run --rm` of the same image with the same hardening flags, at several levels of
concurrency.

    .venv/bin/python bench/run.py [--levels 1,4,8] [--runs 20,40,40] [--warmup 3]

It starts its own nats-server (free port, temporary store) and the three services as
separate processes (shared.stack), restarts the executor with its concurrency set to each
level, and removes everything it created when it ends. Exit code 1 when a run failed or a
Docker object was left behind; bench/README.md explains what it prints.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import itertools
import json
import logging
import os
import platform
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.admission.limits import effective_limits
from services.executor.command import build_argv
from services.executor.model import RunContext
from services.executor.policy import NANO_CPUS_PER_CPU, container_config
from services.executor.workspace import volume_options
from shared import stack
from shared.client import BillyToolsClient, ClientError
from shared.errors import BillyToolsError
from shared.settings import REPO_ROOT, Settings
from shared.toolspec import LOCK_FILE, ToolCatalog, ToolSpec, read_image_lock
from shared.wire import to_builtins

logger = logging.getLogger(__name__)

TEST_TOOLS_DIR = REPO_ROOT / "tests" / "tools"
TOOL = "echo"
MESSAGE = "billy-bench"
ARGUMENTS = {"message": MESSAGE}
TENANT = "bench"
DOCKER = "docker"

DEFAULT_LEVELS = (1, 4, 8)
DEFAULT_RUNS = (20, 40, 40)
DEFAULT_WARMUP_RUNS = 3
# Generous: a run of echo takes well under a second, but the machine is shared.
RUN_TIMEOUT_S = 30.0
SUBMIT_TIMEOUT_S = 10.0
STACK_START_TIMEOUT_S = 60.0
STACK_STOP_GRACE_S = 10.0
FAILURES_SHOWN = 5

# RunResult timings in the order the executor spends them, with what each one covers.
TIMING_STEPS = (
    ("admission_ms", "admission round trip (client submit -> reply)"),
    ("queued_ms", "queued (admission enqueue -> executor dequeue)"),
    ("image_ms", "image (verify the local image id)"),
    ("create_ms", "create (volume, keeper, container, upload)"),
    ("start_ms", "start (attach, start)"),
    ("run_ms", "run (started -> exited, output drained)"),
    ("collect_ms", "collect (read /workspace/out)"),
    ("remove_ms", "remove (containers, volume)"),
    ("total_ms", "executor total (dequeue -> removed)"),
    ("residual_ms", "rest (ledger, events, result watch)"),
    ("end_to_end_ms", "end to end (client)"),
)


class BenchError(BillyToolsError):
    """The benchmark could not set up, run or clean up; the message says what to do."""


@dataclass
class Sample:
    """One measured run: its latency, whether it did what it should, and its timings."""

    elapsed_ms: float
    ok: bool
    detail: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Batch:
    """The runs of one path at one concurrency level."""

    path: str
    level: int
    samples: list[Sample]
    wall_s: float

    @property
    def failed(self) -> list[Sample]:
        return [sample for sample in self.samples if not sample.ok]

    def latencies_ms(self) -> list[float]:
        return [sample.elapsed_ms for sample in self.samples if sample.ok]

    @property
    def runs_per_s(self) -> float:
        return len(self.samples) / self.wall_s if self.wall_s else 0.0


# -- setup ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_tools_dir(root: Path) -> Path:
    """A tools dir holding only `echo` (a symlink) and its images.lock.json entry."""
    lock = read_image_lock(TEST_TOOLS_DIR)
    if TOOL not in lock:
        raise BenchError(
            f"no image recorded for {TOOL} in {TEST_TOOLS_DIR / LOCK_FILE}; run "
            "`.venv/bin/python -m shared.images build --tools-dir tests/tools`"
        )
    tools_dir = root / "tools"
    tools_dir.mkdir()
    (tools_dir / TOOL).symlink_to(TEST_TOOLS_DIR / TOOL, target_is_directory=True)
    (tools_dir / LOCK_FILE).write_text(json.dumps({TOOL: lock[TOOL]}, indent=2))
    return tools_dir


async def docker_cli(*args: str, check: bool = True) -> str:
    """Run the docker CLI and return its stdout; raises BenchError when it fails."""
    process = await asyncio.create_subprocess_exec(
        DOCKER,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    if check and process.returncode != 0:
        raise BenchError(
            f"docker {' '.join(args[:3])} exited with {process.returncode}: "
            f"{stderr.decode(errors='replace').strip()}"
        )
    return stdout.decode(errors="replace").strip()


async def check_image(spec: ToolSpec) -> str:
    """The recorded image id of the tool, after checking that the daemon has that image."""
    found_id = await docker_cli("image", "inspect", "--format", "{{.Id}}", spec.image.ref)
    if found_id != spec.image.id:
        raise BenchError(
            f"image {spec.image.ref} is {found_id}, the lock records {spec.image.id}; rebuild "
            "with `.venv/bin/python -m shared.images build --tools-dir tests/tools`"
        )
    return found_id


# -- the bare `docker run` --------------------------------------------------------------

# Create-body fields that `docker run` (without -i/-t) sets to the same values by itself.
CLI_SAME_DEFAULTS = {
    "NetworkDisabled": True,  # what --network none amounts to for the CLI
    "Tty": False,
    "OpenStdin": False,
    "StdinOnce": False,
    "AttachStdin": False,
    "AttachStdout": True,
    "AttachStderr": True,
}
HOST_SAME_DEFAULTS = {
    "CapAdd": None,
    "Privileged": False,
    "PidMode": "",
    "UTSMode": "",
    "Devices": [],
    "PortBindings": {},
    "PublishAllPorts": False,
    "Binds": None,
    "VolumesFrom": None,
    "RestartPolicy": {"Name": "no"},
    # The executor removes the container itself; the bare run says --rm instead.
    "AutoRemove": False,
}


def mount_flag(mount: dict[str, Any]) -> list[str]:
    """--mount for a volume mount, driver options included (CSV: quoted where needed)."""
    if mount["Type"] != "volume":
        raise BenchError(f"mount of type {mount['Type']} has no translation to docker run here")
    fields = ["type=volume", f"source={mount['Source']}", f"target={mount['Target']}"]
    if mount.get("ReadOnly"):
        fields.append("readonly")
    volume_options = mount.get("VolumeOptions") or {}
    if volume_options.get("NoCopy"):
        fields.append("volume-nocopy")
    driver = volume_options.get("DriverConfig") or {}
    if driver.get("Name"):
        fields.append(f"volume-driver={driver['Name']}")
    fields += [f"volume-opt={key}={value}" for key, value in (driver.get("Options") or {}).items()]
    line = io.StringIO()
    csv.writer(line, lineterminator="").writerow(fields)
    return [f"--mount={line.getvalue()}"]


HOST_FLAGS: dict[str, Callable[[Any], list[str]]] = {
    "NetworkMode": lambda mode: [f"--network={mode}"],
    "CapDrop": lambda caps: [f"--cap-drop={cap}" for cap in caps],
    "SecurityOpt": lambda options: [f"--security-opt={option}" for option in options],
    "Runtime": lambda runtime: [f"--runtime={runtime}"] if runtime else [],
    "ReadonlyRootfs": lambda read_only: ["--read-only"] if read_only else [],
    "Tmpfs": lambda mounts: [f"--tmpfs={path}:{opts}" for path, opts in mounts.items()],
    "PidsLimit": lambda pids: [f"--pids-limit={pids}"],
    "Memory": lambda memory_bytes: [f"--memory={memory_bytes}b"],
    "MemorySwap": lambda memory_bytes: [f"--memory-swap={memory_bytes}b"],
    "NanoCpus": lambda nano_cpus: [f"--cpus={nano_cpus / NANO_CPUS_PER_CPU:g}"],
    "Ulimits": lambda limits: [f"--ulimit={u['Name']}={u['Soft']}:{u['Hard']}" for u in limits],
    "Init": lambda init: ["--init"] if init else [],
    "IpcMode": lambda mode: [f"--ipc={mode}"],
    "LogConfig": lambda log: (
        [f"--log-driver={log['Type']}"]
        + [f"--log-opt={key}={value}" for key, value in (log.get("Config") or {}).items()]
    ),
    "Mounts": lambda mounts: [flag for mount in mounts for flag in mount_flag(mount)],
}


def host_config_flags(host_config: dict[str, Any]) -> list[str]:
    """docker run flags for the executor's HostConfig; fails on a field it cannot translate,
    so that the bare run never silently drifts from the runner's policy."""
    flags: list[str] = []
    for key, value in host_config.items():
        if key in HOST_SAME_DEFAULTS:
            if value != HOST_SAME_DEFAULTS[key]:
                raise BenchError(f"HostConfig.{key}={value!r} has no docker run flag here")
            continue
        if key not in HOST_FLAGS:
            raise BenchError(f"HostConfig.{key} has no docker run flag here; add it to HOST_FLAGS")
        flags += HOST_FLAGS[key](value)
    return flags


def docker_run_argv(config: dict[str, Any], label: str) -> list[str]:
    """The `docker run --rm` command line of the executor's container create body."""
    argv = [DOCKER, "run", "--rm", f"--label={label}", f"--user={config['User']}"]
    argv += [f"--workdir={config['WorkingDir']}", f"--stop-signal={config['StopSignal']}"]
    argv += [f"--stop-timeout={config['StopTimeout']}"]
    argv += [f"--env={variable}" for variable in config["Env"]]
    for key, value in config.items():
        if key in CLI_SAME_DEFAULTS and value != CLI_SAME_DEFAULTS[key]:
            raise BenchError(f"container config {key}={value!r} has no docker run flag here")
    argv += host_config_flags(config["HostConfig"])

    # The CLI takes one entrypoint word; the rest of it goes in front of the command.
    command = list(config["Cmd"])
    entrypoint = config.get("Entrypoint")
    if entrypoint:
        argv.append(f"--entrypoint={entrypoint[0]}")
        command = [*entrypoint[1:], *command]
    return [*argv, config["Image"], *command]


class BareDocker:
    """Bare `docker run --rm` of the tool's image, configured as the runner configures it."""

    def __init__(self, spec: ToolSpec, session: str) -> None:
        self.spec = spec
        self.session = session
        self.label = f"billy.bench={session}"
        self.volume_prefix = f"billy-bench-{session}-"
        self._numbers = itertools.count()

    def argv(self, number: int) -> list[str]:
        """The command line of bare run `number`, with its own named workspace volume."""
        context = RunContext(
            run_id=f"bench-{self.session}-{number}",
            tenant=TENANT,
            tool=self.spec.name,
            executor=f"bench-{self.session}",
            spec=self.spec,
            arguments=ARGUMENTS,
            inputs=[],
            limits=effective_limits(self.spec, None),
        )
        argv = build_argv(self.spec, ARGUMENTS)
        volume = f"{self.volume_prefix}{number}"
        config = container_config(context, self.spec.image.id, argv, volume)
        # The executor creates the volume with these options; `docker run` creates it here.
        for mount in config["HostConfig"]["Mounts"]:
            mount.setdefault("VolumeOptions", {})["DriverConfig"] = {
                "Name": "local",
                "Options": volume_options(context),
            }
        return docker_run_argv(config, self.label)

    async def run(self) -> Sample:
        """One timed `docker run`; it creates its named volume, which cleanup removes."""
        argv = self.argv(next(self._numbers))
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            async with asyncio.timeout(RUN_TIMEOUT_S):
                stdout, stderr = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            return Sample(_elapsed_ms(started), False, f"docker run over {RUN_TIMEOUT_S:g} s")
        elapsed_ms = _elapsed_ms(started)

        if process.returncode != 0:
            detail = f"exit {process.returncode}: {stderr.decode(errors='replace').strip()}"
            return Sample(elapsed_ms, False, detail)
        if stdout.decode(errors="replace").strip() != MESSAGE:
            return Sample(elapsed_ms, False, f"stdout {stdout[:80]!r}, expected {MESSAGE!r}")
        return Sample(elapsed_ms, True)

    async def remove_leftovers(self) -> None:
        """Remove the bare runs' containers (if a run was cut short) and named volumes."""
        containers = await docker_cli("ps", "-aq", "--filter", f"label={self.label}")
        if containers:
            await docker_cli("rm", "-f", *containers.split())
        volumes = await docker_cli("volume", "ls", "-q", "--filter", f"name={self.volume_prefix}")
        names = [name for name in volumes.split() if name.startswith(self.volume_prefix)]
        if names:
            await docker_cli("volume", "rm", *names)


# -- the billy-tools path ---------------------------------------------------------------


async def billy_run(client: BillyToolsClient) -> Sample:
    """One run through billy-tools: submit, then wait for its result in the run ledger."""
    started = time.perf_counter()
    try:
        reply = await client.submit(TOOL, ARGUMENTS, tenant=TENANT, timeout_s=SUBMIT_TIMEOUT_S)
        admission_ms = _elapsed_ms(started)
        result = await client.result(reply.run_id, timeout_s=RUN_TIMEOUT_S)
    except ClientError as exc:
        return Sample(_elapsed_ms(started), False, f"{type(exc).__name__}: {exc}")
    elapsed_ms = _elapsed_ms(started)

    timings = {"admission_ms": admission_ms, "end_to_end_ms": elapsed_ms}
    timings.update(to_builtins(result.timings))
    accounted = sum(timings.get(name, 0.0) for name in ("admission_ms", "queued_ms", "total_ms"))
    timings["residual_ms"] = elapsed_ms - accounted
    if result.status != "succeeded":
        detail = f"run {result.run_id} {result.status}: {result.reason} {result.message}"
        return Sample(elapsed_ms, False, detail, timings)
    if result.stdout.strip() != MESSAGE:
        return Sample(elapsed_ms, False, f"stdout {result.stdout[:80]!r}", timings)
    return Sample(elapsed_ms, True, timings=timings)


def level_settings(settings: Settings, level: int) -> Settings:
    return settings.model_copy(update={"executor_concurrency": level})


async def start_executor(settings: Settings, level: int) -> None:
    """(Re)start the executor with `level` containers at once; the rest of the stack stays."""
    paths = stack.StackPaths(settings.state_dir)
    await stack.stop(paths, "executor", STACK_STOP_GRACE_S)
    components = await stack.up(level_settings(settings, level), STACK_START_TIMEOUT_S)
    for component in components:
        logger.info(
            "bench_stack component=%s state=%s pid=%s",
            component.name,
            component.state,
            component.pid,
        )


async def managed_leftovers(executor: str) -> list[str]:
    """Containers and volumes of the benchmark's executor still present after `down`."""
    label = f"label=billy.executor={executor}"
    containers = (await docker_cli("ps", "-aq", "--filter", label)).split()
    volumes = (await docker_cli("volume", "ls", "-q", "--filter", label)).split()
    if containers:
        await docker_cli("rm", "-f", *containers, check=False)
    if volumes:
        await docker_cli("volume", "rm", *volumes, check=False)
    return [f"container {c}" for c in containers] + [f"volume {v}" for v in volumes]


# -- load -------------------------------------------------------------------------------


async def drive(
    path: str, level: int, runs: int, one_run: Callable[[], Awaitable[Sample]]
) -> Batch:
    """`runs` runs by `level` workers at once, each starting its next run when one ends."""
    numbers = iter(range(runs))
    samples: list[Sample] = []

    async def worker() -> None:
        # One shared iterator: each worker takes the next run number until none are left.
        for _ in numbers:
            samples.append(await one_run())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(level, runs))))
    return Batch(path, level, samples, time.perf_counter() - started)


async def measure_level(
    level: int, runs: int, warmup_runs: int, bare: BareDocker, client: BillyToolsClient
) -> tuple[Batch, Batch, list[Batch]]:
    """Warm both paths up, then measure the bare runs and the billy-tools runs."""
    warmups = [
        await drive("docker run", level, warmup_runs, bare.run),
        await drive("billy-tools", level, warmup_runs, lambda: billy_run(client)),
    ]
    progress(f"level {level}: {runs} bare docker runs")
    bare_batch = await drive("docker run", level, runs, bare.run)
    await bare.remove_leftovers()
    progress(f"level {level}: {runs} billy-tools runs")
    billy_batch = await drive("billy-tools", level, runs, lambda: billy_run(client))
    return bare_batch, billy_batch, warmups


# -- report -----------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks (as numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def machine_lines() -> list[str]:
    memory_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return [
        f"date      {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine   {os.cpu_count()} cores, {memory_kib / 1024 / 1024:.1f} GiB memory, "
        f"kernel {platform.release()}, Python {platform.python_version()}",
    ]


def load_line(when: str) -> str:
    one, five, fifteen = os.getloadavg()
    return f"load      {when}: {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min)"


def summary_table(pairs: list[tuple[Batch, Batch]]) -> list[str]:
    header = (
        f"{'conc':>4}  {'path':<11}  {'runs':>4}  {'failed':>6}  {'p50_ms':>7}  "
        f"{'p95_ms':>7}  {'runs/s':>6}  {'p50_x':>6}  {'p95_x':>6}  {'runs/s_x':>8}"
    )
    lines = [header]
    for bare, billy in pairs:
        base = figures(bare)
        for batch in (bare, billy):
            p50, p95, rate = figures(batch)
            lines.append(
                f"{batch.level:>4}  {batch.path:<11}  {len(batch.samples):>4}  "
                f"{len(batch.failed):>6}  {p50:>7.0f}  {p95:>7.0f}  {rate:>6.2f}  "
                f"{_ratio(p50, base[0]):>6}  {_ratio(p95, base[1]):>6}  "
                f"{_ratio(rate, base[2]):>8}"
            )
    return lines


def figures(batch: Batch) -> tuple[float, float, float]:
    latencies = batch.latencies_ms()
    return percentile(latencies, 0.5), percentile(latencies, 0.95), batch.runs_per_s


def breakdown_table(billy_batches: list[Batch]) -> list[str]:
    """p50 of each timing of the succeeded billy-tools runs, one column per level."""
    width = max(len(label) for _, label in TIMING_STEPS)
    levels = "".join(f"{'conc ' + str(batch.level):>10}" for batch in billy_batches)
    lines = [f"{'p50 ms of':<{width}}{levels}"]
    for name, label in TIMING_STEPS:
        cells = ""
        for batch in billy_batches:
            values = [s.timings[name] for s in batch.samples if s.ok and name in s.timings]
            cells += f"{percentile(values, 0.5):>10.1f}"
        lines.append(f"{label:<{width}}{cells}")
    return lines


def failure_lines(batches: list[Batch]) -> list[str]:
    failed = [(batch, sample) for batch in batches for sample in batch.failed]
    return [
        f"failed    {batch.path} at concurrency {batch.level}: {sample.detail}"
        for batch, sample in failed[:FAILURES_SHOWN]
    ] + (
        [f"failed    ... {len(failed) - FAILURES_SHOWN} more"]
        if len(failed) > FAILURES_SHOWN
        else []
    )


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}" if base else "-"


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default=",".join(map(str, DEFAULT_LEVELS)))
    parser.add_argument(
        "--runs",
        default=",".join(map(str, DEFAULT_RUNS)),
        help="runs per level: one number for every level, or one per level",
    )
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP_RUNS)
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the services' logs even on success"
    )
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.levels.split(",")]
    args.runs = [int(runs) for runs in args.runs.split(",")]
    if len(args.runs) == 1:
        args.runs *= len(args.levels)
    if len(args.runs) != len(args.levels) or min(args.levels + args.runs) < 1:
        parser.error(f"--runs needs 1 or {len(args.levels)} positive numbers, --levels too")
    return args


async def bench(args: argparse.Namespace, root: Path) -> int:
    """Set up, measure each level, print the report; the exit code of the benchmark."""
    session = secrets.token_hex(4)
    tools_dir = bench_tools_dir(root)
    spec = ToolCatalog.load(tools_dir).get(TOOL)
    image_id = await check_image(spec)
    settings = Settings(
        nats_url=f"nats://127.0.0.1:{free_port()}",
        tools_dir=tools_dir,
        state_dir=root / "state",
        executor_name=f"bench-{session}",
        executor_concurrency=args.levels[0],
        # Named, so that the stack does not claim its fixed metrics ports (others use them).
        admission_metrics_port=0,
        executor_metrics_port=0,
        artifacts_metrics_port=0,
    )
    bare = BareDocker(spec, session)
    docker_version = await docker_cli("version", "--format", "{{.Server.Version}}")
    print(*machine_lines(), f"docker    Engine {docker_version}", load_line("start"), sep="\n")
    print(f"tool      {TOOL} ({spec.image.ref}, {image_id[:19]}), argv {spec.command}")
    print(f"bare      {' '.join(bare.argv(0))}\n", flush=True)

    pairs: list[tuple[Batch, Batch]] = []
    warmups: list[Batch] = []
    try:
        for level, runs in zip(args.levels, args.runs, strict=True):
            progress(f"level {level}: starting the executor with concurrency {level}")
            await start_executor(settings, level)
            async with BillyToolsClient.connect(settings, "billy-bench") as client:
                bare_batch, billy_batch, level_warmups = await measure_level(
                    level, runs, args.warmup, bare, client
                )
            pairs.append((bare_batch, billy_batch))
            warmups += level_warmups
    finally:
        await stack.down(settings, STACK_STOP_GRACE_S)
        await bare.remove_leftovers()
        leftovers = await managed_leftovers(settings.executor_name)

    print(*summary_table(pairs), "", *breakdown_table([b for _, b in pairs]), sep="\n")
    print("", load_line("end"), sep="\n")
    batches = [batch for pair in pairs for batch in pair] + warmups
    print(*failure_lines(batches), sep="\n")
    if leftovers:
        print(f"leftover  {len(leftovers)} Docker objects of the executor: {leftovers}")
    return 1 if leftovers or any(batch.failed for batch in batches) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    root = Path(tempfile.mkdtemp(prefix="billy-bench-"))
    code = 1
    try:
        code = asyncio.run(bench(args, root))
    except BillyToolsError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
    finally:
        # Keep the services' logs when something went wrong.
        if code == 0 and not args.keep_logs:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"logs kept in {root / 'state' / 'logs'}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
