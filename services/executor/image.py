"""The tool's image: the local image when it matches what was recorded at build time (its
id, and its registry digest when one was recorded), else a pull by digest from the
configured registry. An image under the tool's reference that does not match is refused
(image_digest_mismatch), as is one whose working directory or entrypoint points into /proc
(image_proc_path). The container is created from the verified image id, never from the
mutable tag."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiodocker

from services.executor.errors import (
    DOCKER_UNREACHABLE_STATUS,
    ImageRefusedError,
    ImageUnavailableError,
    docker_errors,
    infra_error_of,
)
from services.executor.model import RunReporter
from shared.image_config import proc_refusal, repo_digests
from shared.toolspec import ImageSpec

logger = logging.getLogger(__name__)


async def ensure_image(
    docker: aiodocker.Docker, image: ImageSpec, registry: str | None, reporter: RunReporter
) -> str:
    """The verified id of the tool's image.

    Raises ImageUnavailableError when there is no image to run, ImageRefusedError when the
    image there is not the recorded one or points into /proc.
    """
    started = time.monotonic()
    if image.id is None and image.digest is None:
        raise ImageUnavailableError(
            f"image {image.ref}: no image id recorded; run `billy-tools images build`"
        )

    local = await inspect_image(docker, image.ref)
    if local is not None and matches(local, image):
        return await _verified(reporter, image.ref, local, started, pulled=False)

    if registry and image.digest:
        # A digest pins the content; the tag under image.ref no longer matters.
        pinned = pinned_reference(registry, image.ref, image.digest)
        pulled = await pull(docker, pinned, reporter)
        if matches(pulled, image):
            return await _verified(reporter, pinned, pulled, started, pulled=True)
        raise ImageRefusedError("image_digest_mismatch", _mismatch(pinned, image, pulled))

    if local is None:
        raise ImageUnavailableError(f"image {image.ref}: no such image{_pull_hint(image)}")
    raise ImageRefusedError("image_digest_mismatch", _mismatch(image.ref, image, local))


def matches(inspected: dict[str, Any], image: ImageSpec) -> bool:
    """Whether an inspected image has the recorded id and carries the recorded digest."""
    if image.id is not None and inspected["Id"] != image.id:
        return False
    return image.digest is None or image.digest in repo_digests(inspected)


async def inspect_image(docker: aiodocker.Docker, reference: str) -> dict[str, Any] | None:
    """What the daemon knows of a local image, or None when it has no such image."""
    with docker_errors(f"inspect image {reference}"):
        try:
            return await docker.images.inspect(reference)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise


async def pull(docker: aiodocker.Docker, pinned: str, reporter: RunReporter) -> dict[str, Any]:
    """Pull `registry/repo@digest`; what arrived, as the daemon inspects it."""
    started = time.monotonic()
    try:
        await docker.images.pull(pinned)
    except aiodocker.DockerError as exc:
        if exc.status == DOCKER_UNREACHABLE_STATUS:
            raise infra_error_of(exc, f"pull {pinned}") from exc
        raise ImageUnavailableError(f"pull {pinned} failed: {exc.message}") from exc
    await reporter.event("image_pulled", duration_ms=_elapsed_ms(started), data={"image": pinned})
    logger.info("image_pulled image=%s elapsed_ms=%.0f", pinned, _elapsed_ms(started))
    pulled = await inspect_image(docker, pinned)
    if pulled is None:
        raise ImageUnavailableError(f"pull {pinned} ended but the image is not there")
    return pulled


def pinned_reference(registry: str, ref: str, digest: str) -> str:
    """`<registry>/<repository>@<digest>` for a reference like `billy/tool:1.0`."""
    repository = ref.split("@", 1)[0]
    name_start = repository.rfind("/") + 1
    tag_at = repository.rfind(":")
    if tag_at >= name_start:
        repository = repository[:tag_at]
    return f"{registry.rstrip('/')}/{repository}@{digest}"


def _mismatch(reference: str, image: ImageSpec, found: dict[str, Any]) -> str:
    expected = [f"id {image.id}"] if image.id else []
    seen = [f"id {found['Id']}"] if image.id else []
    if image.digest:
        expected.append(f"digest {image.digest}")
        seen.append(f"digests {', '.join(sorted(repo_digests(found))) or '(none)'}")
    return f"image {reference}: expected {' and '.join(expected)}, found {' and '.join(seen)}"


def _pull_hint(image: ImageSpec) -> str:
    if image.digest:
        return "; set BILLY_REGISTRY to pull it by digest"
    return "; run `billy-tools images build`"


async def _verified(
    reporter: RunReporter,
    reference: str,
    inspected: dict[str, Any],
    started: float,
    *,
    pulled: bool,
) -> str:
    """Refuse an image that points into /proc, else report it ensured; its id."""
    refusal = proc_refusal(reference, inspected.get("Config") or {})
    if refusal is not None:
        raise ImageRefusedError(refusal.reason, refusal.message)
    await reporter.event(
        "image_ensured",
        duration_ms=_elapsed_ms(started),
        data={"image": reference, "image_id": inspected["Id"], "pulled": pulled},
    )
    return inspected["Id"]


def _elapsed_ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
