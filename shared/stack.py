"""The embedded stack: nats-server with JetStream plus the admission, executor and artifacts
services as detached processes on this machine, kept under settings.state_dir.

    state_dir/nats/nats.conf, state_dir/nats/js/   the server's config and store
    state_dir/logs/<component>.log                  each process's output
    state_dir/run/<component>.pid                   what `up` started, for `down`
    state_dir/stack.lock                            held while `up` or `down` runs

`up` reuses whatever already answers (a NATS server at NATS_URL, a service answering its
ping), so that running it twice is harmless; `down` stops what has a pid file. A state dir
owns one nats-server (one JetStream store): `up` never starts a second one on it, and refuses
a NATS_URL naming another port than the one its server listens on.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import SecretStr

from shared.client import BillyToolsClient
from shared.errors import BillyToolsError
from shared.service import ping_subject
from shared.settings import REPO_ROOT, Settings
from shared.signing import ensure_key_file

logger = logging.getLogger(__name__)

NATS_SERVER = "nats-server"
SERVICES = ("admission", "executor", "artifacts")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
NATS_MAX_PAYLOAD = "8MB"
NATS_START_TIMEOUT_S = 10.0
SERVICE_START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
PING_TIMEOUT_S = 0.5
# Only a pause between pings while a process starts: there is no event for "ready".
PING_RETRY_S = 0.1
LOG_TAIL_LINES = 5
# Settings whose environment variable is the tool's own name rather than BILLY_*.
ENV_NAMES = {"nats_url": "NATS_URL", "docker_host": "DOCKER_HOST"}


class StackError(BillyToolsError):
    """The embedded stack could not be started or stopped; the message names the log."""


class NatsOnOtherPort(StackError):
    """The state dir's nats-server listens elsewhere than NATS_URL asks."""

    def __init__(self, paths: StackPaths, pid: int, ports: set[int], host: str, port: int):
        where = f"port {min(ports)}" if ports else "an unknown port"
        asked = f"{host}:{port}"
        use = f"NATS_URL=nats://127.0.0.1:{min(ports)}" if ports else "its NATS_URL"
        super().__init__(
            f"the nats-server of {paths.state_dir} (pid {pid}) listens on {where}, not {asked}: "
            f"use {use}, or run `billy-tools down` first"
        )
        self.pid = pid
        self.ports = ports


@dataclass
class Component:
    """One process of the stack and what `up`, `down` or `status` found or did."""

    name: str
    state: str  # started, reused, external, running, not answering, stopped, stale
    pid: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class StackPaths:
    """Where the embedded stack keeps config, store, logs and pid files."""

    state_dir: Path

    def __post_init__(self) -> None:
        # Processes start in the repo root: a relative path would name another directory.
        object.__setattr__(self, "state_dir", self.state_dir.resolve())

    @property
    def nats_config(self) -> Path:
        return self.nats_dir / "nats.conf"

    @property
    def lock_file(self) -> Path:
        return self.state_dir / "stack.lock"

    @property
    def nats_dir(self) -> Path:
        return self.state_dir / "nats"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    def log(self, component: str) -> Path:
        return self.logs_dir / f"{component}.log"

    def pid_file(self, component: str) -> Path:
        return self.run_dir / f"{component}.pid"

    def make(self) -> None:
        for folder in (self.nats_dir, self.logs_dir, self.run_dir):
            folder.mkdir(parents=True, exist_ok=True)


# -- up ---------------------------------------------------------------------------------


Progress = Callable[[str], None]


def no_progress(step: str) -> None:
    """The default progress callback: say nothing."""


async def up(
    settings: Settings,
    timeout_s: float = SERVICE_START_TIMEOUT_S,
    progress: Progress = no_progress,
) -> list[Component]:
    """Start nats-server (unless one answers) and the three services (unless they answer);
    `progress` hears each step that may take a while."""
    paths = StackPaths(settings.state_dir)
    paths.make()
    with stack_lock(paths):
        components = [await ensure_nats(settings, paths, progress)]

        client = await BillyToolsClient.open(settings, "billy-tools-stack")
        try:
            # Admission declares the streams and buckets first, so that the others find them.
            components.append(
                await ensure_service(client.nc, settings, paths, "admission", timeout_s, progress)
            )
            components += await asyncio.gather(
                *(
                    ensure_service(client.nc, settings, paths, name, timeout_s, progress)
                    for name in SERVICES[1:]
                )
            )
        finally:
            await client.close()
    return components


@contextlib.contextmanager
def stack_lock(paths: StackPaths):
    """Hold the state dir's lock: two `up`s at once could each start a nats-server."""
    with paths.lock_file.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(
                f"another billy-tools up or down is running on {paths.state_dir} "
                f"(it holds {paths.lock_file}); wait for it to end"
            ) from None
        yield


