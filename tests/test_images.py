"""Tool images built through the Docker Engine API (real daemon), and Dockerfile rules."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import pytest
import yaml

from shared.images import ImageBuilder, ImageBuildError
from shared.settings import REPO_ROOT
from shared.toolspec import LOCK_FILE, ToolCatalog, read_image_lock
from tests.conftest import free_port

TOOLS_DIRS = [REPO_ROOT / "tool-images", REPO_ROOT / "tests" / "tools"]
PINNED_BASE = re.compile(r"^ARG BASE=\S+@sha256:[0-9a-f]{64}$", re.MULTILINE)
BUSYBOX_DIGEST = "sha256:1487d0af5f52b4ba31c7e465126ee2123fe3f2305d638e7827681e7cf6c83d5e"
TINY_DOCKERFILE = f"""\
ARG BASE=busybox@{BUSYBOX_DIGEST}
FROM ${{BASE}}
COPY greeting.txt /greeting.txt
USER 65534:65534
"""


class TinyTool:
    """A one-tool tools directory whose image ref carries a random suffix."""

    def __init__(self, tools_dir: Path) -> None:
        self.tools_dir = tools_dir
        self.name = "tiny"
        self.ref = f"billy-test/tiny-{uuid.uuid4().hex[:8]}:1.0.0"
        self.spec_dir = tools_dir / self.name
        self.write(TINY_DOCKERFILE, base="billy/busybox:local")

    def write(self, dockerfile: str, base: str) -> None:
        self.spec_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "name": self.name,
            "version": "1.0.0",
            "image": {"ref": self.ref, "build": {"base": base}},
            "command": ["cat", "/greeting.txt"],
        }
        (self.spec_dir / "tool.yaml").write_text(yaml.safe_dump(spec))
        (self.spec_dir / "Dockerfile").write_text(dockerfile)
        (self.spec_dir / "greeting.txt").write_text("hello\n")

    def recorded(self) -> dict:
        return read_image_lock(self.tools_dir)[self.name]


async def image_or_none(docker: aiodocker.Docker, ref: str) -> dict | None:
    try:
        return await docker.images.inspect(ref)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return None
        raise


async def remove_images(docker: aiodocker.Docker, refs: list[str]) -> None:
    for ref in refs:
        if await image_or_none(docker, ref) is not None:
            await docker.images.delete(ref, force=True)


@pytest.fixture
async def tiny(tmp_path: Path, docker: aiodocker.Docker) -> AsyncIterator[TinyTool]:
    tool = TinyTool(tmp_path / "tools")
    try:
        yield tool
    finally:
        recorded = read_image_lock(tool.tools_dir).get(tool.name, {})
        await remove_images(docker, [tool.ref, *filter(None, [recorded.get("id")])])


@pytest.fixture
def local_registry(tmp_path: Path) -> Iterator[str]:
    """Debian's docker-registry on a free 127.0.0.1 port, which Docker trusts over HTTP."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("docker-registry is not installed (scripts/setup.sh installs it)")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "log": {"level": "error"},
                "storage": {"filesystem": {"rootdirectory": str(tmp_path / "registry")}},
                "http": {"addr": f"127.0.0.1:{port}"},
            }
        )
    )
    process = subprocess.Popen(
        [binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port(port, process)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"docker-registry exited with {process.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"docker-registry did not listen on {port} within {timeout_s} s")


async def run_images_cli(*args: str) -> tuple[int, str]:
    """`python -m shared.images ARGS`: exit code and stdout+stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.images",
        *args,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode or 0, output.decode()


async def test_build_records_the_image_id_that_docker_reports(
    docker: aiodocker.Docker, tiny: TinyTool
) -> None:
    [result] = await ImageBuilder(docker).build_dir(tiny.tools_dir)

    inspected = await docker.images.inspect(tiny.ref)
    assert result.skipped is False
    assert tiny.recorded()["id"] == inspected["Id"] == result.id
    assert tiny.recorded()["ref"] == tiny.ref
    assert tiny.recorded()["digest"] is None
    assert ToolCatalog.load(tiny.tools_dir).get("tiny").image.id == inspected["Id"]


async def test_built_image_is_labelled_with_tool_and_version(
    docker: aiodocker.Docker, tiny: TinyTool
) -> None:
    await ImageBuilder(docker).build_dir(tiny.tools_dir)

    labels = (await docker.images.inspect(tiny.ref))["Config"]["Labels"]
    assert labels["billy.tool"] == "tiny"
    assert labels["billy.tool_version"] == "1.0.0"


async def test_build_passes_base_argument_and_keeps_non_root_user(
    docker: aiodocker.Docker, tiny: TinyTool
) -> None:
    await ImageBuilder(docker).build_dir(tiny.tools_dir)

    image = await docker.images.inspect(tiny.ref)
    busybox = await docker.images.inspect("billy/busybox:local")
    assert image["RootFS"]["Layers"][0] == busybox["RootFS"]["Layers"][0]
    assert image["Config"]["User"] == "65534:65534"


async def test_second_build_of_unchanged_context_is_skipped(
    docker: aiodocker.Docker, tiny: TinyTool
) -> None:
    builder = ImageBuilder(docker)
    [first] = await builder.build_dir(tiny.tools_dir)
    created = (await docker.images.inspect(tiny.ref))["Created"]

    [second] = await builder.build_dir(tiny.tools_dir)

    assert second.skipped is True
    assert second.id == first.id
    assert (await docker.images.inspect(tiny.ref))["Created"] == created


async def test_changed_context_rebuilds_and_removes_the_superseded_image(
    docker: aiodocker.Docker, tiny: TinyTool
) -> None:
    builder = ImageBuilder(docker)
    [first] = await builder.build_dir(tiny.tools_dir)

    (tiny.spec_dir / "greeting.txt").write_text("hello again\n")
    [second] = await builder.build_dir(tiny.tools_dir)

    assert second.skipped is False
    assert second.id != first.id
    assert tiny.recorded()["id"] == second.id
    assert await image_or_none(docker, first.id) is None


async def test_image_removed_outside_the_builder_is_rebuilt(
    docker: aiodocker.Docker, tiny: TinyTool
) -> None:
    builder = ImageBuilder(docker)
    await builder.build_dir(tiny.tools_dir)
    await docker.images.delete(tiny.ref, force=True)

    [result] = await builder.build_dir(tiny.tools_dir)

    assert result.skipped is False
    assert (await docker.images.inspect(tiny.ref))["Id"] == tiny.recorded()["id"]


async def test_failing_build_raises_with_the_build_output(
    docker: aiodocker.Docker, tiny: TinyTool
) -> None:
    failing = TINY_DOCKERFILE.replace("COPY", "RUN echo boom-marker && exit 3\nCOPY")
    tiny.write(failing, base="billy/busybox:local")

    with pytest.raises(ImageBuildError) as caught:
        await ImageBuilder(docker).build_dir(tiny.tools_dir)

    assert caught.value.tool == "tiny"
    assert "returned a non-zero code: 3" in str(caught.value)
    assert "boom-marker" in str(caught.value)
    assert not (tiny.tools_dir / LOCK_FILE).exists()


async def test_missing_base_image_is_reported_before_building(
    docker: aiodocker.Docker, tiny: TinyTool
) -> None:
    tiny.write(TINY_DOCKERFILE, base=f"billy-test/absent-{uuid.uuid4().hex[:8]}:none")

    with pytest.raises(ImageBuildError, match=r"tool tiny: base image billy-test/absent-"):
        await ImageBuilder(docker).build_dir(tiny.tools_dir)


async def test_push_to_registry_records_the_registry_digest(
    docker: aiodocker.Docker, tiny: TinyTool, local_registry: str
) -> None:
    builder = ImageBuilder(docker, registry=local_registry)
    remote_ref = f"{local_registry}/{tiny.ref}"
    try:
        [result] = await builder.build_dir(tiny.tools_dir)

        repo_digests = (await docker.images.inspect(tiny.ref))["RepoDigests"]
        remote_repository = remote_ref.rsplit(":", 1)[0]
        assert result.digest is not None
        assert f"{remote_repository}@{result.digest}" in repo_digests
        assert tiny.recorded()["digest"] == result.digest
        assert tiny.recorded()["registry"] == local_registry
        assert ToolCatalog.load(tiny.tools_dir).get("tiny").image.digest == result.digest
    finally:
        await remove_images(docker, [remote_ref])


async def test_command_line_build_reports_and_records_each_tool(
    docker: aiodocker.Docker, tiny: TinyTool
) -> None:
    first_code, first_out = await run_images_cli("build", "--tools-dir", str(tiny.tools_dir))
    second_code, second_out = await run_images_cli("build", "--tools-dir", str(tiny.tools_dir))

    assert first_code == 0, first_out
    assert "built in" in first_out
    assert second_code == 0, second_out
    assert "up to date" in second_out
    assert tiny.recorded()["id"] == (await docker.images.inspect(tiny.ref))["Id"]


def test_lock_files_name_only_known_tools() -> None:
    # Guards the format that shared/toolspec.py reads back.
    for tools_dir in TOOLS_DIRS:
        path = tools_dir / LOCK_FILE
        if path.exists():
            lock = json.loads(path.read_text())
            assert set(lock) <= set(ToolCatalog.load(tools_dir).names())


@pytest.mark.parametrize(
    "dockerfile",
    sorted(p for d in TOOLS_DIRS for p in d.glob("*/Dockerfile")),
    ids=lambda p: p.parent.name,
)
def test_dockerfile_takes_a_pinned_base_and_runs_as_non_root(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]

    assert PINNED_BASE.search(text), "needs ARG BASE=<image>@sha256:<digest>"
    assert instructions[0].startswith("ARG BASE=")
    assert "FROM ${BASE}" in instructions
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users, "needs a USER"
    assert users[-1].split(":")[0] not in ("0", "root")
    assert not any("pip install" in line for line in instructions), "install wheels from host"
