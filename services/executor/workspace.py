"""The run's workspace: a named, disk-backed Docker volume mounted at /workspace.

It is filled through the archive endpoint after create and before start: in/ with the
input files, an empty out/ for the tool, and arguments.json. The tar is built from names
and bytes in memory; no host path is involved.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time

import aiodocker

from services.executor.errors import docker_errors
from services.executor.model import RunContext
from services.executor.policy import WORKSPACE_DIR, tool_user

logger = logging.getLogger(__name__)

INPUT_DIR_MODE = 0o555
INPUT_FILE_MODE = 0o444
OUTPUT_DIR_MODE = 0o700
ARGUMENTS_MODE = 0o444


async def create_volume(docker: aiodocker.Docker, name: str, labels: dict[str, str]) -> None:
    """Create the run's workspace volume (local driver, on disk), labelled like the run."""
    with docker_errors(f"create volume {name}"):
        await docker.volumes.create({"Name": name, "Driver": "local", "Labels": labels})


async def remove_volume(docker: aiodocker.Docker, name: str) -> None:
    """Remove the workspace volume; one already gone is fine."""
    with docker_errors(f"remove volume {name}"):
        try:
            await aiodocker.volumes.DockerVolume(docker, name).delete()
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise


async def upload_workspace(docker: aiodocker.Docker, container_id: str, archive: bytes) -> None:
    """Extract the workspace tar into /workspace of the created (not started) container."""
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
