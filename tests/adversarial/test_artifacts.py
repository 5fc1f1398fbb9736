"""Hostile outputs: links, FIFOs, symlinked directories, unsafe names, floods of files,
files over the size limit and archive bombs written to $BILLY_OUTPUT_DIR.

Each is rejected with its reason, or stored as an opaque file within the limits; the
billy_artifacts object store is checked for what the run really left there.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from nats.js.errors import NotFoundError

from shared import subjects
from tests.adversarial.conftest import (
    assert_host_unaffected,
    assert_nothing_leaks,
    run_hostile,
    tool_limits,
)

TOOL = "python-exec"
PREAMBLE = """
import errno, hashlib, json, os

def attempt(action):
    try:
        action()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

os.chdir(os.environ["BILLY_OUTPUT_DIR"])
open("ok.txt", "w").write("ok")
"""
NOT_COLLECTED = re.compile(r"^(\d+) further output files not collected; the limit is (\d+)$")


async def bucket_objects(client, bucket: str, run_id: str) -> dict[str, int]:
    """Live objects of `bucket` whose name starts with the run_id: name -> size in bytes."""
    store = await client.nc.jetstream().object_store(bucket)
    try:
        infos = await store.list(ignore_deletes=True)
    except NotFoundError:  # an empty bucket
        return {}
    return {
        info.name: info.size
        for info in infos
        if info.name.startswith(f"{run_id}/") and not info.deleted
    }


async def run_outputs(client, docker, marker: str, code: str, logs):
    """Run `code` after PREAMBLE; check the run, the caps and the host; (result, events)."""
    result, events = await run_hostile(client, f"# {marker}\n{PREAMBLE}\n{code}")

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    assert result.reason is None
    assert_nothing_leaks(result, events, logs.records)
    # The artifacts service took no bytes it did not store, and left none in staging.
    stored = await bucket_objects(client, subjects.ARTIFACTS_BUCKET, result.run_id)
    assert stored == {ref.object: ref.size_bytes for ref in result.artifacts}
    assert await bucket_objects(client, subjects.STAGING_BUCKET, result.run_id) == {}
    await assert_host_unaffected(client, docker, result, marker)
    return result, events


def rejections(result) -> dict[str, tuple[str, str]]:
    return {r.path: (r.reason, r.message) for r in result.rejected_artifacts}


def stored_paths(result) -> list[str]:
    return sorted(ref.path for ref in result.artifacts)


async def test_symlinks_to_host_files_are_rejected_and_never_followed(
    client, docker, marker, service_logs
):
    code = """
os.symlink("/etc/passwd", "passwd")
os.symlink("../../etc/shadow", "shadow")
os.symlink("/workspace/arguments.json", "arguments")
"""
    result, events = await run_outputs(client, docker, marker, code, service_logs)

    assert stored_paths(result) == ["ok.txt"]
    assert rejections(result) == {
        "passwd": ("not_a_regular_file", "symlink -> /etc/passwd is not a regular file"),
        "shadow": ("not_a_regular_file", "symlink -> ../../etc/shadow is not a regular file"),
        "arguments": (
            "not_a_regular_file",
            "symlink -> /workspace/arguments.json is not a regular file",
        ),
    }
    rejected_events = [e for e in events if e.type == "artifact_rejected"]
    assert {e.data["path"]: e.data["size_bytes"] for e in rejected_events} == {
        "passwd": 0,
        "shadow": 0,
        "arguments": 0,
    }


async def test_hardlink_is_rejected_and_a_link_to_a_host_file_cannot_be_made(
    client, docker, marker, service_logs
):
    # The workspace is a volume: /etc is another file system, so no link can reach it.
    code = """
open("a-data.txt", "w").write("payload")
os.link("a-data.txt", "b-hard")
print(json.dumps({"link_to_etc_passwd": attempt(lambda: os.link("/etc/passwd", "c-passwd"))}))
"""
    result, _ = await run_outputs(client, docker, marker, code, service_logs)

    assert json.loads(result.stdout) == {"link_to_etc_passwd": "EXDEV"}
    assert stored_paths(result) == ["a-data.txt", "ok.txt"]
    assert rejections(result) == {
        "b-hard": ("not_a_regular_file", "hardlink -> a-data.txt is not a regular file"),
    }


async def test_fifo_is_rejected_without_being_opened_and_no_device_can_be_made(
    client, docker, marker, service_logs
):
    # Were the runtime to open the FIFO, the run would hang until its timeout: it ends.
    code = """
