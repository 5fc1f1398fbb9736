"""DockerRunner against the real Docker daemon: statuses, output caps, hardening,
artifacts, image verification and cleanup. After every test, no container or volume
labelled with this session's executor name may remain."""

from __future__ import annotations

import asyncio
import io
import logging
import tarfile
import time
import tracemalloc

import aiodocker
import pytest
from aiodocker.containers import DockerContainer

from services.executor import runner as runner_module
from services.executor.collector import (
    YIELD_EVERY_ENTRIES,
    Collected,
    _offer_entries,
    archive_entries,
    compile_patterns,
)
from services.executor.errors import InfraError
from services.executor.image import pinned_reference
from services.executor.runner import DockerRunner
from shared.logs import bind
from shared.wire import InputFile
from tests.conftest import managed_leftovers

BUSYBOX = "billy/busybox:local"
BASE = "billy/base:bookworm"
MiB = 1024 * 1024
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
UNKNOWN_ID = "sha256:" + "0" * 64
NO_LEFTOVERS = {"containers": [], "volumes": [], "networks": []}


@pytest.fixture(scope="session")
async def image_ids(docker: aiodocker.Docker) -> dict[str, str]:
    return {ref: (await docker.images.inspect(ref))["Id"] for ref in (BUSYBOX, BASE)}


@pytest.fixture
def runner(docker: aiodocker.Docker) -> DockerRunner:
    return DockerRunner(docker)


@pytest.fixture(autouse=True)
async def no_leftovers(docker: aiodocker.Docker, runner_executor: str):
    """Fail the test when it left a container or volume behind; remove them either way."""
    yield
    leftovers = await managed_leftovers(docker, runner_executor)
    if leftovers != NO_LEFTOVERS:
        await DockerRunner(docker).remove_leftovers(runner_executor)
    assert leftovers == NO_LEFTOVERS


@pytest.fixture
def spec_for(make_spec, image_ids):
    """A ToolSpec on a local test image, with the image id recorded as a build would."""

    def make(command: list[str], *, ref: str = BUSYBOX, **fields):
        return make_spec(command, ref=ref, image_id=image_ids[ref], **fields)

    return make


def shell(script: str, *args: str) -> list[str]:
    return ["sh", "-c", script, "sh", *args]


def tool_container(docker: aiodocker.Docker, reporter) -> DockerContainer:
    """The tool's container (not its workspace keeper), by the id container_created gave."""
    [created] = reporter.of_type("container_created")
    return DockerContainer(docker, id=created.data["container_id"])


# --- statuses ---------------------------------------------------------------------------


async def test_run_with_stdout_and_artifact_succeeds_and_offers_the_artifact(
    runner, spec_for, make_context, reporter, sink
):
    script = (
        'echo "hello $1"; stat -c "%u:%g %a %n" in in/data.txt out arguments.json; '
        'cat arguments.json; printf "%s" "$1" > out/greeting.txt; cp in/data.txt out/copy.txt'
    )
    context = make_context(
        spec_for(shell(script, "{who}")),
        arguments={"who": "world"},
        inputs=[InputFile(name="data.txt", data=b"input bytes")],
    )

    outcome = await runner.run(context, reporter, sink)

    assert (outcome.status, outcome.exit_code, outcome.reason) == ("succeeded", 0, None)
    assert outcome.stdout.decode().splitlines() == [
        "hello world",
        "65534:65534 555 in",
        "65534:65534 444 in/data.txt",
        "65534:65534 700 out",
        "0:0 444 arguments.json",
        '{"who": "world"}',
    ]
    assert outcome.stdout_bytes == len(outcome.stdout)
    assert not outcome.stdout_truncated
    offered = sink.by_path()
    assert offered["greeting.txt"][1] == b"world"
    assert offered["copy.txt"][1] == b"input bytes"
    assert offered["greeting.txt"][0].kind == "file"
    assert offered["greeting.txt"][0].size_bytes == 5
    assert reporter.types() == [
        "image_ensured",
        "container_created",
        "container_started",
        "exited",
        "container_removed",
    ]
    assert reporter.of_type("exited")[0].data["exit_code"] == 0
    timings = outcome.timings
    for name in ("image_ms", "create_ms", "start_ms", "run_ms", "collect_ms", "remove_ms"):
        assert getattr(timings, name) is not None, name
    assert timings.total_ms >= timings.create_ms + timings.run_ms


