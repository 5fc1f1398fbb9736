"""The tool's image: the local image when its id matches the one recorded at build time,
else a pull by digest from the configured registry. The container is created from the
verified image id, never from the mutable tag."""

from __future__ import annotations

import logging
import time

import aiodocker

from services.executor.errors import (
    DOCKER_UNREACHABLE_STATUS,
    ImageUnavailableError,
    docker_errors,
    infra_error_of,
)
from services.executor.model import RunReporter
from shared.toolspec import ImageSpec

logger = logging.getLogger(__name__)


async def ensure_image(
    docker: aiodocker.Docker, image: ImageSpec, registry: str | None, reporter: RunReporter
) -> str:
    """The verified id of the tool's image; raises ImageUnavailableError when there is none."""
    started = time.monotonic()
    found_id = await local_image_id(docker, image.ref)
    if image.id is not None and found_id == image.id:
        await _report_ensured(reporter, image.ref, image.id, started, pulled=False)
        return image.id

    if registry and image.digest:
        pinned = pinned_reference(registry, image.ref, image.digest)
        pulled_id = await pull(docker, pinned, reporter)
        # A digest pins the content already; a recorded id must agree with it.
        if pulled_id is not None and image.id in (None, pulled_id):
            await _report_ensured(reporter, pinned, pulled_id, started, pulled=True)
            return pulled_id
        raise ImageUnavailableError(_mismatch(pinned, image.id, pulled_id))

    if image.id is None:
        raise ImageUnavailableError(
            f"image {image.ref}: no image id recorded; run `billy-tools images build`"
        )
    raise ImageUnavailableError(_mismatch(image.ref, image.id, found_id))


async def local_image_id(docker: aiodocker.Docker, reference: str) -> str | None:
    """The Id of a local image, or None when the daemon has no such image."""
    with docker_errors(f"inspect image {reference}"):
        try:
            return (await docker.images.inspect(reference))["Id"]
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise


async def pull(docker: aiodocker.Docker, pinned: str, reporter: RunReporter) -> str | None:
    """Pull `registry/repo@digest`; the id of what arrived."""
    started = time.monotonic()
    try:
        await docker.images.pull(pinned)
    except aiodocker.DockerError as exc:
        if exc.status == DOCKER_UNREACHABLE_STATUS:
            raise infra_error_of(exc, f"pull {pinned}") from exc
        raise ImageUnavailableError(f"pull {pinned} failed: {exc.message}") from exc
    await reporter.event("image_pulled", duration_ms=_elapsed_ms(started), data={"image": pinned})
    logger.info("image_pulled image=%s elapsed_ms=%.0f", pinned, _elapsed_ms(started))
    return await local_image_id(docker, pinned)


def pinned_reference(registry: str, ref: str, digest: str) -> str:
    """`<registry>/<repository>@<digest>` for a reference like `billy/tool:1.0`."""
    repository = ref.split("@", 1)[0]
    name_start = repository.rfind("/") + 1
    tag_at = repository.rfind(":")
    if tag_at >= name_start:
        repository = repository[:tag_at]
    return f"{registry.rstrip('/')}/{repository}@{digest}"


def _mismatch(reference: str, expected_id: str | None, found_id: str | None) -> str:
    found = found_id or "no such image"
    return f"image {reference}: expected id {expected_id or '(none recorded)'}, found {found}"


async def _report_ensured(
    reporter: RunReporter, reference: str, image_id: str, started: float, *, pulled: bool
) -> None:
    await reporter.event(
        "image_ensured",
        duration_ms=_elapsed_ms(started),
        data={"image": reference, "image_id": image_id, "pulled": pulled},
    )


def _elapsed_ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
