"""Image provenance against the real Docker daemon and a real docker-registry: the build
pushes and records the registry digest, the executor runs only the recorded image (pulled by
digest when it is missing) and refuses any other, and the build refuses images that would
run as root or point into /proc."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import aiohttp
import pytest
import yaml

from services.executor.image import pinned_reference
from services.executor.model import RunContext, RunOutcome
from services.executor.runner import DockerRunner
from shared.image_config import is_under_proc, proc_paths, runs_as_root
from shared.images import (
    ImageBuilder,
    ImageRefusedError,
    context_tar,
    image_refusals,
    split_ref,
)
from shared.settings import REPO_ROOT
from shared.toolspec import LOCK_FILE, ToolCatalog, ToolSpec, read_image_lock
from tests.conftest import free_port, managed_leftovers
from tests.executor.conftest import RecordingReporter, RecordingSink, effective_limits
from tests.test_images import wait_for_port

BUSYBOX = "billy/busybox:local"
EXECUTOR = f"test-provenance-{uuid.uuid4().hex[:8]}"
NO_LEFTOVERS = {"containers": [], "volumes": [], "networks": []}
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKERFILE = """\
ARG BASE=busybox@sha256:1487d0af5f52b4ba31c7e465126ee2123fe3f2305d638e7827681e7cf6c83d5e
FROM ${BASE}
COPY greeting.txt /greeting.txt
USER 65534:65534
"""
ROOT_DOCKERFILE = DOCKERFILE.replace("USER 65534:65534\n", "")


class ToolDir:
    """A tools directory with one tool whose name (so its image labels) and ref are unique."""

    def __init__(self, tools_dir: Path) -> None:
        self.tools_dir = tools_dir
        self.name = f"prov-{uuid.uuid4().hex[:8]}"
        self.ref = f"billy-test/{self.name}:1.0.0"
        self.spec_dir = tools_dir / self.name

    def write(self, dockerfile: str = DOCKERFILE, greeting: str = "hello\n", **fields) -> None:
        self.spec_dir.mkdir(parents=True, exist_ok=True)
        spec = {
            "name": self.name,
            "version": "1.0.0",
            "image": {"ref": self.ref, "build": {"base": BUSYBOX}},
            "command": ["cat", "/greeting.txt"],
            "outputs": {"artifacts": []},
            **fields,
        }
        (self.spec_dir / "tool.yaml").write_text(yaml.safe_dump(spec))
        (self.spec_dir / "Dockerfile").write_text(dockerfile)
        (self.spec_dir / "greeting.txt").write_text(greeting)

    def recorded(self) -> dict:
        return read_image_lock(self.tools_dir)[self.name]

    def spec(self) -> ToolSpec:
        """The ToolSpec as the catalog loads it: id and digest from the lock."""
        return ToolCatalog.load(self.tools_dir).get(self.name)


async def image_or_none(docker: aiodocker.Docker, reference: str) -> dict | None:
    try:
        return await docker.images.inspect(reference)
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            return None
        raise


async def images_of(docker: aiodocker.Docker, tool: ToolDir) -> list[dict]:
    """Every local image built for the tool: the builder labels each with billy.tool."""
    return await docker.images.list(filters={"label": [f"billy.tool={tool.name}"]})


@pytest.fixture
async def tool(tmp_path: Path, docker: aiodocker.Docker) -> AsyncIterator[ToolDir]:
    created = ToolDir(tmp_path / "tools")
    created.write()
    try:
        yield created
    finally:
        for image in await images_of(docker, created):
            await docker.images.delete(image["Id"], force=True)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's docker-registry on a free 127.0.0.1 port with its own storage; one per module
    (every test pushes its own repository)."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.skip("docker-registry is not installed (scripts/setup.sh installs it)")
    state_dir = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = {
        "version": 0.1,
        "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(state_dir / "storage")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    (state_dir / "config.yml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [binary, "serve", str(state_dir / "config.yml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(autouse=True)
async def no_leftovers(docker: aiodocker.Docker) -> AsyncIterator[None]:
    yield
    leftovers = await managed_leftovers(docker, EXECUTOR)
    if leftovers != NO_LEFTOVERS:
        await DockerRunner(docker).remove_leftovers(EXECUTOR)
    assert leftovers == NO_LEFTOVERS


async def build_impostor(docker: aiodocker.Docker, tool: ToolDir, tmp_path: Path) -> str:
    """Build other content under the tool's tag, as a re-tag or a rebuild elsewhere would."""
    context_dir = tmp_path / "impostor"
    context_dir.mkdir()
    (context_dir / "Dockerfile").write_text(DOCKERFILE)
    (context_dir / "greeting.txt").write_text("not what was recorded\n")
    async for _ in docker.images.build(
        fileobj=io.BytesIO(context_tar(context_dir)),
        encoding="identity",
        tag=tool.ref,
        buildargs={"BASE": BUSYBOX},
        labels={"billy.tool": tool.name},
        rm=True,
        forcerm=True,
        stream=True,
    ):
        pass
    return (await docker.images.inspect(tool.ref))["Id"]