async def test_run_exiting_non_zero_reports_failed_with_exit_code(
    runner, spec_for, make_context, reporter, sink
):
    script = "echo partial; echo broken >&2; echo log > out/debug.txt; exit 3"
    outcome = await runner.run(make_context(spec_for(shell(script))), reporter, sink)

    assert (outcome.status, outcome.exit_code, outcome.reason) == ("failed", 3, "exit_code")
    assert outcome.message == "tool exited with code 3"
    assert (outcome.stdout, outcome.stderr) == (b"partial\n", b"broken\n")
    # Outputs of a failed run are still collected.
    assert sink.by_path()["debug.txt"][1] == b"log\n"


async def test_run_exceeding_timeout_is_stopped_and_keeps_earlier_output(
    runner, spec_for, make_context, reporter, sink
):
    script = "echo before; echo warn >&2; echo kept > out/partial.txt; sleep 30"
    context = make_context(spec_for(shell(script)), timeout_s=1.0, stop_grace_s=1.0)

    started = time.monotonic()
    outcome = await runner.run(context, reporter, sink)

    assert (outcome.status, outcome.reason) == ("timed_out", "timeout")
    assert (outcome.stdout, outcome.stderr) == (b"before\n", b"warn\n")
    assert sink.by_path()["partial.txt"][1] == b"kept\n"
    [kill] = reporter.of_type("timeout_kill")
    assert kill.data == {"timeout_s": 1.0, "stop_grace_s": 1}
    assert reporter.types().index("timeout_kill") < reporter.types().index("exited")
    # sh dies of the forwarded SIGTERM: no need to wait for the 30 s sleep or the grace.
    assert time.monotonic() - started < 10


async def test_process_ignoring_sigterm_is_killed_after_the_grace_period(
    runner, spec_for, make_context, reporter, sink
):
    script = "trap '' TERM; echo ready; while true; do sleep 1; done"
    context = make_context(spec_for(shell(script)), timeout_s=1.0, stop_grace_s=1.0)

    outcome = await runner.run(context, reporter, sink)

    assert outcome.status == "timed_out"
    assert outcome.stdout == b"ready\n"
    assert outcome.exit_code == 137  # SIGKILL
    assert 1900 <= outcome.timings.run_ms < 8000


async def test_run_exceeding_memory_limit_reports_oom_killed(
    runner, spec_for, make_context, reporter, sink
):
    hog = "data = b'x' * (200 * 1024 * 1024); print(len(data))"
    context = make_context(spec_for(["python3", "-c", hog], ref=BASE), memory_bytes=64 * MiB)

    outcome = await runner.run(context, reporter, sink)

    assert (outcome.status, outcome.reason, outcome.exit_code) == (
        "oom_killed",
        "memory_bytes",
        137,
    )
    assert str(64 * MiB) in outcome.message
    [oom] = reporter.of_type("oom_kill")
    assert oom.data == {"memory_bytes": 64 * MiB}


async def test_argument_that_cannot_be_an_argv_element_is_rejected_before_docker(
    runner, spec_for, make_context, reporter, sink
):
    context = make_context(spec_for(["echo", "{opts}"]), arguments={"opts": {"a": 1}})

    outcome = await runner.run(context, reporter, sink)

    assert (outcome.status, outcome.reason) == ("rejected", "argument_not_allowed")
    assert "opts" in outcome.message
    assert reporter.events == []


async def test_argument_with_a_nul_character_is_rejected_before_docker(
    runner, spec_for, make_context, reporter, sink
):
    # Admission refuses it too; a work item that carries one anyway never reaches Docker.
    context = make_context(spec_for(["echo", "{text}"]), arguments={"text": "a\x00b"})

    outcome = await runner.run(context, reporter, sink)

    assert (outcome.status, outcome.reason) == ("rejected", "argument_not_allowed")
    assert outcome.message == "argument 'text': contains a NUL character, which argv cannot carry"
    assert reporter.events == []


