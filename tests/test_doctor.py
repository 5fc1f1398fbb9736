"""`billy-tools doctor` on the real Docker daemon: every reference tool passes the baseline,
and a weakened default fails, naming its item."""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.executor import policy
from shared import doctor
from shared.baseline_checks import BASELINE, parse_probe
from shared.cli import app
from shared.operator_policy import OperatorPolicy
from shared.settings import REPO_ROOT, Settings
from shared.toolspec import LOCK_FILE, ToolCatalog
from tests.conftest import managed_leftovers, session_executor_name

TOOLS_DIR = REPO_ROOT / "tool-images"
DOC = REPO_ROOT / "docs" / "security-baseline.md"
original_host_config = policy.host_config


@pytest.fixture
def executor() -> str:
    return session_executor_name("doctor")


@pytest.fixture
async def no_leftovers(docker, executor):
    """After the test: nothing the doctor created under this executor name remains."""
    yield
    assert await managed_leftovers(docker, executor) == {
        "containers": [],
        "volumes": [],
        "networks": [],
    }


def weaken(monkeypatch, change) -> None:
    """Make the runner's HostConfig weaker, as a careless edit of policy.py would."""

    def weakened(context, volume):
        host = original_host_config(context, volume)
        change(host)
        return host

    monkeypatch.setattr(policy, "host_config", weakened)


def findings_of(report, tool: str) -> dict[str, doctor.Finding]:
    [tool_report] = [t for t in report.tools if t.tool == tool]
    assert tool_report.error is None, tool_report.error
    return {finding.id: finding for finding in tool_report.findings}


async def test_every_reference_tool_passes_every_baseline_item(executor, no_leftovers):
    names = ToolCatalog.load(TOOLS_DIR).names()
    report = await doctor.run_doctor(Settings(tools_dir=TOOLS_DIR), executor=executor)

    assert [tool.tool for tool in report.tools] == names
    for tool in report.tools:
        assert tool.error is None, tool.error
        assert tool.probe_note is None, tool.probe_note  # the kernel's view was checked
        statuses = {finding.id: finding.status for finding in tool.findings}
        assert statuses == {item.id: "PASS" for item in BASELINE}, tool.tool
    assert not report.failed
    # Daemon settings are advice: some are off on this host, and nothing fails for them.
    assert {advice.id for advice in report.advice} >= {"2.9", "2.15", "B.runtimes"}


@pytest.mark.parametrize(
    ("change", "item", "detail"),
    [
        (lambda host: host.pop("CapDrop"), "5.4", "CapBnd of the process is 00000000a80425fb"),
        (lambda host: host.update(Privileged=True), "5.5", "Privileged is true"),
        (lambda host: host.update(ReadonlyRootfs=False), "5.13", "/ is mounted"),
        (lambda host: host.update(SecurityOpt=[]), "5.26", "NoNewPrivs of the process is 0"),
        (lambda host: host.update(Ulimits=[]), "5.19", "ulimit nofile is None"),
        (lambda host: host.update(PidsLimit=0), "5.29", "PidsLimit is 0"),
        (
            lambda host: host.update(Tmpfs={"/tmp": "rw,exec,size=1048576"}),
            "B.1",
            "/tmp is tmpfs",
        ),
    ],
    ids=["cap-drop", "privileged", "writable-root", "new-privileges", "ulimits", "pids", "tmp"],
)
async def test_weakened_default_fails_naming_its_item(
    monkeypatch, executor, no_leftovers, change, item, detail
):
    weaken(monkeypatch, change)
    report = await doctor.run_doctor(
        Settings(tools_dir=TOOLS_DIR), ["doc-stats"], executor=executor
    )

    findings = findings_of(report, "doc-stats")
    assert findings[item].status == "FAIL"
    assert detail in findings[item].detail
    assert report.failed


async def test_seccomp_unconfined_fails_the_seccomp_item(monkeypatch, executor, no_leftovers):
    weaken(monkeypatch, lambda host: host["SecurityOpt"].append("seccomp=unconfined"))
    report = await doctor.run_doctor(
        Settings(tools_dir=TOOLS_DIR), ["doc-stats"], executor=executor
    )
    finding = findings_of(report, "doc-stats")["5.22"]
    assert finding.status == "FAIL"
    assert "Seccomp of the process is 0" in finding.detail


