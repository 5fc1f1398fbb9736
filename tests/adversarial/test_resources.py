"""Hostile use of the filesystem and descriptors: filling the workspace and /tmp,
writing to the read-only root, opening files until the descriptor limit."""

from __future__ import annotations

from tests.adversarial.conftest import (
    assert_host_unaffected,
    assert_nothing_leaks,
    run_hostile,
    tool_limits,
)

LIMITS = tool_limits("python-exec")
WORKSPACE_BYTES = int(LIMITS.workspace_bytes)
MiB = 1024 * 1024


async def test_writing_past_the_workspace_size_ends_in_limit_exceeded(
    client, docker, marker, service_logs
):
    # 100 MB into a 64 MiB workspace: the tmpfs refuses the rest with ENOSPC.
    code = f"""
import os  # {marker}
with open(os.path.join(os.environ["BILLY_OUTPUT_DIR"], "big.bin"), "wb") as out:
    for _ in range(100):
        out.write(bytes(1_000_000))
"""
    result, events = await run_hostile(client, code)

    assert (result.status, result.reason, result.exit_code) == (
        "limit_exceeded",
        "workspace_bytes",
        1,
    ), result.message
    assert result.message == (
        f"tool exited with code 1 after filling its workspace of {WORKSPACE_BYTES} bytes"
    )
    assert "No space left on device" in result.stderr
    hits = {e.reason: e.data for e in events if e.type == "limit_hit"}
    assert hits["workspace_bytes"] == {"limit_bytes": WORKSPACE_BYTES}
    # The 64 MiB that fitted pass the output archive's cap: it is cut, nothing stored.
    assert set(hits) == {"workspace_bytes", "artifacts_total_bytes"}
    assert result.artifacts == []
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_artifact_written_before_the_workspace_filled_is_still_stored(
    client, docker, marker, service_logs
):
    # The keeper holds the tmpfs after the tool died of ENOSPC: what fitted is collected.
    code = f"""
import os  # {marker}
out_dir = os.environ["BILLY_OUTPUT_DIR"]
with open(os.path.join(out_dir, "report.txt"), "w") as out:
    out.write("written first")
with open(os.path.join(out_dir, "zz-fill.bin"), "wb") as fill:
    while True:
        fill.write(bytes(4 * 1024 * 1024))
"""
    result, events = await run_hostile(client, code)

    assert (result.status, result.reason) == ("limit_exceeded", "workspace_bytes")
    assert [(ref.path, ref.size_bytes) for ref in result.artifacts] == [("report.txt", 13)]
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_writing_past_the_tmp_size_fails_with_enospc(client, docker, marker, service_logs):
    code = f"""
with open("/tmp/fill.bin", "wb") as out:  # {marker}
    while True:
        out.write(bytes(1024 * 1024))
"""
    result, events = await run_hostile(client, code)

    assert (result.status, result.reason, result.exit_code) == ("failed", "exit_code", 1)
    assert "No space left on device" in result.stderr
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_writes_to_the_read_only_root_are_refused(client, docker, marker, service_logs):
    code = f"""
import errno, os  # {marker}
targets = ["/etc/passwd", "/new-file", "/usr/local/bin/tool", "/var/tmp/x",
           "/opt/python-exec/run_code.py", "/root/x", "/home/x"]
for path in targets:
    try:
        with open(path, "a") as handle:
            handle.write("owned")
        print(path, "WRITTEN")
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
for path in ["/etc/new-dir", "/usr/new-dir"]:
    try:
        os.mkdir(path)
        print(path, "CREATED")
    except OSError as exc:
        print(path, errno.errorcode[exc.errno])
"""
    result, events = await run_hostile(client, code)

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    outcomes = dict(line.split() for line in result.stdout.splitlines())
    assert len(outcomes) == 9
    # Existing root-owned files may fail the permission check first (EACCES); creating
    # anything fails with EROFS, which only a read-only root gives.
    assert set(outcomes.values()) <= {"EROFS", "EACCES"}, outcomes
    for created in ("/new-file", "/usr/local/bin/tool", "/var/tmp/x", "/etc/new-dir"):
        assert outcomes[created] == "EROFS", outcomes
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_opening_files_until_the_descriptor_limit_gets_emfile(
    client, docker, marker, service_logs
):
    code = f"""
import errno, os, resource  # {marker}
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError as exc:
    print("stopped", errno.errorcode[exc.errno], "after", len(held))
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))
    print("raised")
except (ValueError, OSError):
    print("raise refused")
for fd in held:
    os.close(fd)
print("limit", *resource.getrlimit(resource.RLIMIT_NOFILE))
"""
    result, events = await run_hostile(client, code)

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    stopped, refused, limit = result.stdout.splitlines()
    words = stopped.split()
    assert words[:3] == ["stopped", "EMFILE", "after"]
    assert 1000 <= int(words[3]) < 1024
    assert refused == "raise refused"
    assert limit == "limit 1024 1024"
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)
