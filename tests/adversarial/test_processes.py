"""Hostile process behaviour: fork bombs, orphans, daemons, memory hogs, endless loops,
SIGTERM refusal and output left in buffers. Each case runs through the whole path."""

from __future__ import annotations

import pytest

from shared.wire import RequestedLimits
from tests.adversarial.conftest import (
    TOOL,
    assert_host_unaffected,
    assert_nothing_leaks,
    container_ids,
    host_processes_with,
    run_hostile,
)
from tests.conftest import wait_for

MiB = 1024 * 1024
SHORT = RequestedLimits(timeout_s=2)


def timings_run_s(result) -> float:
    return result.timings.run_ms / 1000


async def test_host_scan_sees_the_tools_processes_and_shims_while_the_run_lives(
    client, docker, marker
):
    # The check of assert_host_unaffected can fail: here it finds what it looks for.
    code = f"import time; time.sleep(30)  # {marker}"
    reply = await client.submit(TOOL, {"code": code}, limits=SHORT)
    created = None
    async for event in client.events(reply.run_id):
        if event.type == "container_created":
            created = event
        if event.type == "container_started":
            break

    assert await wait_for(lambda: host_processes_with(marker))
    # Both the tool's container and its workspace keeper have a shim on the host.
    assert len(container_ids([created])) == 2
    for container_id in container_ids([created]):
        assert host_processes_with(container_id), container_id
    result = await client.result(reply.run_id, timeout_s=60)
    assert result.status == "timed_out"
    await assert_host_unaffected(client, docker, result, marker)


