"""The run's workspace: a size-bounded tmpfs volume mounted at /workspace, held by a keeper.

The volume is a local-driver volume with tmpfs options, so the kernel enforces
`workspace_bytes` (a write past it fails with ENOSPC). A tmpfs is unmounted, and its
files lost, when the last container using it stops; so a tiny hardened "keeper"
container (a busybox `sleep`, no network, read-only, no capabilities) mounts it for the
run's whole life. The workspace is filled through the keeper before the tool starts (in/
with the input files, an empty out/ for the tool, and arguments.json) and out/ is read
from the keeper after the tool exited; then both containers and the volume are removed.

tmpfs pages are charged to the memory cgroup of the process that writes them: what the
tool writes to its workspace (and to /tmp) counts against its `memory_bytes`, and cannot
be swapped out. The tar for the upload is built from names and bytes in memory; no host
path is involved.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
import time
from typing import Any

import aiodocker
from aiodocker.containers import DockerContainer

from services.executor.errors import docker_errors
from services.executor.model import RunContext
from services.executor.policy import WORKSPACE_DIR, tool_user, workspace_mount

logger = logging.getLogger(__name__)

INPUT_DIR_MODE = 0o555
INPUT_FILE_MODE = 0o444
OUTPUT_DIR_MODE = 0o700
ARGUMENTS_MODE = 0o444
# Like a disk volume's root: root-owned, so out/ stays the tool's only writable place.
WORKSPACE_ROOT_OPTIONS = "uid=0,gid=0,mode=0755"

DEFAULT_KEEPER_IMAGE = "billy/busybox:local"
KEEPER_ROLE_LABEL = "billy.role"
KEEPER_ROLE = "workspace-keeper"
KEEPER_USER = "65534:65534"
# busybox sleep and a `stat -f` exec at most; the tmpfs pages are charged to the writer.
KEEPER_MEMORY_BYTES = 16 * 1024 * 1024
KEEPER_PIDS = 8
KEEPER_NANO_CPUS = 100_000_000
# The keeper outlives the tool's timeout by this much, then ends by itself: should the
# executor die, the workspace's memory is freed even before leftovers are removed.
KEEPER_MARGIN_S = 900


def volume_options(context: RunContext) -> dict[str, str]:
    """Local-driver options that make the volume a tmpfs of `workspace_bytes`."""
    size = context.limits.workspace_bytes
    return {
        "type": "tmpfs",
        "device": "tmpfs",
        "o": f"size={size},{WORKSPACE_ROOT_OPTIONS},nosuid,nodev",
    }


async def create_volume(docker: aiodocker.Docker, name: str, context: RunContext) -> None:
    """Create the run's workspace volume (local driver, tmpfs), labelled like the run."""
    config = {
        "Name": name,
        "Driver": "local",
        "DriverOpts": volume_options(context),
        "Labels": context.labels(),
    }
    with docker_errors(f"create volume {name}"):
        await docker.volumes.create(config)


def keeper_name(name: str) -> str:
    """Name of the keeper container of the run whose container and volume are `name`."""
    return f"{name}-keeper"


def keeper_config(context: RunContext, image: str, volume: str) -> dict[str, Any]:
    """The create body of the keeper: `sleep` with the workspace mounted, nothing else."""
    lifetime_s = math.ceil(context.limits.timeout_s + context.limits.stop_grace_s)
    return {
        "Image": image,
        "Cmd": ["sleep", str(lifetime_s + KEEPER_MARGIN_S)],
        "User": KEEPER_USER,
        "Labels": {**context.labels(), KEEPER_ROLE_LABEL: KEEPER_ROLE},
        "NetworkDisabled": True,
        "AttachStdout": False,
        "AttachStderr": False,
        "HostConfig": {
            "NetworkMode": "none",
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "ReadonlyRootfs": True,
            "Memory": KEEPER_MEMORY_BYTES,
            "MemorySwap": KEEPER_MEMORY_BYTES,
            "PidsLimit": KEEPER_PIDS,
            "NanoCpus": KEEPER_NANO_CPUS,
            "IpcMode": "private",
            "RestartPolicy": {"Name": "no"},
            "LogConfig": {"Type": "none", "Config": {}},
            "Mounts": [workspace_mount(volume)],
        },
    }


async def start_keeper(docker: aiodocker.Docker, context: RunContext, image: str, name: str) -> str:
    """Create and start the keeper of volume `name`; its container id."""
    config = keeper_config(context, image, name)
    with docker_errors(f"start workspace keeper {keeper_name(name)}"):
        keeper = await docker.containers.create(config, name=keeper_name(name))
        await keeper.start()
    return keeper.id


async def workspace_full(docker: aiodocker.Docker, keeper_id: str) -> bool:
    """Whether the workspace tmpfs has no free block left (a write past it got ENOSPC)."""
    keeper = DockerContainer(docker, id=keeper_id)
    with docker_errors(f"stat the workspace of keeper {keeper_id[:12]}"):
        execution = await keeper.exec(["stat", "-f", "-c", "%f", WORKSPACE_DIR], user=KEEPER_USER)
        async with execution.start(detach=False) as stream:
            output = bytearray()
            while (message := await stream.read_out()) is not None:
                output += message.data
    return output.strip() == b"0"


async def remove_volume(docker: aiodocker.Docker, name: str) -> None:
    """Remove the workspace volume; one already gone is fine."""
    with docker_errors(f"remove volume {name}"):
        try:
            await aiodocker.volumes.DockerVolume(docker, name).delete()
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise


async def upload_workspace(docker: aiodocker.Docker, container_id: str, archive: bytes) -> None:
    """Extract the workspace tar into /workspace through the keeper (or a created container)."""
    with docker_errors(f"upload workspace ({len(archive)} bytes)"):
        async with docker._query(
            f"containers/{container_id}/archive",
            method="PUT",
            params={"path": WORKSPACE_DIR},
            data=archive,
            headers={"Content-Type": "application/x-tar"},
        ) as response:
            await response.read()


def workspace_archive(context: RunContext) -> bytes:
    """The tar of in/, each input file, out/ and arguments.json, with owners and modes."""
    uid, gid = tool_user(context.spec.user)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_entry("in", tarfile.DIRTYPE, INPUT_DIR_MODE, uid, gid))
        for item in context.inputs:
            info = _entry(f"in/{item.name}", tarfile.REGTYPE, INPUT_FILE_MODE, uid, gid)
            info.size = len(item.data)
            tar.addfile(info, io.BytesIO(item.data))
        tar.addfile(_entry("out", tarfile.DIRTYPE, OUTPUT_DIR_MODE, uid, gid))
        # Root-owned and read-only: the tool can read its arguments but not rewrite them.
        arguments = json.dumps(context.arguments, sort_keys=True).encode()
        info = _entry("arguments.json", tarfile.REGTYPE, ARGUMENTS_MODE, 0, 0)
        info.size = len(arguments)
        tar.addfile(info, io.BytesIO(arguments))
    return buffer.getvalue()


def _entry(name: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = int(time.time())
    return info
