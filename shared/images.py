"""Builds tool images through the Docker Engine API and records them in images.lock.json.

No docker CLI and no BuildKit: the build context goes to the engine as a tar. The lock
holds, per tool, the image id (and the registry digest after a push) that the executor
pins, plus the hash of the build context so that an unchanged tool is not rebuilt. A built
image that would run as root without the ToolSpec naming a user, or that points into
/proc, is refused: removed, never pushed, never recorded (docs/tool-images.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import aiodocker
import typer

from shared.errors import BillyToolsError
from shared.image_config import Refusal, proc_refusal, repo_digests, root_refusal
from shared.settings import Settings
from shared.toolspec import LOCK_FILE, SPEC_FILE, ToolSpec, load_toolspec, read_image_lock

logger = logging.getLogger(__name__)

# Files that never belong in a build context: they change without the tool changing.
IGNORED_NAMES = {"__pycache__", ".pytest_cache", ".ruff_cache", LOCK_FILE}
IGNORED_SUFFIXES = (".pyc", ".pyo")
BUILD_LOG_TAIL = 20


class ImageBuildError(BillyToolsError):
    """A tool image could not be built or pushed."""

    def __init__(self, tool: str, reason: str) -> None:
        super().__init__(f"tool {tool}: {reason}")
        self.tool = tool
        self.reason = reason


class ImageRefusedError(ImageBuildError):
    """A built tool image breaks a rule on its configuration (root user, /proc paths)."""

    def __init__(self, tool: str, refusals: list[Refusal]) -> None:
        super().__init__(tool, "; ".join(refusal.message for refusal in refusals))
        self.refusals = refusals


@dataclass(frozen=True)
class BuiltImage:
    """What one build did for one tool."""

    tool: str
    ref: str
    id: str
    digest: str | None
    context_sha256: str
    skipped: bool
    elapsed_ms: int
    registry: str | None = None


def context_files(context_dir: Path) -> list[Path]:
    """Files of a build context, sorted, without caches and the image lock."""
    files = []
    for path in sorted(context_dir.rglob("*")):
        relative = path.relative_to(context_dir)
        if any(part in IGNORED_NAMES for part in relative.parts):
            continue
        if path.suffix in IGNORED_SUFFIXES or not path.is_file():
            continue
        files.append(path)
    return files


def context_tar(context_dir: Path) -> bytes:
    """The build context as an uncompressed tar with owner and times normalised."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in context_files(context_dir):
            info = archive.gettarinfo(str(path), arcname=path.relative_to(context_dir).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with path.open("rb") as data:
                archive.addfile(info, data)
    return buffer.getvalue()


def context_hash(context_dir: Path, build_inputs: dict[str, Any]) -> str:
    """sha256 over every context file (path, exec bit, bytes) and the build inputs."""
    digest = hashlib.sha256(json.dumps(build_inputs, sort_keys=True).encode())
    for path in context_files(context_dir):
        relative = path.relative_to(context_dir).as_posix()
        executable = path.stat().st_mode & 0o111 != 0
        digest.update(f"\0{relative}\0{int(executable)}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return f"sha256:{digest.hexdigest()}"


def context_names(context: bytes) -> set[str]:
    """Names of the files in a context tar."""
    with tarfile.open(fileobj=io.BytesIO(context)) as archive:
        return set(archive.getnames())


def buildable_specs(tools_dir: Path) -> list[tuple[ToolSpec, Path]]:
    """The ToolSpecs of a tools directory that say how to build their image."""
    found = []
    for spec_path in sorted(tools_dir.glob(f"*/{SPEC_FILE}")):
        spec = load_toolspec(spec_path)
        if spec.image.build is not None:
            found.append((spec, spec_path.parent))
    return found


def build_args(spec: ToolSpec) -> dict[str, str]:
    """Build arguments: the spec's own, plus BASE when the spec names a local base."""
    build = spec.image.build
    assert build is not None
    args = dict(build.args)
    if build.base:
        args["BASE"] = build.base
    return args


def image_labels(spec: ToolSpec) -> dict[str, str]:
    return {"billy.tool": spec.name, "billy.tool_version": spec.version}


def image_refusals(spec: ToolSpec, inspected: dict[str, Any]) -> list[Refusal]:
    """Why the image `inspected` may not serve this ToolSpec; empty when it may."""
    config = inspected.get("Config") or {}
    # A user in tool.yaml (never root, the ToolSpec checks) overrides the image's USER.
    user_named = "user" in spec.model_fields_set
    executables = [*(spec.entrypoint or [])[:1], spec.command[0]]
    found = [
        root_refusal(spec.image.ref, config, user_named),
        proc_refusal(spec.image.ref, config, executables),
    ]
    return [refusal for refusal in found if refusal is not None]


def split_ref(ref: str) -> tuple[str, str]:
    """Repository and tag of an image reference; `latest` when it names no tag."""
    repository, _, tag = ref.rpartition(":")
    if not repository or "/" in tag:
        return ref, "latest"
    return repository, tag


def write_lock(tools_dir: Path, lock: dict[str, Any]) -> None:
    """Replace the lock file atomically so that a reader never sees half of it."""
    path = tools_dir / LOCK_FILE
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    partial.replace(path)


class ImageBuilder:
    """Builds, tags, labels and (with a registry) pushes the images of a tools directory."""

    def __init__(self, docker: aiodocker.Docker, registry: str | None = None) -> None:
        self.docker = docker
        self.registry = registry

    async def build_dir(
        self, tools_dir: Path, tools: set[str] | None = None, force: bool = False
    ) -> list[BuiltImage]:
        """Build every tool of `tools_dir` (or only `tools`) whose image is out of date."""
        lock = read_image_lock(tools_dir)
        built = []
        for spec, spec_dir in buildable_specs(tools_dir):
            if tools and spec.name not in tools:
                continue
            result = await self.build_tool(spec, spec_dir, lock.get(spec.name), force)
            lock[spec.name] = {
                "ref": result.ref,
                "id": result.id,
                "digest": result.digest,
                "context_sha256": result.context_sha256,
                **({"registry": result.registry} if result.digest else {}),
            }
            write_lock(tools_dir, lock)
            built.append(result)
        return built

    async def build_tool(
        self, spec: ToolSpec, spec_dir: Path, recorded: dict[str, Any] | None, force: bool
    ) -> BuiltImage:
        """Build one tool's image unless the recorded one is current; push it if configured."""
        started = time.monotonic()
        wanted_hash = await self._context_hash(spec, spec_dir)

        if not force and await self._is_current(spec, recorded, wanted_hash):
            assert recorded is not None
            logger.info(
                "image_current tool=%s ref=%s id=%s", spec.name, spec.image.ref, recorded["id"][:19]
            )
            return BuiltImage(
                spec.name,
                spec.image.ref,
                recorded["id"],
                recorded.get("digest"),
                wanted_hash,
                skipped=True,
                elapsed_ms=_elapsed_ms(started),
                registry=recorded.get("registry"),
            )

        image_id = await self._build(spec, spec_dir)
        await self._refuse_if_breaking_rules(spec, image_id, recorded)
        digest = await self._push(spec) if self.registry else None
        if recorded and recorded.get("id") not in (None, image_id):
            await self._remove_if_untagged(spec.name, recorded["id"])
        logger.info(
            "image_built tool=%s ref=%s id=%s digest=%s elapsed_ms=%d",
            spec.name,
            spec.image.ref,
            image_id[:19],
            digest,
            _elapsed_ms(started),
        )
        return BuiltImage(
            spec.name,
            spec.image.ref,
            image_id,
            digest,
            wanted_hash,
            skipped=False,
            elapsed_ms=_elapsed_ms(started),
            registry=self.registry if digest else None,
        )

    async def _context_hash(self, spec: ToolSpec, spec_dir: Path) -> str:
        # The base image's id is an input too: a rebuilt base must rebuild the tool.
        build = spec.image.build
        assert build is not None
        inputs = {
            "ref": spec.image.ref,
            "dockerfile": build.dockerfile,
            "args": build_args(spec),
            "labels": image_labels(spec),
            "base_id": await self._image_id(build.base) if build.base else None,
        }
        return await asyncio.to_thread(context_hash, spec_dir / build.context, inputs)

    async def _is_current(
        self, spec: ToolSpec, recorded: dict[str, Any] | None, wanted_hash: str
    ) -> bool:
        if not recorded or recorded.get("context_sha256") != wanted_hash:
            return False
        if self.registry and (
            recorded.get("registry") != self.registry or not recorded.get("digest")
        ):
            return False
        inspected = await self._inspect(spec.image.ref)
        if inspected is None or inspected["Id"] != recorded.get("id"):
            return False
        # Untagging the registry copy drops the digest that the executor checks: push again.
        if recorded.get("digest") and recorded["digest"] not in repo_digests(inspected):
            return False
        # An image recorded before a rule existed is rebuilt, and refused then.
        return not image_refusals(spec, inspected)

    async def _inspect(self, ref: str) -> dict[str, Any] | None:
        try:
            return await self.docker.images.inspect(ref)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise

    async def _image_id(self, ref: str) -> str | None:
        inspected = await self._inspect(ref)
        return None if inspected is None else inspected["Id"]

    async def _build(self, spec: ToolSpec, spec_dir: Path) -> str:
        """Send the context to the engine, follow the build stream, return the image id."""
        build = spec.image.build
        assert build is not None
        context_dir = spec_dir / build.context
        context = await asyncio.to_thread(context_tar, context_dir)
        if PurePosixPath(build.dockerfile).as_posix() not in context_names(context):
            raise ImageBuildError(spec.name, f"no {build.dockerfile} in {context_dir}")
        if build.base and await self._image_id(build.base) is None:
            raise ImageBuildError(
                spec.name, f"base image {build.base} is missing; build it with `make images`"
            )

        log: list[str] = []
        try:
            async for chunk in self.docker.images.build(
                fileobj=io.BytesIO(context),
                encoding="identity",
                path_dockerfile=build.dockerfile,
                tag=spec.image.ref,
                buildargs=build_args(spec),
                labels=image_labels(spec),
                rm=True,
                forcerm=True,
                stream=True,
            ):
                _follow(spec.name, chunk, log)
        except aiodocker.DockerError as exc:
            tail = "".join(log[-BUILD_LOG_TAIL:]).strip()
            raise ImageBuildError(spec.name, f"build failed: {exc.message}\n{tail}") from exc

        image_id = await self._image_id(spec.image.ref)
        if image_id is None:
            raise ImageBuildError(spec.name, f"build ended but {spec.image.ref} does not exist")
        return image_id

    async def _refuse_if_breaking_rules(
        self, spec: ToolSpec, image_id: str, recorded: dict[str, Any] | None
    ) -> None:
        """Remove a just-built image that breaks a rule and raise ImageRefusedError."""
        refusals = image_refusals(spec, await self.docker.images.inspect(image_id))
        if not refusals:
            return
        await self.docker.images.delete(image_id, force=True)
        logger.warning(
            "image_refused tool=%s id=%s reasons=%s",
            spec.name,
            image_id[:19],
            ",".join(refusal.reason for refusal in refusals),
        )
        # The tag moved to the refused image; give it back to the image the lock records.
        previous_id = (recorded or {}).get("id")
        if previous_id and await self._image_id(previous_id) is not None:
            repository, tag = split_ref(spec.image.ref)
            await self.docker.images.tag(previous_id, repository, tag=tag)
        raise ImageRefusedError(spec.name, refusals)

    async def _push(self, spec: ToolSpec) -> str:
        """Tag the image into the registry, push it and return the registry digest."""
        repository, tag = split_ref(spec.image.ref)
        remote = f"{self.registry}/{repository}"
        digest = None
        try:
            await self.docker.images.tag(spec.image.ref, remote, tag=tag)
            async for chunk in self.docker.images.push(remote, tag=tag, stream=True):
                digest = (chunk.get("aux") or {}).get("Digest") or digest
        except aiodocker.DockerError as exc:
            raise ImageBuildError(
                spec.name, f"push to {self.registry} failed: {exc.message}"
            ) from exc
        if digest is None:
            raise ImageBuildError(spec.name, f"push to {self.registry} reported no digest")
        return digest

    async def _remove_if_untagged(self, tool: str, image_id: str) -> None:
        # The previous build of this tool; drop it unless another tag or a container holds it.
        image = await self._image_id(image_id)
        if image is None:
            return
        try:
            await self.docker.images.delete(image_id, noprune=False)
            logger.info("image_removed tool=%s id=%s reason=superseded", tool, image_id[:19])
        except aiodocker.DockerError as exc:
            logger.debug("image_kept tool=%s id=%s reason=%s", tool, image_id[:19], exc.message)


def _follow(tool: str, chunk: dict[str, Any], log: list[str]) -> None:
    """Keep the build output (for error messages) and log it at DEBUG."""
    text = chunk.get("stream") or chunk.get("status") or ""
    if text:
        log.append(text)
        logger.debug("image_build_output tool=%s line=%s", tool, text.rstrip())


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


async def build_images(
    tools_dirs: list[Path],
    tools: set[str] | None = None,
    force: bool = False,
    settings: Settings | None = None,
) -> list[BuiltImage]:
    """Build the images of every tools directory with the configured Docker and registry."""
    settings = settings or Settings()
    docker = aiodocker.Docker(url=settings.docker_host)
    try:
        builder = ImageBuilder(docker, registry=settings.registry)
        results = []
        for tools_dir in tools_dirs:
            results += await builder.build_dir(tools_dir, tools=tools, force=force)
        return results
    finally:
        await docker.close()


app = typer.Typer(help="Build tool images and record their ids in images.lock.json.")


@app.callback()
def _images() -> None:
    """Tool images: built here, without a registry unless BILLY_REGISTRY is set."""


@app.command("build")
def build_command(
    tools_dir: Annotated[
        list[Path] | None, typer.Option("--tools-dir", help="Tools directory; repeatable.")
    ] = None,
    tool: Annotated[list[str] | None, typer.Option("--tool", help="Only this tool.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even when up to date.")] = False,
) -> None:
    """Build every tool image whose build context changed since the last build."""
    settings = Settings()
    tools_dirs = tools_dir or [settings.tools_dir]
    try:
        results = asyncio.run(build_images(tools_dirs, set(tool or []) or None, force, settings))
    except BillyToolsError as exc:
        typer.echo(f"images: error: {exc}", err=True)
        raise typer.Exit(1) from exc
    for result in results:
        state = "up to date" if result.skipped else f"built in {result.elapsed_ms / 1000:.1f} s"
        pinned = f" {result.digest}" if result.digest else ""
        typer.echo(f"images: {result.tool:<12} {result.ref} {result.id[:19]}{pinned} ({state})")


if __name__ == "__main__":
    app()