@pytest.mark.slow
async def test_fork_bomb_is_held_by_the_pids_limit_and_stopped_at_the_timeout(
    client, docker, marker, service_logs
):
    # Every process keeps forking and swallows the refusals: only the pids limit holds it.
    code = f"""
import os, sys  # {marker}
refused = False
while True:
    try:
        os.fork()
    except OSError:
        if not refused:
            refused = True
            os.write(1, b"fork refused\\n")
"""
    result, events = await run_hostile(client, code, limits=RequestedLimits(timeout_s=3))

    # pids (64) holds the count; 64 Pythons dirtying their copy-on-write pages may also
    # pass memory (256 MiB) first. Either limit ends it, and the result says which.
    assert (result.status, result.reason) in {
        ("timed_out", "timeout"),
        ("oom_killed", "memory_bytes"),
    }, result.message
    assert "fork refused" in result.stdout
    assert {"timeout_kill", "oom_kill"} & {e.type for e in events}
    assert timings_run_s(result) < 3 + 1 + 5
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_shell_fork_bomb_is_held_and_stopped(client, docker, marker, service_logs):
    code = f": {marker}; b() {{ b | b & }}; b; sleep 30"
    result, events = await run_hostile(client, code, "sh", limits=SHORT)

    # The first `b` returns at once (backgrounded): sh sleeps while the bomb fills pids.
    assert (result.status, result.reason) == ("timed_out", "timeout"), result.message
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_ten_thousand_orphans_end_with_the_run(client, docker, marker, service_logs):
    # Each child forks a sleeping grandchild and exits: the grandchild is an orphan.
    code = f"""
import os, time  # {marker}
made = refused = 0
for _ in range(10_000):
    try:
        child = os.fork()
    except OSError:
        refused += 1
        continue
    if child == 0:
        try:
            if os.fork() == 0:
                time.sleep(3600)
        except OSError:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        made += 1
    else:
        refused += 1
print(f"orphans={{made}} refused={{refused}}")
"""
    result, events = await run_hostile(client, code, limits=RequestedLimits(timeout_s=30))

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    counts = dict(item.split("=") for item in result.stdout.split())
    # pids 64 lets only about 60 orphans live at once; the rest of the 10,000 were refused.
    assert int(counts["orphans"]) + int(counts["refused"]) == 10_000
    assert int(counts["refused"]) > 9_000, counts
    # The run ended with its main process, not an hour later with the orphans.
    assert timings_run_s(result) < 30
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_double_forked_daemon_dies_when_the_main_process_exits(
    client, docker, marker, service_logs
):
    # The classic daemon: fork, setsid, fork again, keep stdout open and keep writing.
    code = f"""
import os, sys, time  # {marker}
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        while True:
            print("daemon alive", flush=True)
            time.sleep(0.05)
    os._exit(0)
time.sleep(0.3)
print("main exits")
"""
    result, events = await run_hostile(client, code, limits=RequestedLimits(timeout_s=20))

    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    assert "main exits" in result.stdout
    assert "daemon alive" in result.stdout
    # docker-init exits with the main process; the daemon dies with the container.
    assert timings_run_s(result) < 5
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_memory_hog_in_the_main_process_is_oom_killed(client, docker, marker, service_logs):
    code = f"data = b'x' * (1024 * 1024 * 1024)  # {marker}"
    result, events = await run_hostile(client, code)

    assert (result.status, result.reason, result.exit_code) == (
        "oom_killed",
        "memory_bytes",
        137,
    ), result.message
    assert str(256 * MiB) in result.message
    [oom] = [e for e in events if e.type == "oom_kill"]
    assert oom.data == {"memory_bytes": 256 * MiB}
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_memory_hog_in_a_child_is_reported_as_oom_killed_while_main_survives(
    client, docker, marker, service_logs
):
    code = f"""
import os  # {marker}
child = os.fork()
if child == 0:
    data = b"x" * (1024 * 1024 * 1024)
    os._exit(0)
_, status = os.waitpid(child, 0)
print(f"child signal={{os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}}")
"""
    result, events = await run_hostile(client, code)

    # The main process exits 0, but the OOM killer acted inside the run's memory cgroup.
    assert result.stdout.strip() == "child signal=9"
    assert result.exit_code == 0
    assert (result.status, result.reason) == ("oom_killed", "memory_bytes"), result.message
    assert "oom_kill" in [e.type for e in events]
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_cpu_bound_infinite_loop_is_stopped_at_the_timeout(
    client, docker, marker, service_logs
):
    code = f"while True: pass  # {marker}"
    result, events = await run_hostile(client, code, limits=SHORT)

    assert (result.status, result.reason) == ("timed_out", "timeout")
    assert result.message == "tool ran longer than 2.0 s; stopped"
    # Python dies of the forwarded SIGTERM; no need for the kill after the grace period.
    assert result.exit_code == 143
    assert 2 <= timings_run_s(result) < 2 + 1 + 3
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_process_sleeping_forever_is_stopped_at_the_timeout(
    client, docker, marker, service_logs
):
    code = f"import time; time.sleep(10**9)  # {marker}"
    result, events = await run_hostile(client, code, limits=SHORT)

    assert (result.status, result.reason) == ("timed_out", "timeout")
    assert 2 <= timings_run_s(result) < 2 + 1 + 3
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_process_ignoring_sigterm_is_killed_after_the_grace_period(
    client, docker, marker, service_logs
):
    code = f"""
import signal, time  # {marker}
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM")
while True:
    time.sleep(1)
"""
    result, events = await run_hostile(client, code, limits=SHORT)

    assert (result.status, result.reason) == ("timed_out", "timeout")
    assert result.exit_code == 137  # SIGKILL, after the 1 s grace
    assert "ignoring SIGTERM" in result.stdout
    [kill] = [e for e in events if e.type == "timeout_kill"]
    assert kill.data == {"timeout_s": 2.0, "stop_grace_s": 1}
    assert 3 <= timings_run_s(result) < 3 + 3
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)


async def test_output_and_files_written_without_flush_before_a_timeout_are_kept(
    client, docker, marker, service_logs
):
    # No newline, no flush, then SIGTERM: PYTHONUNBUFFERED in the ToolSpec's env keeps it.
    code = f"""
import os, sys, time  # {marker}
sys.stdout.write("partial stdout")
sys.stderr.write("partial stderr")
out = open(os.path.join(os.environ["BILLY_OUTPUT_DIR"], "partial.txt"), "w")
out.write("partial file")
out.close()
time.sleep(10**9)
"""
    result, events = await run_hostile(client, code, limits=SHORT)

    assert (result.status, result.reason) == ("timed_out", "timeout")
    assert result.stdout == "partial stdout"
    assert result.stderr == "partial stderr"
    assert [(ref.path, ref.size_bytes) for ref in result.artifacts] == [("partial.txt", 12)]
    await assert_host_unaffected(client, docker, result, marker)
    assert_nothing_leaks(result, events, service_logs.records)
