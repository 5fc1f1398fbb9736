"""`billy-tools` as a user runs it: a subprocess against the embedded stack that
`billy-tools up` starts (nats-server and the three services as real processes, real Docker)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from shared import render, stack
from shared.cli import (
    UsageError,
    artifact_destination,
    check_out_dir,
    parse_arguments,
    requested_limits,
)
from shared.client import BillyToolsClient, UnsafeArtifactPath
from shared.settings import Settings
from shared.wire import RequestedLimits, RunResult
from tests.conftest import TEST_TOOLS_DIR, NatsServer, free_port, managed_leftovers, wait_for

CLI_TIMEOUT_S = 120
COMPONENTS = (stack.NATS_SERVER, *stack.SERVICES)


def cli_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        NATS_URL=settings.nats_url,
        BILLY_STATE_DIR=str(settings.state_dir),
        BILLY_TOOLS_DIR=str(settings.tools_dir),
        BILLY_EXECUTOR_NAME=settings.executor_name,
        COLUMNS="250",  # no wrapped table cells in what the assertions read
    )
    return env


def billy_tools(
    settings: Settings, *args: str, cwd: Path | None = None, timeout_s: float = CLI_TIMEOUT_S
):
    """Run `python -m shared.cli ARGS` and return the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *args],
        env=cli_env(settings),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def pids_of(settings: Settings) -> dict[str, int]:
    paths = stack.StackPaths(settings.state_dir)
    return {name: stack.read_pid(paths.pid_file(name)) for name in COMPONENTS}


