"""Hostile output: floods of stdout, one endless line, and stdout closed early. The kept
output stays within its cap, the count stays exact, and the executor does not hang."""

from __future__ import annotations

from shared.wire import RequestedLimits
from tests.adversarial.conftest import (
    assert_host_unaffected,
    assert_nothing_leaks,
    run_hostile,
    tool_limits,
)

STDOUT_CAP_BYTES = int(tool_limits("python-exec").stdout_bytes)


def limit_hits(events) -> list:
    return [(e.reason, e.data) for e in events if e.type == "limit_hit"]


async def test_100_mb_to_stdout_keeps_the_first_mib_and_counts_all(
    client, docker, marker, service_logs
):
    code = f"""
import sys  # {marker}
line = b"y" * 99 + b"\\n"
block = line * 10_000
for _ in range(100):
    sys.stdout.buffer.write(block)
"""
    result, events = await run_hostile(client, code, limits=RequestedLimits(timeout_s=30))

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    assert result.stdout_bytes == 100_000_000
    assert result.stdout_truncated
    kept, note = result.stdout[:STDOUT_CAP_BYTES], result.stdout[STDOUT_CAP_BYTES:]
    assert set(kept) == {"y", "\n"}
    assert note == f"\n[billy: truncated after {STDOUT_CAP_BYTES} of 100000000 bytes]\n"
    assert limit_hits(events) == [
        ("stdout_bytes", {"stream": "stdout", "limit_bytes": STDOUT_CAP_BYTES})
    ]
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_single_50_mb_line_without_newline_is_cut_at_the_cap(
    client, docker, marker, service_logs
):
    code = f"import sys; sys.stdout.buffer.write(b'z' * 50_000_000)  # {marker}"
    result, events = await run_hostile(client, code, limits=RequestedLimits(timeout_s=30))

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    assert result.stdout_bytes == 50_000_000
    assert result.stdout_truncated
    assert result.stdout[:STDOUT_CAP_BYTES] == "z" * STDOUT_CAP_BYTES
    assert result.stdout[STDOUT_CAP_BYTES:].startswith("\n[billy: truncated after ")
    assert limit_hits(events) == [
        ("stdout_bytes", {"stream": "stdout", "limit_bytes": STDOUT_CAP_BYTES})
    ]
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_stdout_closed_while_the_process_keeps_running(client, docker, marker, service_logs):
    # After closing fd 1 the tool works on: the run waits for it, not for the stream.
    code = f"""
import os, time  # {marker}
print("before close")
os.close(1)
time.sleep(1.5)
try:
    print("after close")
except OSError as exc:
    print(f"stdout gone: {{exc.strerror}}", file=os.sys.stderr)
with open(os.path.join(os.environ["BILLY_OUTPUT_DIR"], "after-close.txt"), "w") as out:
    out.write("still running")
"""
    result, events = await run_hostile(client, code)

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    assert result.stdout == "before close\n"
    assert result.stderr == "stdout gone: Bad file descriptor\n"
    assert [ref.path for ref in result.artifacts] == ["after-close.txt"]
    assert result.timings.run_ms >= 1500
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_stdout_and_stderr_closed_then_running_into_the_timeout(
    client, docker, marker, service_logs
):
    code = f"""
import os, time  # {marker}
print("last words")
os.close(1)
os.close(2)
while True:
    time.sleep(1)
"""
    result, events = await run_hostile(client, code, limits=RequestedLimits(timeout_s=2))

    assert (result.status, result.reason) == ("timed_out", "timeout")
    assert result.stdout == "last words\n"
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)
