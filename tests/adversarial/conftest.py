"""Helpers of the adversarial suite: run hostile code through the whole path, then check
that the host is unaffected and that nothing leaked past the caps.

Every case runs for real: client.submit -> admission -> executor -> Docker -> artifacts.
"""

from __future__ import annotations

import logging
import os
import secrets
from functools import cache
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from shared.client import BillyToolsClient
from shared.settings import REPO_ROOT
from shared.toolspec import Limits, ToolCatalog
from shared.wire import RunEvent, RunResult, encode
from tests.conftest import TEST_TOOLS_DIR, collect_events, wait_for

TOOL = "python-exec"
RESULT_TIMEOUT_S = 120
# Processes are SIGKILLed when their container is removed; the kernel may take a moment.
HOST_SETTLE_TIMEOUT_S = 10
# Events other than `finished` carry small facts, never output.
EVENT_MAX_BYTES = 16 * 1024
# `finished` carries the result: stdout and stderr (JSON may escape a byte into 6) + facts.
FINISHED_SLACK_BYTES = 64 * 1024
LOG_MESSAGE_MAX_BYTES = 8 * 1024
# A run's events: its fixed steps, two limit_hits per stream at most, two per artifact.
EVENTS_FIXED_MAX = 40
TRUNCATION_NOTE_MAX_CHARS = 100


def new_marker() -> str:
    """A random token to put in a tool's code, so its processes can be found on the host."""
    return f"billy-adv-{secrets.token_hex(8)}"


async def run_hostile(
    client: BillyToolsClient,
    code: str,
    language: str = "python",
    *,
    tool: str = TOOL,
    result_timeout_s: float = RESULT_TIMEOUT_S,
    **submit_kwargs: Any,
) -> tuple[RunResult, list[RunEvent]]:
    """Submit `code` to the python-exec tool, wait for the result; (result, events)."""
    reply = await client.submit(tool, {"language": language, "code": code}, **submit_kwargs)
    result = await client.result(reply.run_id, timeout_s=result_timeout_s)
    events = await collect_events(client, reply.run_id)
    return result, events


async def assert_host_unaffected(
    client: BillyToolsClient, docker: aiodocker.Docker, result: RunResult, marker: str
) -> None:
    """No Docker object, process or shim of the run is left, and the executor still serves."""
    events = await collect_events(client, result.run_id)
    await _assert_no_docker_objects(docker, result.run_id)
    await wait_for(lambda: not host_processes_with(marker), HOST_SETTLE_TIMEOUT_S)
    for container_id in container_ids(events):
        await wait_for(lambda cid=container_id: not host_processes_with(cid), HOST_SETTLE_TIMEOUT_S)
    await _assert_executor_serves(client)


async def _assert_no_docker_objects(docker: aiodocker.Docker, run_id: str) -> None:
    label = [f"billy.run_id={run_id}"]
    containers = await docker.containers.list(all=True, filters={"label": label})
    volumes = (await docker.volumes.list(filters={"label": label})).get("Volumes") or []
    networks = await docker.networks.list(filters={"label": label})
    leftovers = {
        "containers": [c.id[:12] for c in containers],
        "volumes": [v["Name"] for v in volumes],
        "networks": [n["Name"] for n in networks],
    }
    assert leftovers == {"containers": [], "volumes": [], "networks": []}, leftovers


async def _assert_executor_serves(client: BillyToolsClient) -> None:
    token = new_marker()
    result, _ = await run_hostile(client, f"echo {token}-served", language="sh")
    assert result.status == "succeeded", (result.reason, result.message, result.stderr)
    assert f"{token}-served" in result.stdout


def container_ids(events: list[RunEvent]) -> list[str]:
    """Ids of the run's containers (the tool's and, if any, its workspace keeper)."""
    ids = []
    for event in events:
        if event.type == "container_created":
            ids += [event.data.get("container_id"), event.data.get("keeper_id")]
    return [cid for cid in ids if cid]


def host_processes_with(token: str) -> list[int]:
    """Pids of host processes whose command line holds `token` (this process excluded)."""
    needle = token.encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found


def assert_nothing_leaks(
    result: RunResult,
    events: list[RunEvent],
    logs: list[logging.LogRecord] | None = None,
) -> None:
    """stdout/stderr, events, log lines and artifacts of the run all stay within the caps."""
    limits = tool_limits(result.tool)
    _assert_stream_within(
        result.stdout, result.stdout_bytes, result.stdout_truncated, limits.stdout_bytes
    )
    _assert_stream_within(
        result.stderr, result.stderr_bytes, result.stderr_truncated, limits.stderr_bytes
    )
    _assert_events_bounded(events, limits)
    _assert_artifacts_within(result, limits)
    for record in logs or []:
        size = len(record.getMessage().encode("utf-8", "replace"))
        assert size <= LOG_MESSAGE_MAX_BYTES, (record.name, size)


def _assert_stream_within(text: str, seen_bytes: int, truncated: bool, cap_bytes: int) -> None:
    # Decoding never makes more characters than bytes; the note on truncation is short.
    assert truncated == (seen_bytes > cap_bytes), (seen_bytes, cap_bytes, truncated)
    assert len(text) <= cap_bytes + (TRUNCATION_NOTE_MAX_CHARS if truncated else 0), len(text)


def _assert_events_bounded(events: list[RunEvent], limits: Limits) -> None:
    assert events, "no events"
    assert [e.type for e in events].count("finished") == 1
    assert events[-1].type == "finished"
    assert len(events) <= EVENTS_FIXED_MAX + 2 * limits.artifact_count, len(events)
    finished_max = 6 * (limits.stdout_bytes + limits.stderr_bytes) + FINISHED_SLACK_BYTES
    for event in events:
        size = len(encode(event))
        bound = finished_max if event.type == "finished" else EVENT_MAX_BYTES
        assert size <= bound, (event.type, size, bound)
    limit_hits = [e.reason for e in events if e.type == "limit_hit"]
    assert len(limit_hits) == len(set(limit_hits)), limit_hits


def _assert_artifacts_within(result: RunResult, limits: Limits) -> None:
    sizes = [ref.size_bytes for ref in result.artifacts]
    assert len(sizes) <= limits.artifact_count, len(sizes)
    assert all(size <= limits.artifact_bytes for size in sizes), sizes
    assert sum(sizes) <= limits.artifacts_total_bytes, sum(sizes)


@cache
def _catalog() -> ToolCatalog:
    return ToolCatalog.load(REPO_ROOT / "tool-images", TEST_TOOLS_DIR)


def tool_limits(tool: str) -> Limits:
    """The ToolSpec limits of `tool` (no request lowers the caps checked here)."""
    return _catalog().get(tool).limits


@pytest.fixture
def marker() -> str:
    return new_marker()


@pytest.fixture
def service_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog at DEBUG: pass `service_logs.records` to assert_nothing_leaks."""
    caplog.set_level(logging.DEBUG)
    return caplog