async def run_tool(
    docker: aiodocker.Docker, spec: ToolSpec, registry: str | None = None
) -> tuple[RunOutcome, RecordingReporter]:
    """Run the tool through DockerRunner as an executor would."""
    reporter = RecordingReporter()
    context = RunContext(
        run_id=f"run-{uuid.uuid4().hex}",
        tenant="test-tenant",
        tool=spec.name,
        executor=EXECUTOR,
        spec=spec,
        arguments={},
        inputs=[],
        limits=effective_limits(spec),
    )
    outcome = await DockerRunner(docker, registry=registry).run(context, reporter, RecordingSink())
    return outcome, reporter


async def registry_manifest_digest(registry: str, ref: str) -> str:
    """The digest the registry itself reports for `ref`'s tag."""
    repository, tag = split_ref(ref)
    url = f"http://{registry}/v2/{repository}/manifests/{tag}"
    async with (
        aiohttp.ClientSession() as session,
        session.head(url, headers={"Accept": MANIFEST_V2}) as response,
    ):
        assert response.status == 200, url
        return response.headers["Docker-Content-Digest"]


# --- the build records what the registry serves -------------------------------------------


async def test_push_records_the_manifest_digest_that_the_registry_serves(
    docker: aiodocker.Docker, tool: ToolDir, registry: str
) -> None:
    [built] = await ImageBuilder(docker, registry=registry).build_dir(tool.tools_dir)

    served = await registry_manifest_digest(registry, tool.ref)
    assert built.digest == served
    assert tool.recorded()["digest"] == served
    assert tool.recorded()["registry"] == registry
    assert tool.spec().image.digest == served
    assert tool.spec().image.id == (await docker.images.inspect(tool.ref))["Id"]


async def test_build_pushes_again_when_the_local_image_lost_its_registry_digest(
    docker: aiodocker.Docker, tool: ToolDir, registry: str
) -> None:
    builder = ImageBuilder(docker, registry=registry)
    [first] = await builder.build_dir(tool.tools_dir)
    # Untagging the last registry tag drops the image's RepoDigests entry too.
    await docker.images.delete(f"{registry}/{tool.ref}")
    assert (await docker.images.inspect(tool.ref))["RepoDigests"] == []

    [second] = await builder.build_dir(tool.tools_dir)

    assert second.skipped is False
    assert second.digest == first.digest
    repo_digests = (await docker.images.inspect(tool.ref))["RepoDigests"]
    assert [entry.rpartition("@")[2] for entry in repo_digests] == [first.digest]


# --- the executor runs only the recorded image --------------------------------------------


