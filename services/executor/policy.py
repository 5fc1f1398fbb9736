"""The hardened baseline: the Docker Engine API create body of a tool's container.

A pure function of the run, so that every item can be unit-tested. Field names are the
Engine API's (POST /containers/create, API 1.41).
"""

from __future__ import annotations

import math
from typing import Any

from services.executor.command import Argv
from services.executor.model import RunContext

WORKSPACE_DIR = "/workspace"
INPUT_DIR = f"{WORKSPACE_DIR}/in"
OUTPUT_DIR = f"{WORKSPACE_DIR}/out"
ARGUMENTS_FILE = f"{WORKSPACE_DIR}/arguments.json"

NOFILE_LIMIT = 1024
NANO_CPUS_PER_CPU = 1_000_000_000
# gVisor's sandbox lives in the container's pids cgroup: with runsc's default ptrace
# platform we measured ~54 host threads idle and ~7.5 more per process of the tool.
RUNSC_SANDBOX_PIDS = 64
RUNSC_PIDS_PER_PROCESS = 8


def tool_user(user: str) -> tuple[int, int]:
    """uid and gid of the ToolSpec's user; a missing gid is the uid, never root's 0."""
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def container_config(context: RunContext, image_id: str, argv: Argv, volume: str) -> dict[str, Any]:
    """The create body of the run's container: image id, argv, environment and HostConfig."""
    uid, gid = tool_user(context.spec.user)
    config: dict[str, Any] = {
        "Image": image_id,
        "Cmd": argv.command,
        "User": f"{uid}:{gid}",
        "WorkingDir": WORKSPACE_DIR,
        "Env": container_env(context),
        "Labels": context.labels(),
        "NetworkDisabled": True,
        "Tty": False,
        "OpenStdin": False,
        "StdinOnce": False,
        "AttachStdin": False,
        "AttachStdout": True,
        "AttachStderr": True,
        "StopSignal": "SIGTERM",
        "StopTimeout": math.ceil(context.limits.stop_grace_s),
        "HostConfig": host_config(context, volume),
    }
    if argv.entrypoint is not None:
        config["Entrypoint"] = argv.entrypoint
    return config


def container_env(context: RunContext) -> list[str]:
    """The ToolSpec's environment, then the runtime's BILLY_* and trace variables."""
    env = dict(context.spec.env)
    env.update(
        {
            "BILLY_RUN_ID": context.run_id,
            "BILLY_INPUT_DIR": INPUT_DIR,
            "BILLY_OUTPUT_DIR": OUTPUT_DIR,
            "BILLY_ARGUMENTS": ARGUMENTS_FILE,
        }
    )
    env.update(context.trace_env)
    return [f"{name}={value}" for name, value in env.items()]


def host_config(context: RunContext, volume: str) -> dict[str, Any]:
    """Limits, isolation and the one mount: the run's workspace volume."""
    limits = context.limits
    return {
        "NetworkMode": "none",
        "CapDrop": ["ALL"],
        "CapAdd": None,
        # no-new-privileges only: Docker's default seccomp profile stays in force.
        "SecurityOpt": ["no-new-privileges"],
        "Privileged": False,
        # Always named: a daemon whose default-runtime is something else must not choose.
        "Runtime": context.spec.runtime,
        "ReadonlyRootfs": context.spec.filesystem.read_only_root,
        "Tmpfs": {"/tmp": tmp_options(context)},
        "PidsLimit": pids_limit(context),
        "Memory": limits.memory_bytes,
        # Equal to Memory: no swap, so a memory hog meets the OOM killer, not the disk.
        "MemorySwap": limits.memory_bytes,
        "NanoCpus": int(limits.cpus * NANO_CPUS_PER_CPU),
        # No nproc: RLIMIT_NPROC counts every process of the uid on the host, across all
        # tool containers of that uid; PidsLimit is the per-container bound.
        "Ulimits": [
            {"Name": "nofile", "Soft": NOFILE_LIMIT, "Hard": NOFILE_LIMIT},
            {"Name": "core", "Soft": 0, "Hard": 0},
            {"Name": "fsize", "Soft": fsize_limit(context), "Hard": fsize_limit(context)},
        ],
        # docker-init as PID 1 forwards SIGTERM and reaps the tool's zombies.
        "Init": True,
        "IpcMode": "private",
        "PidMode": "",
        "UTSMode": "",
        "Devices": [],
        "PortBindings": {},
        "PublishAllPorts": False,
        "Binds": None,
        "VolumesFrom": None,
        "RestartPolicy": {"Name": "no"},
        "AutoRemove": False,
        # Output is read through attach; the daemon must not keep an unbounded log.
        "LogConfig": {"Type": "none", "Config": {}},
        "Mounts": [workspace_mount(volume)],
    }


def pids_limit(context: RunContext) -> int:
    """PidsLimit: the tool's processes, plus room for runsc's own threads under gVisor."""
    pids = context.limits.pids
    if context.spec.runtime == "runsc":
        return RUNSC_SANDBOX_PIDS + RUNSC_PIDS_PER_PROCESS * pids
    return pids


def fsize_limit(context: RunContext) -> int:
    """RLIMIT_FSIZE in bytes: no file larger than the biggest filesystem the tool is given.

    Bounds files where no tmpfs does: a writable root (an approved relaxation) is the
    container's layer on the host's disk, which has no size quota.
    """
    return max(context.limits.workspace_bytes, context.limits.tmp_bytes)


def tmp_options(context: RunContext) -> str:
    """/tmp's tmpfs options; owned by the tool, since an image without /tmp gets root 0755."""
    uid, gid = tool_user(context.spec.user)
    size = context.limits.tmp_bytes
    return f"rw,noexec,nosuid,nodev,size={size},uid={uid},gid={gid}"


def workspace_mount(volume: str) -> dict[str, Any]:
    """The run's workspace volume at /workspace; NoCopy keeps the image's files out."""
    return {
        "Type": "volume",
        "Source": volume,
        "Target": WORKSPACE_DIR,
        "ReadOnly": False,
        "VolumeOptions": {"NoCopy": True},
    }