async def ensure_nats(settings: Settings, paths: StackPaths, progress: Progress) -> Component:
    """Reuse the state dir's own nats-server or one answering at settings.nats_url, else
    start one; never a second server on the state dir's store."""
    host, port = nats_address(settings)
    pid = own_nats_pid(paths)
    if pid is not None:
        ports = nats_ports(paths, pid)
        if host not in LOCAL_HOSTS or port not in ports:
            raise NatsOnOtherPort(paths, pid, ports, host, port)
        # An earlier `up` may have left it starting: wait for it rather than doubling it.
        progress(f"waiting for nats-server (pid {pid}) on {host}:{port}")
        await wait_for_nats(paths, host, port, pid, None)
        return Component(NATS_SERVER, "reused", pid, f"{host}:{port}")

    if await nats_answers(host, port):
        return Component(NATS_SERVER, "external", None, f"{host}:{port}")
    if host not in LOCAL_HOSTS:
        raise StackError(f"NATS at {host}:{port} does not answer and is not on this machine")

    progress(f"starting nats-server on {host}:{port}")
    config = write_nats_config(paths, host, port)
    binary = shutil.which(NATS_SERVER) or f"/usr/sbin/{NATS_SERVER}"
    process = spawn(NATS_SERVER, [binary, "-c", str(config)], paths, dict(os.environ))
    await wait_for_nats(paths, host, port, process.pid, process)
    logger.info("stack_nats_started pid=%d port=%d", process.pid, port)
    return Component(NATS_SERVER, "started", process.pid, f"{host}:{port}")


async def wait_for_nats(
    paths: StackPaths, host: str, port: int, pid: int, process: subprocess.Popen | None
) -> None:
    """Until nats-server greets at host:port; fails when it exits or stays silent too long."""
    deadline = time.monotonic() + NATS_START_TIMEOUT_S
    while not await nats_answers(host, port):
        if process is not None:
            check_still_running(process, NATS_SERVER, paths)
        elif not is_component(pid, NATS_SERVER, paths):
            raise StackError(f"nats-server (pid {pid}) exited; see {paths.log(NATS_SERVER)}")
        if time.monotonic() > deadline:
            raise StackError(
                f"nats-server (pid {pid}) did not answer on {host}:{port} within "
                f"{NATS_START_TIMEOUT_S:g} s; see {paths.log(NATS_SERVER)}"
            )
        await asyncio.sleep(PING_RETRY_S)


async def ensure_service(
    nc: NATS,
    settings: Settings,
    paths: StackPaths,
    name: str,
    timeout_s: float,
    progress: Progress = no_progress,
) -> Component:
    """Reuse a service that answers its ping, or start `python -m services.<name>`."""
    answer = await ping(nc, name)
    if answer is not None:
        state = "reused" if live_pid(paths, name) else "external"
        return Component(name, state, answer.get("pid"), answer.get("instance", ""))

    # One started by an earlier `up` may still be starting: wait for it, do not double it.
    pid = live_pid(paths, name)
    process = None
    if pid is None:
        argv = [sys.executable, "-m", f"services.{name}"]
        process = spawn(name, argv, paths, service_env(settings))
        pid = process.pid
    progress(f"waiting for {name} (pid {pid}) to answer {ping_subject(name)}")
    answer = await wait_for_ping(nc, paths, name, pid, process, timeout_s)
    logger.info("stack_service_started service=%s pid=%d", name, pid)
    return Component(name, "started" if process else "reused", pid, answer.get("instance", ""))