async def test_missing_image_is_pulled_by_digest_and_runs(
    docker: aiodocker.Docker, tool: ToolDir, registry: str
) -> None:
    await ImageBuilder(docker, registry=registry).build_dir(tool.tools_dir)
    spec = tool.spec()
    await docker.images.delete(spec.image.id, force=True)
    assert await images_of(docker, tool) == []

    outcome, reporter = await run_tool(docker, spec, registry=registry)

    pinned = pinned_reference(registry, tool.ref, spec.image.digest)
    assert (outcome.status, outcome.stdout) == ("succeeded", b"hello\n")
    [pulled] = reporter.of_type("image_pulled")
    assert pulled.data == {"image": pinned}
    [ensured] = reporter.of_type("image_ensured")
    assert ensured.data == {"image": pinned, "image_id": spec.image.id, "pulled": True}


async def test_retagged_image_is_rejected_with_image_digest_mismatch(
    docker: aiodocker.Docker, tool: ToolDir, registry: str, tmp_path: Path
) -> None:
    await ImageBuilder(docker, registry=registry).build_dir(tool.tools_dir)
    spec = tool.spec()
    impostor_id = await build_impostor(docker, tool, tmp_path)

    outcome, reporter = await run_tool(docker, spec)

    assert (outcome.status, outcome.reason) == ("rejected", "image_digest_mismatch")
    assert outcome.message == (
        f"image {tool.ref}: expected id {spec.image.id} and digest {spec.image.digest}, "
        f"found id {impostor_id} and digests (none)"
    )
    assert outcome.exit_code is None
    assert reporter.events == []


async def test_retagged_image_with_a_registry_runs_the_content_pinned_by_digest(
    docker: aiodocker.Docker, tool: ToolDir, registry: str, tmp_path: Path
) -> None:
    await ImageBuilder(docker, registry=registry).build_dir(tool.tools_dir)
    spec = tool.spec()
    await build_impostor(docker, tool, tmp_path)

    outcome, reporter = await run_tool(docker, spec, registry=registry)

    assert (outcome.status, outcome.stdout) == ("succeeded", b"hello\n")
    [ensured] = reporter.of_type("image_ensured")
    assert ensured.data["image_id"] == spec.image.id


async def test_image_pulled_by_digest_with_another_id_than_recorded_is_rejected(
    docker: aiodocker.Docker, tool: ToolDir, registry: str
) -> None:
    await ImageBuilder(docker, registry=registry).build_dir(tool.tools_dir)
    spec = tool.spec()
    busybox_id = (await docker.images.inspect(BUSYBOX))["Id"]
    # A lock whose id was edited: the digest and the id no longer name the same image.
    edited = spec.model_copy(update={"image": spec.image.model_copy(update={"id": busybox_id})})

    outcome, _ = await run_tool(docker, edited, registry=registry)

    pinned = pinned_reference(registry, tool.ref, spec.image.digest)
    assert (outcome.status, outcome.reason) == ("rejected", "image_digest_mismatch")
    assert outcome.message.startswith(
        f"image {pinned}: expected id {busybox_id} and digest {spec.image.digest}, "
        f"found id {spec.image.id} and digests "
    )


async def test_recorded_digest_not_carried_by_the_local_image_is_rejected_without_registry(
    docker: aiodocker.Docker, tool: ToolDir
) -> None:
    await ImageBuilder(docker).build_dir(tool.tools_dir)
    spec = tool.spec()
    digest = "sha256:" + "5" * 64
    pinned = spec.model_copy(update={"image": spec.image.model_copy(update={"digest": digest})})

    outcome, reporter = await run_tool(docker, pinned)

    assert (outcome.status, outcome.reason) == ("rejected", "image_digest_mismatch")
    assert outcome.message == (
        f"image {tool.ref}: expected id {spec.image.id} and digest {digest}, "
        f"found id {spec.image.id} and digests (none)"
    )
    assert reporter.events == []


