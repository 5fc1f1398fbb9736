"""The tool's output entries, read from /workspace/out after it exited (through the
workspace keeper, which still mounts the workspace).

The archive endpoint's tar is streamed into a bounded temporary file and parsed there:
nothing is extracted to disk, no name in it is used as a host path, and no link is
followed. Each entry under out/ that matches the ToolSpec's artifact patterns is offered
to the ArtifactSink, in archive order. When the archive cap cut the archive, the sink hears
of the entry cut inside (its header was read) and of the unknown entries after it.
"""

from __future__ import annotations

import asyncio
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import aiodocker
import aiohttp

from services.executor.errors import docker_errors
from services.executor.model import ArtifactSink, EntryKind, OutputEntry, RunContext, RunReporter
from services.executor.policy import OUTPUT_DIR
from shared.logs import RunLogger

ARCHIVE_ROOT = "out"
CHUNK_BYTES = 64 * 1024
# Room for tar headers (PAX records included) beyond the artifacts' own bytes.
HEADER_ALLOWANCE_BYTES = 1024
ARCHIVE_SLACK_BYTES = 1024 * 1024
READ_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
# Parsing a tool's archive of many small entries must not hold the event loop for long.
YIELD_EVERY_ENTRIES = 1000
# Names come from the tool: a log line shows at most this much of one.
LOGGED_NAME_CHARS = 200


@dataclass
class Collected:
    """What collecting found: entries offered, archive bytes read, whether it was cut."""

    offered: int = 0
    archive_bytes: int = 0
    truncated: bool = False
    # The entry whose header was read but whose data the cut left out, if any.
    cut_entry: OutputEntry | None = None
    cut_entry_received_bytes: int = 0


def archive_cap_bytes(context: RunContext) -> int:
    """How much of the output archive is read at most."""
    limits = context.limits
    return (
        limits.artifacts_total_bytes
        + HEADER_ALLOWANCE_BYTES * limits.artifact_count
        + ARCHIVE_SLACK_BYTES
    )


async def collect_outputs(
    docker: aiodocker.Docker,
    container_id: str,
    context: RunContext,
    reporter: RunReporter,
    sink: ArtifactSink,
    log: RunLogger,
) -> Collected:
    """Offer every matching entry under out/ to the sink; bounded by the archive cap."""
    cap_bytes = archive_cap_bytes(context)
    with tempfile.TemporaryFile(prefix="billy-out-") as spool:
        collected = await download_archive(docker, container_id, spool, cap_bytes)
        if collected.truncated:
            await _report_archive_cut(cap_bytes, reporter, log)
        if collected.archive_bytes == 0:
            return collected
        tar = _open_archive(spool, collected, log)
        if tar is not None:
            with tar:
                await _offer_entries(tar, collected, context, sink, log)
    if collected.truncated:
        await _offer_cut(collected, context, sink)
    await _finish_offers(sink, reporter)
    return collected


async def _offer_cut(collected: Collected, context: RunContext, sink: ArtifactSink) -> None:
    # Optional for a sink: ArtifactHandoff turns the cut into rejections, so that no
    # output file is left out of the result without a word.
    archive_cut = getattr(sink, "archive_cut", None)
    if archive_cut is None:
        return
    entry = collected.cut_entry
    matches = compile_patterns(context.spec.outputs.artifacts)
    if entry is not None and (entry.kind != "file" or not matches(entry.path)):
        entry = None
    await archive_cut(entry, collected.archive_bytes, collected.cut_entry_received_bytes)


async def _finish_offers(sink: ArtifactSink, reporter: RunReporter) -> None:
    # Optional for a sink: ArtifactHandoff reports there, once, what it left out.
    finish = getattr(sink, "finish", None)
    if finish is not None:
        await finish(reporter)


def _open_archive(spool: IO[bytes], collected: Collected, log: RunLogger) -> tarfile.TarFile | None:
    spool.seek(0)
    try:
        # Names are kept as bytes (surrogateescape), whatever their encoding.
        return tarfile.open(fileobj=spool, mode="r:", encoding="utf-8", errors="surrogateescape")
    except tarfile.TarError as exc:
        log.warning("output_archive_unreadable bytes=%d error=%s", collected.archive_bytes, exc)
        return None


async def _offer_entries(
    tar: tarfile.TarFile,
    collected: Collected,
    context: RunContext,
    sink: ArtifactSink,
    log: RunLogger,
) -> None:
    matches = compile_patterns(context.spec.outputs.artifacts)
    artifact_bytes = context.limits.artifact_bytes
    entries = archive_entries(tar, collected.archive_bytes, log, collected)
    for count, (entry, member) in enumerate(entries, start=1):
        if count % YIELD_EVERY_ENTRIES == 0:
            await asyncio.sleep(0)
        if entry.kind == "dir" or not matches(entry.path):
            continue
        await sink.offer(entry, _content(tar, member, artifact_bytes))
        collected.offered += 1


async def download_archive(
    docker: aiodocker.Docker, container_id: str, spool: IO[bytes], cap_bytes: int
) -> Collected:
    """Stream GET /containers/{id}/archive of out/ into `spool`, stopping at `cap_bytes`."""
    collected = Collected()
    with docker_errors(f"read {OUTPUT_DIR} of container {container_id[:12]}"):
        try:
            response_cm = docker._query(
                f"containers/{container_id}/archive",
                method="GET",
                params={"path": OUTPUT_DIR},
                timeout=READ_TIMEOUT,
            )
            async with response_cm as response:
                collected.truncated = await _spool(response, spool, cap_bytes, collected)
        except aiodocker.DockerError as exc:
            # The tool may have made out/ unreadable or removed it: nothing to collect.
            if exc.status != 404:
                raise
    return collected


