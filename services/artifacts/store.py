"""Moving an artifact from the staging bucket into the artifacts bucket, hashing it on the
way, with the bytes spooled through a temporary file so that memory stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import tempfile

from nats.js.api import ObjectMeta
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from services.artifacts.errors import StagedObjectError
from shared import subjects
from shared.wire import ArtifactRef

CHUNK_BYTES = 128 * 1024


def object_name(run_id: str, path: str) -> str:
    """Name of a stored artifact in the artifacts bucket."""
    return f"{run_id}/{path}"


class ArtifactStore:
    """The staging and artifacts object stores."""

    def __init__(self, staging: ObjectStore, artifacts: ObjectStore) -> None:
        self._staging = staging
        self._artifacts = artifacts

    async def promote(
        self, staged: str, run_id: str, path: str, expected_bytes: int
    ) -> ArtifactRef:
        """Store the staged object as <run_id>/<path>; verifies its size, computes sha256."""
        with tempfile.TemporaryFile() as spool:
            try:
                await self._staging.get(staged, writeinto=spool)
            except NotFoundError as exc:
                raise StagedObjectError(staged, "not found") from exc
            size_bytes = spool.tell()
            if size_bytes != expected_bytes:
                raise StagedObjectError(
                    staged, f"holds {size_bytes} bytes; {expected_bytes} were announced"
                )
            # Up to artifact_bytes of reading and hashing: not on the event loop.
            sha256 = await asyncio.to_thread(_sha256_of, spool)
            spool.seek(0)
            name = object_name(run_id, path)
            await self._artifacts.put(
                name, spool, meta=ObjectMeta(name=name, description=f"sha256:{sha256}")
            )
        await self.discard(staged)
        return ArtifactRef(
            path=path,
            size_bytes=size_bytes,
            sha256=sha256,
            bucket=subjects.ARTIFACTS_BUCKET,
            object=name,
        )

    async def discard(self, staged: str | None) -> None:
        """Delete a staged object; one already gone is fine."""
        if staged is None:
            return
        with contextlib.suppress(NotFoundError):
            await self._staging.delete(staged)


def _sha256_of(spool) -> str:
    spool.seek(0)
    digest = hashlib.sha256()
    while chunk := spool.read(CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()