def process_gone(pid: int) -> bool:
    """True when no such process exists, or it is a zombie (dead, awaiting its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


def stack_settings(tmp_path: Path, label: str) -> Settings:
    return Settings(
        nats_url=f"nats://127.0.0.1:{free_port()}",
        state_dir=tmp_path,
        tools_dir=TEST_TOOLS_DIR,
        executor_name=f"test-{label}-{uuid.uuid4().hex[:8]}",
    )


@pytest.fixture(scope="module")
async def cli_stack(tmp_path_factory, docker):
    """The embedded stack started with `billy-tools up`, stopped with `billy-tools down`."""
    settings = stack_settings(tmp_path_factory.mktemp("cli-stack"), "cli")
    started = billy_tools(settings, "up")
    pids = pids_of(settings)
    try:
        assert started.returncode == 0, started.stderr
        yield settings
    finally:
        stopped = billy_tools(settings, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert all(process_gone(pid) for pid in pids.values() if pid), pids
    assert await managed_leftovers(docker, settings.executor_name) == {
        "containers": [],
        "volumes": [],
        "networks": [],
    }


# -- the stack --------------------------------------------------------------------------


def test_up_starts_every_component_with_a_pid_file(cli_stack):
    pids = pids_of(cli_stack)

    assert all(pids[name] and not process_gone(pids[name]) for name in COMPONENTS), pids


def test_up_again_reuses_every_running_component(cli_stack):
    before = pids_of(cli_stack)

    again = billy_tools(cli_stack, "up")

    assert again.returncode == 0, again.stderr
    assert again.stdout.count("reused") == len(COMPONENTS)
    assert pids_of(cli_stack) == before


def test_status_exits_0_when_every_component_answers(cli_stack):
    shown = billy_tools(cli_stack, "status")

    assert shown.returncode == 0, shown.stdout
    assert shown.stdout.count("running") == len(COMPONENTS)


async def test_up_and_down_on_a_temporary_state_dir_leave_no_process_behind(tmp_path, docker):
    settings = stack_settings(tmp_path, "updown")
    try:
        first = await stack.up(settings)
        second = await stack.up(settings)
        pids = pids_of(settings)
        alive_while_up = {name: not process_gone(pid) for name, pid in pids.items()}
    finally:
        stopped = await stack.down(settings)

    assert [c.state for c in first] == ["started"] * len(COMPONENTS)
    assert [c.state for c in second] == ["reused"] * len(COMPONENTS)
    assert alive_while_up == dict.fromkeys(COMPONENTS, True)
    assert {c.name: c.pid for c in stopped} == pids
    assert [name for name, pid in pids.items() if not process_gone(pid)] == []
    assert list((tmp_path / "run").iterdir()) == []
    assert await stack.down(settings) == []
    assert (await managed_leftovers(docker, settings.executor_name))["containers"] == []


async def test_up_names_the_log_when_a_service_exits_while_starting(tmp_path):
    settings = stack_settings(tmp_path, "broken")
    # Every service sets up logging first; an unknown level makes it exit at once.
    broken = settings.model_copy(update={"log_level": "NO-SUCH-LEVEL"})
    try:
        with pytest.raises(stack.StackError, match=r"admission\.log") as caught:
            await stack.up(broken, timeout_s=30)
    finally:
        await stack.down(settings)

    assert "admission" in str(caught.value)
    assert all(process_gone(pid) for pid in pids_of(settings).values() if pid)


# -- tools and runs ---------------------------------------------------------------------


def test_tools_json_lists_the_test_tools(cli_stack):
    shown = billy_tools(cli_stack, "tools", "--json")

    names = {tool["name"] for tool in json.loads(shown.stdout)["tools"]}
    assert shown.returncode == 0
    assert {"echo", "shell"} <= names


def test_run_of_echo_exits_0_and_prints_its_stdout(cli_stack, tmp_path):
    done = billy_tools(cli_stack, "run", "echo", "--arg", "message=hello cli", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert "succeeded" in done.stdout
    assert "hello cli" in done.stdout
    assert "finished" in done.stdout  # the live event lines


def test_run_with_invalid_arguments_exits_2_and_prints_each_failing_path(cli_stack, tmp_path):
    done = billy_tools(
        cli_stack, "run", "echo", "--arg", "message=5", "--arg", "extra=1", cwd=tmp_path
    )

    assert done.returncode == 2
    assert "invalid_arguments" in done.stderr
    assert "/message" in done.stderr
    assert "extra" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_of_a_failing_tool_exits_1_with_its_exit_code(cli_stack, tmp_path):
    done = billy_tools(
        cli_stack, "run", "shell", "--arg", "script=echo oops >&2; exit 3", cwd=tmp_path
    )

    assert done.returncode == 1
    assert "exit_code=3" in done.stdout
    assert "oops" in done.stdout  # the stderr tail


def test_run_passes_input_files_to_the_tool(cli_stack, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("from an input file")

    done = billy_tools(
        cli_stack,
        "run",
        "shell",
        "--args-json",
        '{"script": "cat /workspace/in/data.txt"}',
        "--input",
        str(data),
        "--json",
        cwd=tmp_path,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["stdout"] == "from an input file"


WRITE_ARTIFACTS = "mkdir -p /workspace/out/d && printf abc > /workspace/out/d/a.txt"


def test_run_saves_artifacts_under_the_default_out_dir(cli_stack, tmp_path):
    done = billy_tools(
        cli_stack, "run", "shell", "--arg", f"script={WRITE_ARTIFACTS}", "--json", cwd=tmp_path
    )

    body = json.loads(done.stdout)
    run_id = body["result"]["run_id"]
    saved = tmp_path / "billy-artifacts" / run_id / "d" / "a.txt"
    assert done.returncode == 0, done.stderr
    assert saved.read_bytes() == b"abc"
    assert body["saved"] == {"d/a.txt": str(saved.resolve())}
    assert body["result"]["artifacts"][0]["sha256"] == hashlib.sha256(b"abc").hexdigest()


def test_run_saves_artifacts_into_out_and_lists_size_and_sha256(cli_stack, tmp_path):
    out_dir = tmp_path / "chosen"

    done = billy_tools(
        cli_stack, "run", "shell", "--arg", f"script={WRITE_ARTIFACTS}", "--out", str(out_dir)
    )

    assert done.returncode == 0, done.stderr
    assert (out_dir / "d" / "a.txt").read_bytes() == b"abc"
    assert hashlib.sha256(b"abc").hexdigest() in done.stdout
    assert "3 B" in done.stdout


def test_events_of_a_finished_run_replay_from_queued_to_finished(cli_stack, tmp_path):
    done = billy_tools(cli_stack, "run", "echo", "--arg", "message=e", "--json", cwd=tmp_path)
    run_id = json.loads(done.stdout)["result"]["run_id"]

    shown = billy_tools(cli_stack, "events", run_id)

    lines = shown.stdout.splitlines()
    assert shown.returncode == 0
    assert "queued" in lines[0]
    assert "finished" in lines[-1]


def test_artifacts_list_and_get_fetch_a_stored_artifact(cli_stack, tmp_path):
    done = billy_tools(
        cli_stack, "run", "shell", "--arg", f"script={WRITE_ARTIFACTS}", "--json", cwd=tmp_path
    )
    run_id = json.loads(done.stdout)["result"]["run_id"]

    listed = billy_tools(cli_stack, "artifacts", "list", run_id, "--json")
    fetched = billy_tools(cli_stack, "artifacts", "get", run_id, "d/a.txt", "--dest", str(tmp_path))

    assert [ref["path"] for ref in json.loads(listed.stdout)] == ["d/a.txt"]
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "a.txt").read_bytes() == b"abc"


def test_images_is_mounted_from_shared_images(cli_stack):
    shown = billy_tools(cli_stack, "images", "--help")

    assert shown.returncode == 0
    assert "build" in shown.stdout


# -- errors: one line, no traceback -----------------------------------------------------


def test_unreachable_nats_prints_one_error_line_and_exits_1(tmp_path):
    settings = stack_settings(tmp_path, "unreachable")

    done = billy_tools(settings, "run", "echo", "--arg", "message=x")

    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: cannot connect to NATS at nats://127.0.0.1:")
    assert len(done.stderr.strip().splitlines()) <= 2  # rich may wrap the one line
    assert "Traceback" not in done.stderr


def test_missing_admission_prints_one_error_line_and_exits_1(tmp_path):
    server = NatsServer(tmp_path)
    server.start()
    try:
        settings = stack_settings(tmp_path, "noadmission")
        settings = settings.model_copy(update={"nats_url": server.url})
        done = billy_tools(settings, "run", "echo", "--arg", "message=x")
    finally:
        server.stop()

    assert done.returncode == 1
    assert "no admission service answers on billy.runs.submit" in done.stderr
    assert "Traceback" not in done.stderr


# -- argument parsing and destinations (unit) -------------------------------------------


def test_arg_values_are_json_when_they_parse_else_strings():
    parsed = parse_arguments(
        ["n=5", "flag=true", "list=[1,2]", "text=hello world", "empty=", "eq=a=b"],
        '{"n": 1, "kept": "yes"}',
    )

    assert parsed == {
        "n": 5,
        "kept": "yes",
        "flag": True,
        "list": [1, 2],
        "text": "hello world",
        "empty": "",
        "eq": "a=b",
    }


@pytest.mark.parametrize("bad", ["novalue", "=5"])
def test_arg_without_a_key_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="not key=value"):
        parse_arguments([bad], None)


def test_artifacts_get_into_a_directory_keeps_only_the_file_name(tmp_path):
    assert artifact_destination("r1", "d/e/report.txt", tmp_path) == tmp_path.resolve() / (
        "report.txt"
    )
    with pytest.raises(UnsafeArtifactPath):
        artifact_destination("r1", "d/..", tmp_path)


# -- one nats-server per state dir ------------------------------------------------------


def test_up_with_another_port_on_a_running_state_dir_refuses_and_starts_no_server(cli_stack):
    paths = stack.StackPaths(cli_stack.state_dir)
    config_before = paths.nats_config.read_text()
    pids_before = pids_of(cli_stack)
    running_port = stack.nats_address(cli_stack)[1]
    other_port = free_port()
    elsewhere = cli_stack.model_copy(update={"nats_url": f"nats://127.0.0.1:{other_port}"})

    refused = billy_tools(elsewhere, "up", timeout_s=30)
    shown = billy_tools(elsewhere, "status", timeout_s=30)

    assert refused.returncode == 1
    error_line = refused.stderr.strip().splitlines()[-1]
    assert f"listens on port {running_port}, not 127.0.0.1:{other_port}" in error_line
    assert f"NATS_URL=nats://127.0.0.1:{running_port}" in error_line
    assert "billy-tools down" in error_line
    assert "Traceback" not in refused.stderr
    assert paths.nats_config.read_text() == config_before
    assert pids_of(cli_stack) == pids_before
    assert stack.nats_pids(paths) == [pids_before[stack.NATS_SERVER]]
    assert shown.returncode == 1
    assert f"listens on port {running_port}" in shown.stdout


# -- down during a run ------------------------------------------------------------------


async def test_down_during_a_run_cancels_it_and_removes_its_container_within_the_grace(
    tmp_path, docker
):
    settings = stack_settings(tmp_path, "drain")
    started = billy_tools(settings, "up")
    pids = pids_of(settings)
    try:
        assert started.returncode == 0, started.stderr
        async with BillyToolsClient.connect(settings) as client:
            reply = await client.submit(
                "shell", {"script": "sleep 30"}, limits=RequestedLimits(timeout_s=45)
            )
            await wait_for(lambda: container_running(docker, settings.executor_name), 60)
            record = await client.get_run(reply.run_id)
        began = time.monotonic()
        stopped = billy_tools(settings, "down")
        down_s = time.monotonic() - began
    finally:
        billy_tools(settings, "down")

    assert record.status == "running"
    assert stopped.returncode == 0, stopped.stderr
    executor_row = next(row for row in stopped.stdout.splitlines() if "executor" in row)
    assert "SIGTERM" in executor_row
    assert "SIGKILL" not in stopped.stdout
    assert down_s < stack.STOP_GRACE_S
    assert [name for name, pid in pids.items() if not process_gone(pid)] == []
    leftovers = await managed_leftovers(docker, settings.executor_name)
    assert leftovers == {"containers": [], "volumes": [], "networks": []}


async def container_running(docker, executor: str) -> bool:
    labels = ["billy.managed=true", f"billy.executor={executor}"]
    containers = await docker.containers.list(filters={"label": labels, "status": ["running"]})
    # The keeper holding the workspace runs too; the tool's container runs `sleep 30`.
    for container in containers:
        details = await container.show()
        if details["Config"]["Cmd"][-1:] == ["sleep 30"]:
            return True
    return False


# -- run ids and unknown runs -----------------------------------------------------------


def test_events_of_an_unknown_run_say_not_found_and_exit_1(cli_stack):
    run_id = uuid.uuid4().hex

    shown = billy_tools(cli_stack, "events", run_id, timeout_s=30)

    assert shown.returncode == 1
    assert f"run {run_id} not found" in shown.stderr


@pytest.mark.parametrize(
    "command", [["events"], ["artifacts", "list"], ["artifacts", "get", "--", "{}", "a.txt"]]
)
@pytest.mark.parametrize("bad", ["a.b", "*", ">", "a b"])
def test_commands_taking_a_run_id_refuse_one_that_is_not_a_subject_token(tmp_path, command, bad):
    settings = stack_settings(tmp_path, "runid")  # nothing listens there: checked first
    args = [arg.format(bad) for arg in command] if "{}" in command else [*command, "--", bad]

    done = billy_tools(settings, *args, timeout_s=30)

    assert done.returncode == 1
    assert f"error: run id {bad!r} is not valid" in done.stderr
    assert "Traceback" not in done.stderr


# -- --out, limits, help ----------------------------------------------------------------


def test_run_with_out_naming_an_existing_file_fails_with_one_line(cli_stack, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")

    done = billy_tools(
        cli_stack, "run", "shell", "--arg", f"script={WRITE_ARTIFACTS}", "--out", str(taken)
    )

    assert done.returncode == 1
    assert done.stderr.strip() == "error: --out is an existing file, not a directory"
    assert taken.read_text() == "mine"


def test_out_check_refuses_a_directory_under_an_existing_file(tmp_path):
    (tmp_path / "file").write_text("x")

    check_out_dir(tmp_path / "new" / "dir")
    with pytest.raises(UsageError, match="existing file"):
        check_out_dir(tmp_path / "file" / "sub")


def test_run_timeout_option_limits_the_run_itself(cli_stack, tmp_path):
    done = billy_tools(
        cli_stack,
        "run",
        "shell",
        "--arg",
        "script=sleep 20",
        "--run-timeout",
        "1",
        "--json",
        cwd=tmp_path,
    )

    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["result"]["status"] == "timed_out"


def test_limit_options_become_requested_limits():
    assert requested_limits(None, None, None) is None
    assert requested_limits(5, "64MiB", 0.5) == RequestedLimits(
        timeout_s=5, memory_bytes=64 * 1024 * 1024, cpus=0.5
    )
    assert requested_limits(None, "1000", None) == RequestedLimits(memory_bytes=1000)
    with pytest.raises(UsageError, match="not a size"):
        requested_limits(None, "lots", None)
    with pytest.raises(UsageError, match="--cpus must be above 0"):
        requested_limits(None, None, 0)


def test_help_shows_flags_without_a_value_and_timeout_as_the_wait(tmp_path):
    settings = stack_settings(tmp_path, "help")

    shown = billy_tools(settings, "run", "--help", timeout_s=30)

    assert shown.returncode == 0
    assert "<bool>" not in shown.stdout
    assert "--run-timeout" in shown.stdout
    assert "--memory" in shown.stdout
    assert "How long this command waits for the result" in " ".join(shown.stdout.split())


def test_artifacts_list_has_no_saved_to_column(cli_stack, tmp_path):
    done = billy_tools(
        cli_stack, "run", "shell", "--arg", f"script={WRITE_ARTIFACTS}", "--json", cwd=tmp_path
    )
    run_id = json.loads(done.stdout)["result"]["run_id"]

    listed = billy_tools(cli_stack, "artifacts", "list", run_id)

    assert listed.returncode == 0, listed.stderr
    assert "d/a.txt" in listed.stdout
    assert "saved to" not in listed.stdout


# -- terminal escapes -------------------------------------------------------------------

HOSTILE_SCRIPT = r"""
printf '\033]0;pwned\007\033[2J[bold red]markup[/] :warning:\rrun x succeeded\n'
printf 'err\033[31m\n' >&2
printf x > "/workspace/out/a$(printf '\033')[2Jb.txt"
"""


def test_run_shows_control_characters_of_tool_output_and_artifacts_escaped(cli_stack, tmp_path):
    done = billy_tools(cli_stack, "run", "shell", "--arg", f"script={HOSTILE_SCRIPT}", cwd=tmp_path)

    shown = done.stdout + done.stderr
    assert done.stdout, done.stderr
    assert "\x1b" not in shown
    assert "\x07" not in shown
    assert "\r" not in shown
    assert r"\x1b]0;pwned\x07\x1b[2J" in done.stdout
    assert r"[bold red]markup[/] :warning:\rrun x succeeded" in done.stdout
    assert r"err\x1b[31m" in done.stdout
    assert r"a\x1b[2Jb.txt" in done.stdout  # stored, refused or rejected: shown escaped


def test_safe_escapes_c0_and_c1_controls_but_keeps_newline_and_tab():
    assert render.safe("a\x1b[2J\r\x07\x9b\x7f\u202eb\n\tc") == (
        "a\\x1b[2J\\r\\x07\\x9b\\x7f\\u202eb\n\tc"
    )


def test_rendered_result_never_interprets_tool_text_as_markup_or_controls():
    console = Console(record=True, width=200, force_terminal=True, color_system=None)
    run = RunResult(
        run_id="r1",
        request_id="q1",
        tenant="default",
        tool="shell",
        status="failed",
        reason="exit_code",
        message="[red]forged[/] \x1b]8;;http://x\x07link",
        stdout="\x1b]0;pwned\x07\x1b[2J:smile:\rrun r1 succeeded",
        stderr="\x9b31m",
        output=None,
        finished_at=0.0,
    )

    render.result(console, run)

    shown = console.export_text()
    assert "\x1b" not in shown
    assert "\x9b" not in shown
    assert "[red]forged[/] \\x1b]8;;http://x\\x07link" in shown
    assert "\\x1b]0;pwned\\x07\\x1b[2J:smile:\\rrun r1 succeeded" in shown
    assert "\\x9b31m" in shown