async def test_image_with_working_dir_in_proc_is_rejected_at_run_time(
    docker: aiodocker.Docker, tool: ToolDir, tmp_path: Path
) -> None:
    # Built around the builder, as an image from elsewhere would be.
    tool.write(DOCKERFILE.replace("USER", "WORKDIR /proc/self/fd/7\nUSER"))
    async for _ in docker.images.build(
        fileobj=io.BytesIO(context_tar(tool.spec_dir)),
        encoding="identity",
        tag=tool.ref,
        buildargs={"BASE": BUSYBOX},
        labels={"billy.tool": tool.name},
        stream=True,
    ):
        pass
    image_id = (await docker.images.inspect(tool.ref))["Id"]
    spec = tool.spec().model_copy(
        update={"image": tool.spec().image.model_copy(update={"id": image_id})}
    )

    outcome, reporter = await run_tool(docker, spec)

    assert (outcome.status, outcome.reason) == ("rejected", "image_proc_path")
    assert "WorkingDir /proc/self/fd/7 points into /proc" in outcome.message
    assert reporter.of_type("container_created") == []


# --- the build refuses root and /proc -----------------------------------------------------


async def test_image_without_user_is_refused_at_build_when_the_toolspec_names_none(
    docker: aiodocker.Docker, tool: ToolDir
) -> None:
    tool.write(ROOT_DOCKERFILE)

    with pytest.raises(ImageRefusedError) as caught:
        await ImageBuilder(docker).build_dir(tool.tools_dir)

    assert [refusal.reason for refusal in caught.value.refusals] == ["image_runs_as_root"]
    assert f"image {tool.ref}: User is unset, so it would run as root" in str(caught.value)
    assert await images_of(docker, tool) == []
    assert not (tool.tools_dir / LOCK_FILE).exists()


async def test_image_with_user_root_is_refused_and_never_pushed(
    docker: aiodocker.Docker, tool: ToolDir, registry: str
) -> None:
    tool.write(DOCKERFILE.replace("USER 65534:65534", "USER 0:0"))

    with pytest.raises(ImageRefusedError, match=r"User is '0:0', so it would run as root"):
        await ImageBuilder(docker, registry=registry).build_dir(tool.tools_dir)

    repository, _ = split_ref(tool.ref)
    async with aiohttp.ClientSession() as session:
        url = f"http://{registry}/v2/{repository}/tags/list"
        async with session.get(url) as response:
            assert response.status == 404
    assert await images_of(docker, tool) == []


async def test_image_without_user_is_built_when_the_toolspec_names_a_user(
    docker: aiodocker.Docker, tool: ToolDir
) -> None:
    tool.write(ROOT_DOCKERFILE, user="1000:1000")

    [built] = await ImageBuilder(docker).build_dir(tool.tools_dir)

    assert (await docker.images.inspect(tool.ref))["Config"]["User"] == ""
    assert tool.recorded()["id"] == built.id


@pytest.mark.parametrize(
    ("instruction", "found"),
    [
        ("WORKDIR /proc/self/cwd", "WorkingDir /proc/self/cwd"),
        ('ENTRYPOINT ["/proc/self/exe"]', "Entrypoint /proc/self/exe"),
        ('CMD ["/proc/1/root/bin/sh"]', "Cmd /proc/1/root/bin/sh"),
        ("ENV PATH=/bin:/proc/self/fd/7", "Env PATH entry /proc/self/fd/7"),
    ],
)
async def test_image_pointing_into_proc_is_refused_at_build(
    docker: aiodocker.Docker, tool: ToolDir, instruction: str, found: str
) -> None:
    tool.write(DOCKERFILE + instruction + "\n")

    with pytest.raises(ImageRefusedError) as caught:
        await ImageBuilder(docker).build_dir(tool.tools_dir)

    assert [refusal.reason for refusal in caught.value.refusals] == ["image_proc_path"]
    assert f"{found} points into /proc" in str(caught.value)
    assert await images_of(docker, tool) == []


async def test_toolspec_command_into_proc_is_refused_at_build(
    docker: aiodocker.Docker, tool: ToolDir
) -> None:
    tool.write(command=["/proc/self/fd/3/bin/sh", "-c", "true"])

    with pytest.raises(ImageRefusedError, match="ToolSpec executable /proc/self/fd/3/bin/sh"):
        await ImageBuilder(docker).build_dir(tool.tools_dir)