import stat
os.mkfifo("pipe")
device = lambda: os.mknod("null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
print(json.dumps({"mknod": attempt(device)}))
"""
    result, _ = await run_outputs(client, docker, marker, code, service_logs)

    assert json.loads(result.stdout) == {"mknod": "EPERM"}
    assert stored_paths(result) == ["ok.txt"]
    assert rejections(result) == {
        "pipe": ("not_a_regular_file", "fifo is not a regular file"),
    }


async def test_symlinked_directory_pointing_outside_is_rejected_and_not_entered(
    client, docker, marker, service_logs
):
    # No name in out/ can hold "..": a directory symlink is the tool's only way out.
    code = """
os.symlink("/etc", "sub")
os.symlink("..", "up")
os.symlink("/", "root")
print(json.dumps({"names": sorted(os.listdir("."))}))
"""
    result, _ = await run_outputs(client, docker, marker, code, service_logs)

    assert json.loads(result.stdout) == {"names": ["ok.txt", "root", "sub", "up"]}
    assert stored_paths(result) == ["ok.txt"]
    assert rejections(result) == {
        "sub": ("not_a_regular_file", "symlink -> /etc is not a regular file"),
        "up": ("not_a_regular_file", "symlink -> .. is not a regular file"),
        "root": ("not_a_regular_file", "symlink -> / is not a regular file"),
    }


async def test_names_with_newline_control_characters_or_invalid_utf8_are_rejected(
    client, docker, marker, service_logs
):
    code = r"""
open("new\nline.txt", "w").write("x")
open("fake\nartifact_stored path='evil'", "w").write("x")
open("tab\there.txt", "w").write("x")
open("invoice\u202etxt.exe", "w").write("x")
open("back\\slash.txt", "w").write("x")
fd = os.open(b"bad\xffname.txt", os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, b"x")
os.close(fd)
"""
    result, _ = await run_outputs(client, docker, marker, code, service_logs)

    control = ("invalid_path", "path contains a control or format character")
    assert stored_paths(result) == ["ok.txt"]
    assert rejections(result) == {
        "new\nline.txt": control,
        "fake\nartifact_stored path='evil'": control,
        "tab\there.txt": control,
        "invoice\u202etxt.exe": control,
        "back\\slash.txt": ("invalid_path", "path must be relative and use '/'"),
        "bad\ufffdname.txt": ("invalid_path", "path is not valid UTF-8"),
    }
    # A name cannot forge a log line: every service quotes it.
    for record in service_logs.records:
        assert "\nartifact_stored" not in record.getMessage(), record.getMessage()


@pytest.mark.slow
async def test_100000_small_files_store_the_limit_and_the_rest_is_one_rejection(
    client, docker, marker, service_logs
):
    # Empty: the workspace is a tmpfs of 64 MiB, where each non-empty file takes a page.
    code = """
for index in range(100_000):
    open(f"f{index:06d}", "wb").close()
"""
    result, events = await run_outputs(client, docker, marker, code, service_logs)

    artifact_count = tool_limits(TOOL).artifact_count
    assert len(result.artifacts) == artifact_count
    assert all(ref.size_bytes == 0 for ref in result.artifacts)
    # One rejection and one event stand for all the others, whatever their number: those
    # read past the limit, and those past the archive cap (100000 headers exceed it).
    [summary, after_cut] = result.rejected_artifacts
    assert summary.reason == "too_many"
    not_collected, limit = map(int, NOT_COLLECTED.match(summary.message).groups())
    assert limit == artifact_count
    assert not_collected > 10_000
    assert (after_cut.path, after_cut.reason, after_cut.message) == (
        "",
        *after_the_cut(archive_cut_at(events)),
    )
    rejected_events = [e for e in events if e.type == "artifact_rejected"]
    assert [(e.reason, e.message) for e in rejected_events] == [
        ("too_many", summary.message),
        ("not_collected", after_cut.message),
    ]
    stored_events = [e for e in events if e.type == "artifact_stored"]
    assert len(stored_events) == artifact_count


async def test_file_one_byte_over_the_size_limit_is_rejected_and_never_staged(
    client, docker, marker, service_logs
):
    artifact_bytes = tool_limits(TOOL).artifact_bytes
    code = f"""
for name, size in (("at-limit.bin", {artifact_bytes}), ("over-limit.bin", {artifact_bytes + 1})):
    with open(name, "wb") as output:
        output.truncate(size)
"""
    result, _ = await run_outputs(client, docker, marker, code, service_logs)

    sizes = {ref.path: ref.size_bytes for ref in result.artifacts}
    assert sizes == {"at-limit.bin": artifact_bytes, "ok.txt": 2}
    assert rejections(result) == {
        "over-limit.bin": (
            "too_large",
            f"{artifact_bytes + 1} bytes exceeds the limit of {artifact_bytes} per file",
        ),
    }


@pytest.mark.slow
async def test_archive_bombs_are_stored_as_opaque_files_and_never_unpacked(
    client, docker, marker, service_logs, tmp_path
):
    # bomb.zip inflates to 64 MiB, twice the run's artifact total; bomb.tar.gz holds names
    # that would escape any directory it were unpacked into.
    code = """
import io, tarfile, zipfile
with zipfile.ZipFile("bomb.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as bomb:
    with bomb.open("zeros.bin", "w", force_zip64=True) as member:
        for _ in range(64):
            member.write(bytes(1 << 20))
with tarfile.open("bomb.tar.gz", "w:gz") as bomb:
    for name in ("../../etc/evil-relative", "/etc/evil-absolute", "extracted.txt"):
        info = tarfile.TarInfo(name)
        info.size = 4
        bomb.addfile(info, io.BytesIO(b"evil"))
    link = tarfile.TarInfo("evil-link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    bomb.addfile(link)
print(json.dumps({
    name: {"size_bytes": os.path.getsize(name),
           "sha256": hashlib.sha256(open(name, "rb").read()).hexdigest()}
    for name in ("bomb.zip", "bomb.tar.gz")
}))
"""
    result, events = await run_outputs(client, docker, marker, code, service_logs)

    written = json.loads(result.stdout)
    stored = {
        ref.path: {"size_bytes": ref.size_bytes, "sha256": ref.sha256} for ref in result.artifacts
    }
    assert sorted(stored) == ["bomb.tar.gz", "bomb.zip", "ok.txt"]
    assert {path: stored[path] for path in written} == written
    assert written["bomb.zip"]["size_bytes"] < 1024 * 1024
    assert result.rejected_artifacts == []
    named = {e.data.get("path") for e in events if e.type.startswith("artifact_")}
    assert named == {"bomb.zip", "bomb.tar.gz", "ok.txt"}
    fetched = await client.fetch_artifact(result.run_id, "bomb.tar.gz", tmp_path / "bomb.tar.gz")
    assert fetched.sha256 == written["bomb.tar.gz"]["sha256"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bomb.tar.gz"]


async def test_hardlinked_file_is_stored_once_under_its_first_name_whichever_came_first(
    client, docker, marker, service_logs
):
    # Docker's archive lists names in order: the first name of the inode carries the data,
    # every later name is a hardlink entry pointing at it, whichever the tool created first.
    code = """
open("m-data.txt", "w").write("payload")
os.link("m-data.txt", "a-link")
os.link("m-data.txt", "z-link")
print(json.dumps({"inode_names": os.stat("a-link").st_nlink}))
"""
    result, events = await run_outputs(client, docker, marker, code, service_logs)

    assert json.loads(result.stdout) == {"inode_names": 3}
    assert stored_paths(result) == ["a-link", "ok.txt"]
    [data] = [ref for ref in result.artifacts if ref.path == "a-link"]
    assert (data.size_bytes, data.sha256) == (7, hashlib.sha256(b"payload").hexdigest())
    linked = ("not_a_regular_file", "hardlink -> a-link is not a regular file")
    assert rejections(result) == {"m-data.txt": linked, "z-link": linked}
    # The refused names carried no bytes: the one with the data was stored.
    rejected_sizes = {
        e.data["path"]: e.data["size_bytes"] for e in events if e.type == "artifact_rejected"
    }
    assert rejected_sizes == {"m-data.txt": 0, "z-link": 0}


def archive_cut_at(events) -> int:
    """Where the collector cut the output archive, from the run's one limit_hit event."""
    [cut] = [e for e in events if e.type == "limit_hit" and e.reason == "artifacts_total_bytes"]
    return cut.data["limit_bytes"]


def after_the_cut(cut_at_bytes: int) -> tuple[str, str]:
    return (
        "not_collected",
        f"output archive cut at {cut_at_bytes} bytes; further entries not collected",
    )


async def test_file_bigger_than_the_run_total_is_rejected_as_too_large_not_dropped(
    client, docker, marker, service_logs
):
    # The user's report: one file past the archive cap gave a run with no word about it.
    limits = tool_limits(TOOL)
    size_mib = limits.artifacts_total_bytes // 2**20 + 8
    code = f"# {marker}\ndd if=/dev/zero of=$BILLY_OUTPUT_DIR/big bs=1M count={size_mib}"
    result, events = await run_hostile(client, code, language="sh")

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    assert_nothing_leaks(result, events, service_logs.records)
    cut_at_bytes = archive_cut_at(events)
    assert limits.artifacts_total_bytes < cut_at_bytes < size_mib * 2**20
    assert result.artifacts == []
    assert rejections(result) == {
        "big": (
            "too_large",
            f"{size_mib * 2**20} bytes exceeds the limit of {limits.artifact_bytes} per file",
        ),
        "": after_the_cut(cut_at_bytes),
    }
    assert await bucket_objects(client, subjects.STAGING_BUCKET, result.run_id) == {}
    await assert_host_unaffected(client, docker, result, marker)


async def test_file_cut_by_the_archive_cap_over_the_run_total_is_rejected_as_total_too_large(
    client, docker, marker, service_logs
):
    third_mib = tool_limits(TOOL).artifacts_total_bytes // 2**20 // 3 + 2
    code = f"""
for name in ("a.bin", "b.bin", "c.bin"):
    with open(name, "wb") as output:
        output.truncate({third_mib} << 20)
"""
    result, events = await run_outputs(client, docker, marker, code, service_logs)

    cut_at_bytes = archive_cut_at(events)
    size_bytes = third_mib << 20
    assert stored_paths(result) == ["a.bin", "b.bin"]
    total_bytes = tool_limits(TOOL).artifacts_total_bytes
    assert rejections(result) == {
        "c.bin": (
            "total_too_large",
            f"{2 * size_bytes} + {size_bytes} bytes exceeds the run's limit of {total_bytes}",
        ),
        # ok.txt comes after c.bin in the archive: the summary stands for it.
        "": after_the_cut(cut_at_bytes),
    }


async def test_file_within_the_limits_but_cut_by_the_archive_cap_is_reported_not_collected(
    client, docker, marker, service_logs
):
    # A rejected file still fills the archive: the next one crosses the cap although it
    # would fit the run's total.
    limits = tool_limits(TOOL)
    big_bytes = limits.artifact_bytes + 4 * 2**20
    cut_bytes = limits.artifacts_total_bytes - big_bytes + 4 * 2**20
    assert cut_bytes <= limits.artifact_bytes
    code = f"""
for name, size in (("a-big.bin", {big_bytes}), ("b-cut.bin", {cut_bytes})):
    with open(name, "wb") as output:
        output.truncate(size)
"""
    result, events = await run_outputs(client, docker, marker, code, service_logs)

    cut_at_bytes = archive_cut_at(events)
    assert result.artifacts == []
    found = rejections(result)
    assert found.pop("a-big.bin")[0] == "too_large"
    reason, message = found.pop("b-cut.bin")
    assert reason == "not_collected"
    received = re.fullmatch(
        rf"output archive cut at {cut_at_bytes} bytes, after (\d+) of this file's "
        rf"{cut_bytes} bytes",
        message,
    )
    assert received is not None, message
    assert 0 <= int(received.group(1)) < cut_bytes
    assert found == {"": after_the_cut(cut_at_bytes)}