# --- output -----------------------------------------------------------------------------


async def test_flood_of_stdout_is_truncated_counted_and_memory_stays_bounded(
    runner, spec_for, make_context, reporter, sink
):
    # /dev/zero has no newline: one 100 MB "line" on stdout, 3 MB on stderr.
    script = "head -c 100000000 /dev/zero; head -c 3000000 /dev/zero >&2"
    context = make_context(spec_for(shell(script)), stdout_bytes=MiB, stderr_bytes=64 * 1024)

    tracemalloc.start()
    try:
        outcome = await runner.run(context, reporter, sink)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert outcome.status == "succeeded"
    assert (outcome.stdout_bytes, len(outcome.stdout)) == (100_000_000, MiB)
    assert (outcome.stderr_bytes, len(outcome.stderr)) == (3_000_000, 64 * 1024)
    assert outcome.stdout_truncated
    assert outcome.stderr_truncated
    assert outcome.stdout == bytes(MiB)
    assert [event.data for event in reporter.of_type("limit_hit")] == [
        {"stream": "stdout", "limit_bytes": MiB},
        {"stream": "stderr", "limit_bytes": 64 * 1024},
    ]
    # The kept 1 MiB + 64 KiB, the attach queue (128 KiB) and bookkeeping; not 100 MB.
    assert peak_bytes < 8 * MiB, f"peak {peak_bytes} bytes"


async def test_traceparent_and_run_id_reach_the_container_environment(
    runner, spec_for, make_context, reporter, sink
):
    script = 'echo "$TRACEPARENT"; echo "$TRACESTATE"; echo "$BILLY_RUN_ID"'
    context = make_context(
        spec_for(shell(script)),
        trace_env={"TRACEPARENT": TRACEPARENT, "TRACESTATE": "billy=1"},
    )

    outcome = await runner.run(context, reporter, sink)

    assert outcome.stdout.decode().splitlines() == [TRACEPARENT, "billy=1", context.run_id]


# --- hardening --------------------------------------------------------------------------


async def test_running_container_shows_every_hardening_item(
    docker, runner, spec_for, make_context, reporter, sink
):
    script = (
        "id -u; id -g; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; "
        "ls /sys/class/net; touch /rootfile 2>/dev/null && echo root-writable || echo root-ro; "
        "touch /tmp/t && echo tmp-writable; sleep 1"
    )
    context = make_context(
        spec_for(shell(script)), memory_bytes=96 * MiB, cpus=0.5, pids=48, tmp_bytes=4 * MiB
    )
    seen = {}

    async def inspect_while_running():
        seen["container"] = await tool_container(docker, reporter).show()

    reporter.hooks["container_started"] = inspect_while_running
    outcome = await runner.run(context, reporter, sink)

    assert outcome.status == "succeeded"
    assert outcome.stdout.decode().split() == [
        "65534",
        "65534",
        "CapEff:",
        "0000000000000000",
        "NoNewPrivs:",
        "1",
        "Seccomp:",
        "2",
        "lo",
        "root-ro",
        "tmp-writable",
    ]
    inspected = seen["container"]
    assert inspected["State"]["Running"] is True
    config, host = inspected["Config"], inspected["HostConfig"]
    assert config["User"] == "65534:65534"
    assert config["WorkingDir"] == "/workspace"
    assert config["Labels"] == context.labels()
    assert config["Tty"] is False
    assert config["OpenStdin"] is False
    assert {item for item in config["Env"] if item.startswith("BILLY_")} == {
        f"BILLY_RUN_ID={context.run_id}",
        "BILLY_INPUT_DIR=/workspace/in",
        "BILLY_OUTPUT_DIR=/workspace/out",
        "BILLY_ARGUMENTS=/workspace/arguments.json",
    }
    assert config["Image"].startswith("sha256:")
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Privileged"] is False
    assert host["ReadonlyRootfs"] is True
    tmp = f"rw,noexec,nosuid,nodev,size={4 * MiB},uid=65534,gid=65534"
    assert host["Tmpfs"] == {"/tmp": tmp}
    assert host["PidsLimit"] == 48
    assert host["Memory"] == host["MemorySwap"] == 96 * MiB
    assert host["NanoCpus"] == 500_000_000
    fsize = max(context.limits.workspace_bytes, context.limits.tmp_bytes)
    assert host["Ulimits"] == [
        {"Name": "nofile", "Soft": 1024, "Hard": 1024},
        {"Name": "core", "Soft": 0, "Hard": 0},
        {"Name": "fsize", "Soft": fsize, "Hard": fsize},
    ]
    assert host["Init"] is True
    assert host["IpcMode"] == "private"
    assert host["PidMode"] == ""
    assert host["UTSMode"] == ""
    assert not host["Devices"]
    assert not host["PortBindings"]
    assert host["RestartPolicy"]["Name"] == "no"
    assert host["AutoRemove"] is False
    assert host["LogConfig"]["Type"] == "none"
    assert not host["Binds"]
    [mount] = inspected["Mounts"]
    assert (mount["Type"], mount["Destination"], mount["RW"]) == ("volume", "/workspace", True)
    assert "docker.sock" not in repr(inspected["Mounts"])