@pytest.fixture
def writable_root_tools_dir(tmp_path: Path) -> Path:
    """doc-stats with filesystem.read_only_root: false, same image."""
    shutil.copytree(TOOLS_DIR / "doc-stats", tmp_path / "doc-stats")
    shutil.copy(TOOLS_DIR / LOCK_FILE, tmp_path / LOCK_FILE)
    spec = tmp_path / "doc-stats" / "tool.yaml"
    text = spec.read_text()
    assert "read_only_root: true" in text
    spec.write_text(text.replace("read_only_root: true", "read_only_root: false"))
    return tmp_path


async def test_approved_writable_root_is_relaxed_with_who_approved_it(
    writable_root_tools_dir, executor, no_leftovers
):
    approved = OperatorPolicy.model_validate(
        {
            "exceptions": [
                {
                    "tool": "doc-stats",
                    "allow_writable_root": True,
                    "approved_by": "ops@example.com",
                    "reason": "test of an approved relaxation",
                }
            ]
        }
    )
    settings = Settings(tools_dir=writable_root_tools_dir)

    relaxed = await doctor.run_doctor(settings, policy=approved, executor=executor)
    finding = findings_of(relaxed, "doc-stats")["5.13"]
    assert finding.status == "RELAXED"
    assert "approved by ops@example.com" in finding.detail
    assert not relaxed.failed

    unapproved = await doctor.run_doctor(settings, policy=OperatorPolicy(), executor=executor)
    assert findings_of(unapproved, "doc-stats")["5.13"].status == "FAIL"
    assert unapproved.failed


def test_cli_doctor_exits_0_with_json_for_the_reference_tools(monkeypatch):
    monkeypatch.setenv("BILLY_TOOLS_DIR", str(TOOLS_DIR))
    result = CliRunner().invoke(app, ["doctor", "--json"])

    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body["failed"] is False
    assert sorted(tool["tool"] for tool in body["tools"]) == ToolCatalog.load(TOOLS_DIR).names()


def test_cli_doctor_exits_1_and_names_the_failed_item(monkeypatch):
    monkeypatch.setenv("BILLY_TOOLS_DIR", str(TOOLS_DIR))
    weaken(monkeypatch, lambda host: host.update(Privileged=True))
    result = CliRunner().invoke(app, ["doctor", "doc-stats"])

    assert result.exit_code == 1, result.output
    assert re.search(r"FAIL\s+5\.5\s+not privileged", result.output), result.output
    assert "baseline: FAIL" in result.output


async def test_cli_doctor_leaves_no_canary_behind(docker):
    # Runs after the CLI tests above, whose canaries carry billy.executor=doctor-<hostname>.
    leftovers = await managed_leftovers(docker, f"doctor-{socket.gethostname()}")
    assert leftovers == {"containers": [], "volumes": [], "networks": []}


def test_every_doctor_item_is_documented_in_the_security_baseline():
    text = DOC.read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("|")}
    for item in BASELINE:
        assert item.id in rows, f"item {item.id} is missing from {DOC.name}"
        assert item.title in rows[item.id], f"item {item.id}: title differs from the doctor's"


def test_probe_parses_status_limits_and_mounts():
    probe = parse_probe(
        "Name:\tcat\nNoNewPrivs:\t1\nCapEff:\t0000000000000000\n"
        "Limit                     Soft Limit           Hard Limit           Units     \n"
        "Max open files            1024                 1024                 files     \n"
        "Max file size             33554432             33554432             bytes     \n"
        "overlay / overlay ro,relatime,lowerdir=/a:/b 0 0\n"
        "tmpfs /tmp tmpfs rw,nosuid,nodev,noexec,relatime,size=16384k 0 0\n"
    )
    assert probe.status["NoNewPrivs"] == "1"
    assert probe.limits["Max open files"] == ("1024", "1024")
    assert probe.limits["Max file size"] == ("33554432", "33554432")
    assert probe.mounts["/"][0] == "overlay"
    assert "ro" in probe.mounts["/"][1]
    assert {"noexec", "nosuid", "nodev"} <= probe.mounts["/tmp"][1]