async def _spool(
    response: aiohttp.ClientResponse, spool: IO[bytes], cap_bytes: int, collected: Collected
) -> bool:
    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
        room = cap_bytes - collected.archive_bytes
        spool.write(chunk[:room])
        collected.archive_bytes += min(len(chunk), room)
        if len(chunk) > room:
            # Closing drops the connection, so the daemon stops sending the rest.
            response.close()
            return True
    return False


def archive_entries(
    tar: tarfile.TarFile, received_bytes: int, log: RunLogger, collected: Collected | None = None
) -> Iterator[tuple[OutputEntry, tarfile.TarInfo]]:
    """The entries below out/ whose header and data were fully received, in archive order.

    The entry whose data was cut, if any, is noted in `collected`.
    """
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, EOFError) as exc:
            log.warning("output_archive_ended_early error=%s", exc)
            return
        # TarFile keeps every header it read; a tool can write hundreds of thousands. Only
        # extractfile() of a link and getmember() read that list, and neither is used here.
        tar.members.clear()
        if member is None:
            return
        if member.offset_data + _data_size(member) > received_bytes:
            if collected is not None:
                collected.cut_entry = output_entry(member)
                collected.cut_entry_received_bytes = max(0, received_bytes - member.offset_data)
            return
        if member.name == ARCHIVE_ROOT:
            continue
        entry = output_entry(member)
        if entry is None:
            log.warning(
                "output_entry_skipped name=%r name_chars=%d",
                member.name[:LOGGED_NAME_CHARS],
                len(member.name),
            )
            continue
        yield entry, member


def output_entry(member: tarfile.TarInfo) -> OutputEntry | None:
    """The OutputEntry of one tar member; None for out/ itself or a name not below it."""
    relative = _below_root(member.name)
    if relative is None:
        return None
    raw_path = relative.encode("utf-8", "surrogateescape")
    kind = entry_kind(member)
    link_target = None
    if kind == "symlink":
        link_target = _display(member.linkname)
    elif kind == "hardlink":
        link_target = _display(_below_root(member.linkname) or member.linkname)
    return OutputEntry(
        path=raw_path.decode("utf-8", "replace"),
        raw_path=raw_path,
        kind=kind,
        size_bytes=member.size if kind == "file" else 0,
        link_target=link_target,
    )


def entry_kind(member: tarfile.TarInfo) -> EntryKind:
    """What a tar member is, in OutputEntry's words."""
    if member.type in tarfile.REGULAR_TYPES:
        return "file"
    kinds: dict[bytes, EntryKind] = {
        tarfile.DIRTYPE: "dir",
        tarfile.SYMTYPE: "symlink",
        tarfile.LNKTYPE: "hardlink",
        tarfile.FIFOTYPE: "fifo",
        tarfile.CHRTYPE: "device",
        tarfile.BLKTYPE: "device",
    }
    return kinds.get(member.type, "other")


def compile_patterns(patterns: list[str]):
    """A predicate: does a path relative to out/ match one of the glob patterns?

    `*` and `?` stay within one path segment, `**` crosses segments, and `**/` also
    matches no directory at all.
    """
    # DOTALL: a file name may hold a newline, and `**` must match it too.
    regex = re.compile("|".join(f"(?:{_glob_regex(p)})" for p in patterns) or r"(?!)", re.DOTALL)
    return lambda path: regex.fullmatch(path) is not None


def _glob_regex(pattern: str) -> str:
    tokens = re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]/]+\])", pattern)
    parts = []
    for token in tokens:
        if token == "**/":
            parts.append(r"(?:.*/)?")
        elif token == "**":
            parts.append(r".*")
        elif token == "*":
            parts.append(r"[^/]*")
        elif token == "?":
            parts.append(r"[^/]")
        elif token.startswith("[") and len(token) > 2:
            body = token[1:-1]
            negate = body.startswith("!")
            body = re.escape(body[1:] if negate else body).replace(r"\-", "-")
            parts.append(f"[{'^' if negate else ''}{body}]")
        else:
            parts.append(re.escape(token))
    return "".join(parts)


def _below_root(name: str) -> str | None:
    # Names come from the tool: anything not plainly below out/ is skipped, not trusted.
    prefix = f"{ARCHIVE_ROOT}/"
    if not name.startswith(prefix):
        return None
    relative = name[len(prefix) :]
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    return relative


def _display(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _data_size(member: tarfile.TarInfo) -> int:
    return member.size if member.type in tarfile.REGULAR_TYPES else 0


def _content(tar: tarfile.TarFile, member: tarfile.TarInfo, artifact_bytes: int):
    # Only regular files within the per-artifact limit are read; links are never followed.
    if member.type not in tarfile.REGULAR_TYPES or member.size > artifact_bytes:
        return None
    return tar.extractfile(member)


async def _report_archive_cut(cap_bytes: int, reporter: RunReporter, log: RunLogger) -> None:
    log.warning("output_archive_truncated limit_bytes=%d", cap_bytes)
    await reporter.event(
        "limit_hit",
        reason="artifacts_total_bytes",
        message=f"output archive exceeded {cap_bytes} bytes; entries beyond it were not read",
        data={"limit_bytes": cap_bytes},
    )