async def test_workspace_volume_is_a_tmpfs_of_workspace_bytes_labelled_like_the_run(
    docker, runner, spec_for, make_context, reporter, sink
):
    context = make_context(spec_for(["true"]), workspace_bytes=2 * MiB)
    seen = {}

    async def show_volume_and_keeper():
        label = f"billy.run_id={context.run_id}"
        seen["volumes"] = (await docker.volumes.list(filters={"label": [label]}))["Volumes"]
        [created] = reporter.of_type("container_created")
        keeper = DockerContainer(docker, id=created.data["keeper_id"])
        seen["keeper"] = await keeper.show()

    reporter.hooks["container_started"] = show_volume_and_keeper
    await runner.run(context, reporter, sink)

    [volume] = seen["volumes"]
    assert volume["Driver"] == "local"
    assert volume["Labels"] == context.labels()
    assert volume["Options"] == {
        "type": "tmpfs",
        "device": "tmpfs",
        "o": f"size={2 * MiB},uid=0,gid=0,mode=0755,nosuid,nodev",
    }
    keeper = seen["keeper"]
    assert keeper["State"]["Running"] is True
    assert keeper["Config"]["Labels"] == {**context.labels(), "billy.role": "workspace-keeper"}
    assert keeper["Config"]["User"] == "65534:65534"
    host = keeper["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["ReadonlyRootfs"] is True
    assert host["Memory"] == host["MemorySwap"] == 16 * MiB
    assert host["PidsLimit"] == 8
    [mount] = keeper["Mounts"]
    assert (mount["Type"], mount["Name"], mount["Destination"]) == (
        "volume",
        volume["Name"],
        "/workspace",
    )


async def test_writing_past_the_workspace_size_fails_with_enospc_as_limit_exceeded(
    runner, spec_for, make_context, reporter, sink
):
    script = "echo kept > out/small.txt; head -c 3000000 /dev/zero > out/big.bin"
    context = make_context(spec_for(shell(script)), workspace_bytes=MiB)

    outcome = await runner.run(context, reporter, sink)

    assert (outcome.status, outcome.reason, outcome.exit_code) == (
        "limit_exceeded",
        "workspace_bytes",
        1,
    )
    assert outcome.message == (
        f"tool exited with code 1 after filling its workspace of {MiB} bytes"
    )
    # busybox head words ENOSPC as "I/O error"; the tool's own error is kept either way.
    assert outcome.stderr.startswith(b"head: ")
    [hit] = reporter.of_type("limit_hit")
    assert (hit.reason, hit.data) == ("workspace_bytes", {"limit_bytes": MiB})
    # What fitted is still collected after the tool exited: the keeper held the tmpfs.
    offered = sink.by_path()
    assert offered["small.txt"][1] == b"kept\n"
    assert offered["big.bin"][0].size_bytes < MiB


async def test_failure_with_room_left_in_the_workspace_stays_failed(
    runner, spec_for, make_context, reporter, sink
):
    script = "head -c 100000 /dev/zero > out/some.bin; exit 4"
    context = make_context(spec_for(shell(script)), workspace_bytes=MiB)

    outcome = await runner.run(context, reporter, sink)

    assert (outcome.status, outcome.reason, outcome.exit_code) == ("failed", "exit_code", 4)
    assert reporter.of_type("limit_hit") == []


# --- artifacts --------------------------------------------------------------------------

WEIRD_OUTPUTS = """
import os
os.chdir("/workspace/out")
open("data.txt", "w").write("payload")
os.link("data.txt", "hard")
os.symlink("../../etc/passwd", "link")
os.mkfifo("pipe")
open("new\\nline.txt", "w").write("nl")
fd = os.open(b"bad\\xffname.txt", os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, b"raw")
os.close(fd)
open("\\u00fcn\\u00efcode-\\u540d\\u524d.txt", "w").write("u")
open("l" * 150 + ".txt", "w").write("long")
os.makedirs("sub/deep")
open("sub/deep/file.txt", "w").write("deep")
open("big.bin", "wb").write(bytes(4096))
"""


async def test_links_fifos_and_weird_names_are_offered_with_their_kind(
    runner, spec_for, make_context, reporter, sink
):
    spec = spec_for(["python3", "-c", WEIRD_OUTPUTS], ref=BASE)
    context = make_context(spec, artifact_bytes=1024)

    outcome = await runner.run(context, reporter, sink)

    assert outcome.status == "succeeded", outcome.stderr
    offered = sink.by_path()
    summary = {
        path: (entry.kind, entry.link_target, content) for path, (entry, content) in offered.items()
    }
    assert summary == {
        "big.bin": ("file", None, None),
        "bad\ufffdname.txt": ("file", None, b"raw"),
        "data.txt": ("file", None, b"payload"),
        "hard": ("hardlink", "data.txt", None),
        "link": ("symlink", "../../etc/passwd", None),
        "l" * 150 + ".txt": ("file", None, b"long"),
        "new\nline.txt": ("file", None, b"nl"),
        "pipe": ("fifo", None, None),
        "sub/deep/file.txt": ("file", None, b"deep"),
        "\u00fcn\u00efcode-\u540d\u524d.txt": ("file", None, b"u"),
    }
    assert offered["bad\ufffdname.txt"][0].raw_path == b"bad\xffname.txt"
    # Over artifact_bytes: offered by its header, bytes not read.
    assert offered["big.bin"][0].size_bytes == 4096


async def test_only_entries_matching_the_artifact_patterns_are_offered(
    runner, spec_for, make_context, reporter, sink
):
    script = (
        "mkdir -p out/reports/2024; echo r > out/reports/2024/q1.csv; "
        "echo t > out/notes.txt; echo x > out/skip.log"
    )
    spec = spec_for(shell(script), outputs={"artifacts": ["*.txt", "reports/**"]})

    await runner.run(make_context(spec), reporter, sink)

    assert sorted(sink.by_path()) == ["notes.txt", "reports/2024/q1.csv"]


async def test_output_archive_over_its_cap_offers_only_what_was_fully_received(
    runner, spec_for, make_context, reporter, sink
):
    # Archive order is lexical: a.txt, then 3 MB that cross the cap, then c.txt.
    script = "echo a > out/a.txt; head -c 3000000 /dev/zero > out/b.bin; echo c > out/c.txt"
    context = make_context(spec_for(shell(script)), artifacts_total_bytes=1, artifact_count=0)

    outcome = await runner.run(context, reporter, sink)

    assert outcome.status == "succeeded"
    assert list(sink.by_path()) == ["a.txt"]
    [hit] = reporter.of_type("limit_hit")
    assert hit.reason == "artifacts_total_bytes"
    assert hit.data == {"limit_bytes": 1 + MiB}


# --- image ------------------------------------------------------------------------------


async def test_image_under_the_tag_with_another_id_is_rejected_as_digest_mismatch(
    runner, make_spec, make_context, reporter, sink, image_ids
):
    context = make_context(make_spec(["true"], ref=BUSYBOX, image_id=UNKNOWN_ID))

    outcome = await runner.run(context, reporter, sink)

    assert (outcome.status, outcome.reason) == ("rejected", "image_digest_mismatch")
    assert outcome.message == (
        f"image {BUSYBOX}: expected id {UNKNOWN_ID}, found id {image_ids[BUSYBOX]}"
    )
    assert reporter.events == []


async def test_missing_image_without_a_registry_is_image_unavailable(
    runner, make_spec, make_context, reporter, sink
):
    context = make_context(make_spec(["true"], ref="billy-test/absent:1.0", image_id=UNKNOWN_ID))

    outcome = await runner.run(context, reporter, sink)

    assert (outcome.status, outcome.reason) == ("infra_error", "image_unavailable")
    assert outcome.message == (
        "image billy-test/absent:1.0: no such image; run `billy-tools images build`"
    )


async def test_image_without_recorded_id_is_refused(
    runner, make_spec, make_context, reporter, sink
):
    context = make_context(make_spec(["true"], ref=BUSYBOX, image_id=None))

    outcome = await runner.run(context, reporter, sink)

    assert (outcome.status, outcome.reason) == ("infra_error", "image_unavailable")
    assert outcome.message == (
        f"image {BUSYBOX}: no image id recorded; run `billy-tools images build`"
    )


async def test_missing_image_that_cannot_be_pulled_is_image_unavailable(
    docker, make_spec, make_context, reporter, sink
):
    # Port 9 (discard) refuses connections: the pull fails at once.
    runner = DockerRunner(docker, registry="127.0.0.1:9")
    digest = "sha256:" + "1" * 64
    spec = make_spec(
        ["true"], ref="billy/absent:1.0", image_id=UNKNOWN_ID, image={"digest": digest}
    )

    outcome = await runner.run(make_context(spec), reporter, sink)

    assert (outcome.status, outcome.reason) == ("infra_error", "image_unavailable")
    assert outcome.message.startswith(f"pull 127.0.0.1:9/billy/absent@{digest} failed: ")


async def test_container_is_created_from_the_verified_image_id_not_the_tag(
    docker, runner, spec_for, make_context, reporter, sink, image_ids
):
    context = make_context(spec_for(["true"]))
    seen = {}

    async def image_of_container():
        seen["image"] = (await tool_container(docker, reporter).show())["Config"]["Image"]

    reporter.hooks["container_started"] = image_of_container
    await runner.run(context, reporter, sink)

    assert seen["image"] == image_ids[BUSYBOX]


# --- Docker and cleanup -----------------------------------------------------------------


async def test_unreachable_docker_is_infra_error_docker_unavailable(
    make_spec, make_context, reporter, sink, tmp_path
):
    absent = aiodocker.Docker(url=f"unix://{tmp_path}/no-docker.sock")
    try:
        runner = DockerRunner(absent)
        assert await runner.ping() is False
        outcome = await runner.run(make_context(make_spec(["true"])), reporter, sink)
    finally:
        await absent.close()

    assert (outcome.status, outcome.reason) == ("infra_error", "docker_unavailable")
    assert "no-docker.sock" in outcome.message


async def test_ping_answers_true_when_the_daemon_is_up(runner):
    assert await runner.ping() is True


async def test_cancelled_run_still_removes_its_container_and_volume(
    docker, runner, spec_for, make_context, reporter, sink
):
    context = make_context(spec_for(["sleep", "30"]))
    started = asyncio.Event()

    async def mark_started():
        started.set()

    reporter.hooks["container_started"] = mark_started
    task = asyncio.create_task(runner.run(context, reporter, sink))
    await asyncio.wait_for(started.wait(), timeout=10)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    label = f"billy.run_id={context.run_id}"
    assert await docker.containers.list(all=True, filters={"label": [label]}) == []
    assert (await docker.volumes.list(filters={"label": [label]}))["Volumes"] in (None, [])


async def test_remove_leftovers_removes_only_this_executors_objects(
    docker, runner, runner_executor
):
    mine = {"billy.managed": "true", "billy.executor": runner_executor}
    theirs = {"billy.managed": "true", "billy.executor": f"{runner_executor}-other"}
    await docker.volumes.create({"Name": f"{runner_executor}-vol", "Labels": mine})
    await docker.containers.create({"Image": BUSYBOX, "Cmd": ["true"], "Labels": mine})
    other = await docker.containers.create({"Image": BUSYBOX, "Cmd": ["true"], "Labels": theirs})
    try:
        removed = await runner.remove_leftovers(runner_executor)
        assert removed == 2
        assert await managed_leftovers(docker, runner_executor) == NO_LEFTOVERS
        assert (await other.show())["Config"]["Labels"] == theirs
    finally:
        await other.delete(force=True)


async def test_remove_leftovers_goes_on_past_a_volume_docker_refuses_to_remove(
    docker, runner, runner_executor
):
    mine = {"billy.managed": "true", "billy.executor": runner_executor}
    in_use = f"{runner_executor}-in-use"
    free = f"{runner_executor}-free"
    await docker.volumes.create({"Name": in_use, "Labels": mine})
    await docker.volumes.create({"Name": free, "Labels": mine})
    # Not this executor's container: it keeps `in_use` mounted, so removing it answers 409.
    holder = await docker.containers.create(
        {"Image": BUSYBOX, "Cmd": ["true"], "HostConfig": {"Binds": [f"{in_use}:/data"]}}
    )
    try:
        removed = await runner.remove_leftovers(runner_executor)
        assert removed == 1
        assert (await managed_leftovers(docker, runner_executor))["volumes"] == [in_use]
    finally:
        await holder.delete(force=True)
        await aiodocker.volumes.DockerVolume(docker, in_use).delete()


async def test_volume_is_removed_even_when_removing_a_container_fails(
    runner, spec_for, make_context, reporter, sink, monkeypatch
):
    real_remove_container = runner_module.remove_container

    async def remove_then_fail(docker, id_or_name):
        # Docker removed it but the answer was an error (e.g. a 500 after a slow removal).
        await real_remove_container(docker, id_or_name)
        raise InfraError("docker_error", f"remove container {id_or_name}: Docker answered 500")

    monkeypatch.setattr(runner_module, "remove_container", remove_then_fail)
    context = make_context(spec_for(["true"]))

    outcome = await runner.run(context, reporter, sink)

    assert outcome.status == "succeeded"
    assert "container_removed" not in reporter.types()
    # The autouse no_leftovers fixture fails the test if the volume stayed.


# --- collector on hand-made archives ----------------------------------------------------


def _archive(*members: tuple[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def _entries(buffer: io.BytesIO, received_bytes: int | None = None) -> list[str]:
    log = bind(logging.getLogger(__name__))
    received = len(buffer.getvalue()) if received_bytes is None else received_bytes
    with tarfile.open(fileobj=buffer, mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
        return [entry.path for entry, _ in archive_entries(tar, received, log)]


def test_archive_names_outside_out_or_with_dot_segments_are_not_trusted():
    buffer = _archive(
        ("out/ok.txt", b"1"),
        ("out/../escape.txt", b"2"),
        ("out/a/../../b.txt", b"3"),
        ("/etc/passwd", b"4"),
        ("elsewhere/x", b"5"),
        ("out//double", b"6"),
        ("out/./dot", b"7"),
    )
    assert _entries(buffer) == ["ok.txt"]


def test_pax_long_non_ascii_names_are_read_whole():
    name = "out/" + "\u00e9" * 120 + "/\u6587\u4ef6.txt"
    assert _entries(_archive((name, b"x"))) == [name[4:]]


def test_entries_whose_data_was_not_fully_received_are_not_offered():
    buffer = _archive(("out/first", b"a" * 100), ("out/second", b"b" * 5000))
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as tar:
        second = tar.getmember("out/second")
        second_data_end = second.offset_data + second.size
    assert _entries(io.BytesIO(buffer.getvalue()), second_data_end - 1) == ["first"]
    assert _entries(io.BytesIO(buffer.getvalue()), second_data_end) == ["first", "second"]


def test_entry_cut_inside_its_data_is_noted_with_its_header_and_received_bytes():
    buffer = _archive(("out/first", b"a" * 100), ("out/second", b"b" * 5000))
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as tar:
        second_data_start = tar.getmember("out/second").offset_data
    received = second_data_start + 1200
    collected = Collected(archive_bytes=received, truncated=True)
    log = bind(logging.getLogger(__name__))
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue()[:received])) as tar:
        offered = [entry.path for entry, _ in archive_entries(tar, received, log, collected)]

    assert offered == ["first"]
    assert collected.cut_entry is not None
    assert (collected.cut_entry.path, collected.cut_entry.size_bytes) == ("second", 5000)
    assert collected.cut_entry_received_bytes == 1200


def test_reading_entries_does_not_keep_every_header_in_memory():
    buffer = _archive(*((f"out/f{i}", b"x") for i in range(500)))
    log = bind(logging.getLogger(__name__))
    with tarfile.open(fileobj=buffer, mode="r:") as tar:
        most_kept = 0
        for _ in archive_entries(tar, len(buffer.getvalue()), log):
            most_kept = max(most_kept, len(tar.members))

    assert most_kept <= 1


async def test_offering_many_unmatched_entries_lets_other_tasks_run(make_spec, make_context, sink):
    count = 3 * YIELD_EVERY_ENTRIES
    buffer = _archive(*((f"out/f{i}.log", b"") for i in range(count)))
    context = make_context(make_spec(["true"], outputs={"artifacts": ["*.txt"]}))
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0)
    ticks_before = ticks
    log = bind(logging.getLogger(__name__))
    with tarfile.open(fileobj=buffer, mode="r:") as tar:
        await _offer_entries(
            tar, Collected(archive_bytes=len(buffer.getvalue())), context, sink, log
        )
    ticks_during = ticks - ticks_before
    ticker.cancel()

    assert sink.offers == []
    assert ticks_during >= count // YIELD_EVERY_ENTRIES


def test_skipped_entry_name_is_logged_cut_to_a_bounded_length(caplog):
    name = "out/" + "a" * 5000 + "/../x"
    with caplog.at_level(logging.WARNING):
        assert _entries(_archive((name, b"1"))) == []

    [record] = [r for r in caplog.records if "output_entry_skipped" in r.getMessage()]
    assert len(record.getMessage()) < 400
    assert f"name_chars={len(name)}" in record.getMessage()


@pytest.mark.parametrize(
    ("patterns", "path", "matches"),
    [
        (["**"], "a/b/c.txt", True),
        (["**"], "new\nline/x", True),
        (["*.txt"], "new\nline.txt", True),
        (["*.txt"], "a.txt", True),
        (["*.txt"], "dir/a.txt", False),
        (["**/*.txt"], "a.txt", True),
        (["**/*.txt"], "x/y/a.txt", True),
        (["reports/**"], "reports/2024/q1.csv", True),
        (["reports/**"], "other/q1.csv", False),
        (["?.md"], "a.md", True),
        (["?.md"], "ab.md", False),
        (["[ab].txt"], "b.txt", True),
        (["[!ab].txt"], "b.txt", False),
        (["a.txt"], "a_txt", False),
        ([], "a.txt", False),
    ],
)
def test_artifact_patterns_match_paths_relative_to_out(patterns, path, matches):
    assert compile_patterns(patterns)(path) is matches


@pytest.mark.parametrize(
    ("ref", "pinned"),
    [
        ("billy/doc-stats:1.0.0", "reg:5000/billy/doc-stats@sha256:aa"),
        ("billy/doc-stats", "reg:5000/billy/doc-stats@sha256:aa"),
        ("billy/doc-stats:1.0@sha256:bb", "reg:5000/billy/doc-stats@sha256:aa"),
        ("host:5000/tool", "reg:5000/host:5000/tool@sha256:aa"),
    ],
)
def test_pull_reference_is_the_repository_pinned_by_digest_in_the_registry(ref, pinned):
    assert pinned_reference("reg:5000/", ref, "sha256:aa") == pinned