async def wait_for_ping(
    nc: NATS,
    paths: StackPaths,
    name: str,
    pid: int,
    process: subprocess.Popen | None,
    timeout_s: float,
) -> dict:
    """The service's first ping answer; fails when it exits or stays silent for timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (answer := await ping(nc, name)) is None:
        if process is not None:
            check_still_running(process, name, paths)
        elif not is_component(pid, name, paths):
            raise StackError(f"{name} (pid {pid}) exited while starting; see {paths.log(name)}")
        if time.monotonic() > deadline:
            raise StackError(
                f"{name} (pid {pid}) did not answer {ping_subject(name)} within "
                f"{timeout_s:g} s; see {paths.log(name)}"
            )
        await asyncio.sleep(PING_RETRY_S)
    return answer


def spawn(name: str, argv: list[str], paths: StackPaths, env: dict[str, str]) -> subprocess.Popen:
    """Start a detached process (own session) logging to logs/<name>.log; writes its pid file."""
    with paths.log(name).open("ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {argv}\n".encode())
        log.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
        )
    paths.pid_file(name).write_text(f"{process.pid}\n")
    return process


def check_still_running(process: subprocess.Popen, name: str, paths: StackPaths) -> None:
    """Fail fast, with the end of its log, when a starting process already exited."""
    code = process.poll()
    if code is None:
        return
    paths.pid_file(name).unlink(missing_ok=True)
    raise StackError(
        f"{name} exited with code {code} while starting; see {paths.log(name)}: "
        f"{log_tail(paths.log(name))}"
    )


def write_nats_config(paths: StackPaths, host: str, port: int) -> Path:
    config = paths.nats_config
    store_dir = paths.nats_dir / "js"
    config.write_text(
        f'listen: "{host}:{port}"\n'
        f"max_payload: {NATS_MAX_PAYLOAD}\n"
        f'jetstream {{ store_dir: "{store_dir}" }}\n'
    )
    return config


# Where the embedded stack serves Prometheus metrics, unless settings name other ports.
EMBEDDED_METRICS_PORTS = {
    "admission_metrics_port": 9471,
    "executor_metrics_port": 9472,
    "artifacts_metrics_port": 9473,
}


def embedded_executor_name(settings: Settings) -> str:
    """`<host>-<hash of the state dir>`: one name per embedded stack on a host."""
    state = str(settings.state_dir.resolve()).encode()
    return f"{socket.gethostname()}-{hashlib.sha256(state).hexdigest()[:8]}"


def service_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a service process exactly these settings."""
    env = dict(os.environ)
    defaults = {
        # Stable per state dir: the next executor of this stack removes what a crashed one
        # left behind, and never what another stack's executor is running.
        "executor_name": embedded_executor_name(settings),
        # Admission signs work items and the executor refuses unsigned ones.
        "work_signing_key": ensure_key_file(settings.state_dir / "work-signing.key"),
        **EMBEDDED_METRICS_PORTS,
    }
    for field in Settings.model_fields:
        value = getattr(settings, field)
        if field in defaults and field not in settings.model_fields_set:
            value = defaults[field]
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, Path):
            # The service starts in the repo root, not in the caller's directory.
            value = value.resolve()
        env[ENV_NAMES.get(field, f"BILLY_{field.upper()}")] = str(value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


# -- down -------------------------------------------------------------------------------


async def down(settings: Settings, grace_s: float = STOP_GRACE_S) -> list[Component]:
    """Stop what `up` started (services first, then nats-server): SIGTERM, then SIGKILL."""
    paths = StackPaths(settings.state_dir)
    if not paths.state_dir.is_dir():
        return []
    with stack_lock(paths):
        stopped = list(await asyncio.gather(*(stop(paths, name, grace_s) for name in SERVICES)))
        stopped.append(await stop(paths, NATS_SERVER, grace_s))
        # A nats-server of this store whose pid file was lost or overwritten goes too.
        for pid in nats_pids(paths):
            stopped.append(await stop_process(paths, NATS_SERVER, pid, grace_s))
    return [component for component in stopped if component is not None]


async def stop(paths: StackPaths, name: str, grace_s: float) -> Component | None:
    """Stop one component by its pid file; None when there is no pid file."""
    pid = read_pid(paths.pid_file(name))
    if pid is None:
        return None
    if not is_component(pid, name, paths):
        paths.pid_file(name).unlink(missing_ok=True)
        return Component(name, "stale", pid, "pid file removed; process already gone")
    component = await stop_process(paths, name, pid, grace_s)
    paths.pid_file(name).unlink(missing_ok=True)
    return component


async def stop_process(paths: StackPaths, name: str, pid: int, grace_s: float) -> Component:
    """SIGTERM, then SIGKILL to its process group after grace_s."""
    os.kill(pid, signal.SIGTERM)
    how = "SIGTERM"
    if not await wait_exit(pid, grace_s):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        how = f"SIGKILL after {grace_s:g} s"
        await wait_exit(pid, grace_s)
    logger.info("stack_stopped component=%s pid=%d how=%s", name, pid, how)
    return Component(name, "stopped", pid, how)


async def wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait (on a pidfd, not by polling) until the process exits; reaps it if ours."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(True))
    try:
        await asyncio.wait_for(exited, timeout_s)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    reap(pid)
    return True


def reap(pid: int) -> None:
    """Collect the exit status of a child of this process (so no zombie stays behind)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# -- status -----------------------------------------------------------------------------


async def status(settings: Settings) -> list[Component]:
    """What runs: the NATS server and each service (pid file, ping answer)."""
    paths = StackPaths(settings.state_dir)
    host, port = nats_address(settings)
    nats_pid = own_nats_pid(paths, adopt=False)
    if nats_pid is not None:
        ports = nats_ports(paths, nats_pid)
        if host not in LOCAL_HOSTS or port not in ports:
            on_port = f"listens on port {min(ports)}" if ports else "listens elsewhere"
            detail = f"{on_port}, not on {host}:{port} (NATS_URL)"
            services = [Component(name, "unknown", live_pid(paths, name)) for name in SERVICES]
            return [Component(NATS_SERVER, "other port", nats_pid, detail), *services]
    if not await nats_answers(host, port):
        down_state = "not answering" if nats_pid else "stopped"
        services = [Component(name, "unknown", live_pid(paths, name)) for name in SERVICES]
        return [Component(NATS_SERVER, down_state, nats_pid, f"{host}:{port}"), *services]

    components = [Component(NATS_SERVER, "running", nats_pid, f"{host}:{port}")]
    client = await BillyToolsClient.open(settings, "billy-tools-status")
    try:
        for name in SERVICES:
            components.append(await service_status(client.nc, paths, name))
    finally:
        await client.close()
    return components


async def service_status(nc: NATS, paths: StackPaths, name: str) -> Component:
    pid = live_pid(paths, name)
    answer = await ping(nc, name)
    if answer is not None:
        detail = f"{answer.get('instance', '')} up {answer.get('uptime_s', 0):.0f} s"
        return Component(name, "running", answer.get("pid", pid), detail)
    return Component(name, "not answering" if pid else "stopped", pid, str(paths.log(name)))


# -- probes -----------------------------------------------------------------------------


def nats_address(settings: Settings) -> tuple[str, int]:
    """Host and port of the first server in settings.nats_url."""
    url = urlsplit(settings.nats_servers()[0])
    return url.hostname or "127.0.0.1", url.port or 4222


async def nats_answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when a NATS server greets us (INFO) at host:port."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                greeting = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return greeting.startswith(b"INFO ")


async def ping(nc: NATS, service: str) -> dict | None:
    """The first answer on billy.ping.<service>, or None when nobody answers."""
    try:
        msg = await nc.request(ping_subject(service), b"", timeout=PING_TIMEOUT_S)
    except (NoRespondersError, NatsTimeoutError):
        return None
    try:
        return json.loads(msg.data)
    except json.JSONDecodeError:
        return {}


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def live_pid(paths: StackPaths, name: str) -> int | None:
    """The pid from the component's pid file when that process still runs."""
    pid = read_pid(paths.pid_file(name))
    return pid if pid is not None and is_component(pid, name, paths) else None


def own_nats_pid(paths: StackPaths, adopt: bool = True) -> int | None:
    """The live nats-server of this state dir: its pid file's, else one found in /proc
    (then, with adopt, written to the pid file so that `down` and `status` see it)."""
    pid = live_pid(paths, NATS_SERVER)
    if pid is not None:
        return pid
    found = nats_pids(paths)
    if not found:
        return None
    if adopt:
        logger.warning("stack_nats_adopted pid=%d state_dir=%s", found[0], paths.state_dir)
        paths.pid_file(NATS_SERVER).write_text(f"{found[0]}\n")
    return found[0]


def nats_pids(paths: StackPaths) -> list[int]:
    """Every live nats-server started with this state dir's config."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return sorted(pid for pid in pids if is_component(pid, NATS_SERVER, paths))


def nats_ports(paths: StackPaths, pid: int) -> set[int]:
    """The TCP ports nats-server `pid` listens on; while it starts, its config's port."""
    ports = listening_ports(pid)
    if ports:
        return ports
    try:
        listen = re.search(r'listen: "[^"]*:(\d+)"', paths.nats_config.read_text())
    except OSError:
        return set()
    return {int(listen.group(1))} if listen else set()


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state whose socket process `pid` holds (from /proc)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # fields: sl, local_address, rem_address, st (0A is LISTEN), ..., inode (10th)
            if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def command_line(pid: int) -> list[str] | None:
    """The argv of a live process; None when it is gone or a zombie (then reaped)."""
    proc = Path(f"/proc/{pid}")
    try:
        argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    if state == "Z":
        reap(pid)
        return None
    return [arg for arg in argv if arg]


def is_component(pid: int, name: str, paths: StackPaths) -> bool:
    """True when `pid` is alive (not a zombie) and its command line is the component's
    (for nats-server: run with this state dir's config), so that a recycled pid is never
    signalled."""
    argv = command_line(pid)
    if not argv:
        return False
    if name == NATS_SERVER:
        return Path(argv[0]).name == NATS_SERVER and str(paths.nats_config) in argv
    return f"services.{name}" in argv


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-lines:])