async def test_refused_rebuild_leaves_the_recorded_image_under_its_tag(
    docker: aiodocker.Docker, tool: ToolDir
) -> None:
    builder = ImageBuilder(docker)
    [first] = await builder.build_dir(tool.tools_dir)
    tool.write(ROOT_DOCKERFILE, greeting="changed\n")

    with pytest.raises(ImageRefusedError):
        await builder.build_dir(tool.tools_dir)

    assert (await docker.images.inspect(tool.ref))["Id"] == first.id
    assert tool.recorded()["id"] == first.id
    assert [image["Id"] for image in await images_of(docker, tool)] == [first.id]


# --- the rules themselves -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "root"),
    [
        ("", True),
        (None, True),
        ("root", True),
        ("0", True),
        ("0:0", True),
        ("root:65534", True),
        ("65534:65534", False),
        ("nobody", False),
        ("1000:0", False),
    ],
)
def test_image_user_runs_as_root_when_unset_root_or_uid_0(user, root) -> None:
    assert runs_as_root(user) is root


@pytest.mark.parametrize(
    ("path", "working_dir", "under"),
    [
        ("/proc", "/", True),
        ("/proc/self/fd/7", "/", True),
        ("/opt/../proc/1/root", "/", True),
        ("//proc/self", "/", True),
        ("self/fd/7", "/proc", True),
        ("proc/kcore", "/", True),
        ("/procfs", "/", False),
        ("/opt/proc", "/", False),
        ("proc", "/opt", False),
        ("/", "/", False),
    ],
)
def test_path_is_under_proc_after_normalising(path, working_dir, under) -> None:
    assert is_under_proc(path, working_dir) is under


def test_proc_paths_name_each_offending_field() -> None:
    config = {
        "WorkingDir": "/proc/self",
        "Env": ["LANG=C.UTF-8", "PATH=/usr/bin:/proc/1/root/bin"],
        "Entrypoint": ["fd/3"],
        "Cmd": ["sh"],
    }

    assert proc_paths(config, ["/proc/1/exe", "cat"]) == [
        "WorkingDir /proc/self",
        "Env PATH entry /proc/1/root/bin",
        "Entrypoint fd/3",
        "ToolSpec executable /proc/1/exe",
    ]


async def test_shipped_tool_images_pass_the_image_rules(docker: aiodocker.Docker) -> None:
    catalog = ToolCatalog.load(REPO_ROOT / "tool-images", REPO_ROOT / "tests" / "tools")
    for spec in catalog:
        inspected = await image_or_none(docker, spec.image.ref)
        assert inspected is not None, f"{spec.image.ref} is missing; run `make images`"
        assert image_refusals(spec, inspected) == [], spec.name


# --- the embedded registry ----------------------------------------------------------------


def test_setup_starts_the_embedded_registry_once_and_it_answers(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "BILLY_EMBEDDED_REGISTRY": address, "BILLY_STATE_DIR": str(tmp_path)}
    registry_dir = tmp_path / "registry"
    try:
        first = run_setup(env)
        second = run_setup(env)

        assert first.returncode == 0, first.stderr
        assert f"registry: starting docker-registry on {address}" in first.stdout
        assert second.returncode == 0, second.stderr
        assert f"registry: {address} answers" in second.stdout
        with urllib.request.urlopen(f"http://{address}/v2/", timeout=5) as response:
            assert response.status == 200
        assert (registry_dir / "address").read_text().strip() == address
        config = yaml.safe_load((registry_dir / "config.yml").read_text())
        assert config["storage"]["filesystem"]["rootdirectory"] == str(registry_dir / "storage")
    finally:
        stop_registry(registry_dir / "registry.pid")


def run_setup(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/setup.sh"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def stop_registry(pid_file: Path, timeout_s: float = 10.0) -> None:
    """Stop the registry that setup.sh started (not our child: it runs in its own session)."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    if str(pid_file.parent) not in command_line(pid):
        return  # gone already, and the pid may belong to someone else by now
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while str(pid_file.parent) in command_line(pid):
        assert time.monotonic() < deadline, f"docker-registry {pid} still runs"
        time.sleep(0.05)


def command_line(pid: int) -> str:
    """The process's command line; empty once it has exited (a zombie has none)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
