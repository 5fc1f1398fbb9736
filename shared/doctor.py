"""`billy-tools doctor`: checks the container baseline of each tool on the real daemon.

For each tool it builds the run context and the create body exactly as DockerRunner does
(services/executor/policy.py), creates a canary container from the tool's verified image
with `cat /proc/self/status /proc/self/limits /proc/self/mounts` as its command, starts it
(the process exits at once) to see the kernel's view, inspects it through the Docker API,
and removes it and its volume. Every item of shared/baseline_checks.py gives PASS or FAIL;
a failure the operator policy approves for the tool is RELAXED. Daemon settings that the
CIS benchmark asks about are ADVICE and never fail.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from rich.console import Console
from rich.markup import escape

from services.admission.limits import effective_limits
from services.executor.command import Argv
from services.executor.errors import ExecutorError, InfraError, docker_errors
from services.executor.image import ensure_image
from services.executor.model import RunContext
from services.executor.policy import container_config
from services.executor.runner import object_name, remove_container
from services.executor.runtimes import DaemonRuntimes
from services.executor.workspace import create_volume, remove_volume
from shared.baseline_checks import BASELINE, BaselineItem, Canary, Probe, Verdict, parse_probe
from shared.operator_policy import OperatorPolicy, policy_of
from shared.settings import Settings
from shared.toolspec import ToolCatalog, ToolSpec

logger = logging.getLogger(__name__)

PROBE_ARGV = Argv(
    entrypoint=["cat"], command=["/proc/self/status", "/proc/self/limits", "/proc/self/mounts"]
)
PROBE_TIMEOUT_S = 30.0
PROBE_OUTPUT_BYTES = 256 * 1024
DOCTOR_TENANT = "doctor"
# What a process sees under gVisor is the Sentry's emulation, not the host kernel's.
RUNSC_PROBE_NOTE = (
    "runsc: gVisor presents its own /proc (no /proc/self/limits, / as 9p), so only the "
    "Engine's view is checked"
)

Status = Literal["PASS", "FAIL", "RELAXED"]


@dataclass
class Finding:
    """The result of one baseline item for one tool."""

    id: str
    title: str
    status: Status
    detail: str


@dataclass
class ToolReport:
    """Every finding of one tool's canary, or why no canary could be made."""

    tool: str
    runtime: str
    findings: list[Finding] = field(default_factory=list)
    probe_note: str | None = None  # why the kernel's view is missing, when it is
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or any(f.status == "FAIL" for f in self.findings)


@dataclass
class Advice:
    """A daemon-level finding; reported, never failing."""

    id: str
    title: str
    ok: bool
    detail: str


@dataclass
class DoctorReport:
    tools: list[ToolReport]
    advice: list[Advice]

    @property
    def failed(self) -> bool:
        return any(tool.failed for tool in self.tools)

    def to_builtins(self) -> dict[str, Any]:
        return {"failed": self.failed, **asdict(self)}


class _SilentReporter:
    """ensure_image reports its steps as run events; the doctor has no run to report to."""

    async def event(self, type, **_: Any) -> None:
        return None


async def run_doctor(
    settings: Settings,
    tools: list[str] | None = None,
    *,
    executor: str | None = None,
    policy: OperatorPolicy | None = None,
) -> DoctorReport:
    """Check every named tool (default: the whole catalog) and the daemon."""
    catalog = ToolCatalog.load(settings.tools_dir)
    specs = [catalog.get(name) for name in tools] if tools else list(catalog)
    policy = policy or policy_of(settings)
    executor = executor or f"doctor-{socket.gethostname()}"
    async with aiodocker.Docker(url=settings.docker_host) as docker:
        with docker_errors("read the daemon's info"):
            info = await docker.system.info()
        reports, probes = [], []
        for spec in specs:
            report, probe = await examine_tool(
                docker, spec, policy, info, settings.registry, executor
            )
            reports.append(report)
            probes.append(probe)
        # Inherited limits are the daemon's: any tool's canary shows them.
        seen = next((probe for probe in probes if probe is not None), None)
        advice = await daemon_advice(docker, info, seen)
    return DoctorReport(reports, advice)


async def examine_tool(
    docker: aiodocker.Docker,
    spec: ToolSpec,
    policy: OperatorPolicy,
    info: dict[str, Any],
    registry: str | None,
    executor: str,
) -> tuple[ToolReport, Probe | None]:
    """Create the tool's canary, run every baseline item on it, remove it."""
    report = ToolReport(spec.name, spec.runtime)
    context = canary_context(spec, executor)
    try:
        await DaemonRuntimes(docker).require(spec.runtime)
        image_id = await ensure_image(docker, spec.image, registry, _SilentReporter())
        canary, report.probe_note = await make_canary(docker, context, image_id, info)
    except ExecutorError as exc:
        report.error = str(exc)
        logger.warning("doctor_tool_error tool=%s error=%s", spec.name, exc)
        return report, None

    relaxed = policy.approved_relaxations(spec)
    report.findings = [evaluate(item, canary, relaxed) for item in BASELINE]
    failed = [f.id for f in report.findings if f.status == "FAIL"]
    logger.info("doctor_tool_checked tool=%s failed=%s", spec.name, ",".join(failed) or "none")
    return report, canary.probe


def canary_context(spec: ToolSpec, executor: str) -> RunContext:
    """The run context of a run with no requested limits, as admission would queue it."""
    return RunContext(
        run_id=f"doctor-{secrets.token_hex(6)}",
        tenant=DOCTOR_TENANT,
        tool=spec.name,
        executor=executor,
        spec=spec,
        arguments={},
        inputs=[],
        limits=effective_limits(spec, None),
    )


async def make_canary(
    docker: aiodocker.Docker, context: RunContext, image_id: str, info: dict[str, Any]
) -> tuple[Canary, str | None]:
    """Create, probe and inspect the canary; it and its volume are gone on return."""
    name = object_name(context.run_id)
    try:
        await create_volume(docker, name, context)
        config = container_config(context, image_id, PROBE_ARGV, name)
        with docker_errors("create the canary container"):
            container = await docker.containers.create(config, name=name)
        if context.spec.runtime == "runc":
            probe, note = await run_probe(container)
        else:
            probe, note = None, RUNSC_PROBE_NOTE
        with docker_errors("inspect the canary container"):
            inspected = await container.show()
    finally:
        await asyncio.shield(_remove(docker, name))
    return Canary(context, image_id, name, inspected, info, probe), note


async def run_probe(container: DockerContainer) -> tuple[Probe | None, str | None]:
    """Start the canary and read what its `cat` prints; None and why when it cannot run."""
    stream = container.attach(stdout=True, stderr=True, logs=False)
    output = bytearray()
    try:
        await stream.__aenter__()
        await container.start()
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            while (message := await stream.read_out()) is not None:
                if len(output) < PROBE_OUTPUT_BYTES:
                    output += message.data
            exit_code = (await container.wait()).get("StatusCode")
    except (aiodocker.DockerError, aiohttp.ClientError, TimeoutError) as exc:
        # An image without `cat` cannot show the kernel's view; the Engine's view stays.
        return None, f"the canary's process did not run: {exc}"
    finally:
        await stream.close()
    if exit_code != 0:
        return None, f"cat exited with {exit_code}: {output[:200].decode(errors='replace')}"
    return parse_probe(output.decode(errors="replace")), None


def evaluate(item: BaselineItem, canary: Canary, relaxed: dict[str, Any]) -> Finding:
    """One item's finding; a failure the operator approved for this tool is RELAXED."""
    result: Verdict = item.check(canary)
    if result.passed:
        return Finding(item.id, item.title, "PASS", result.detail)
    exception = relaxed.get(item.relaxation) if item.relaxation else None
    if exception is not None:
        detail = f"{result.detail}; approved by {exception.approved_by}: {exception.reason}"
        return Finding(item.id, item.title, "RELAXED", detail)
    return Finding(item.id, item.title, "FAIL", result.detail)


async def daemon_advice(
    docker: aiodocker.Docker, info: dict[str, Any], probe: Probe | None
) -> list[Advice]:
    """Daemon settings the CIS benchmark (sections 2 and 5.1) asks about."""
    options = " ".join(info.get("SecurityOptions") or [])
    runtimes = sorted(info.get("Runtimes") or {})
    advice = [
        Advice("2.1", "daemon runs rootless", "name=rootless" in options, "SecurityOptions"),
        await _icc_advice(docker),
        _nproc_advice(probe),
        Advice(
            "2.9",
            "user namespace remapping (userns-remap)",
            "name=userns" in options,
            "enabled"
            if "name=userns" in options
            else "off: uid 65534 in a tool is 65534 on the host",
        ),
        Advice(
            "2.15",
            "live-restore",
            bool(info.get("LiveRestoreEnabled")),
            "on"
            if info.get("LiveRestoreEnabled")
            else "off: restarting dockerd kills "
            "running tools (their runs end in infra_error and are retried)",
        ),
        Advice("2.18", "no experimental features", not info.get("ExperimentalBuild"), "-"),
        Advice(
            "5.1",
            "swarm mode off",
            (info.get("Swarm") or {}).get("LocalNodeState") in ("inactive", None),
            str((info.get("Swarm") or {}).get("LocalNodeState")),
        ),
        Advice(
            "B.runtimes",
            "gVisor (runsc) available",
            "runsc" in runtimes,
            f"runtimes: {', '.join(runtimes)}",
        ),
        Advice(
            "B.swap",
            "swap limit enforced",
            info.get("SwapLimit") is not False,
            "MemorySwap is enforced"
            if info.get("SwapLimit") is not False
            else "the kernel "
            "has no swap accounting: MemorySwap is ignored; keep swap off on the host",
        ),
    ]
    return advice


async def _icc_advice(docker: aiodocker.Docker) -> Advice:
    try:
        bridge = await (await docker.networks.get("bridge")).show()
    except aiodocker.DockerError as exc:
        return Advice("2.2", "no traffic between containers on docker0 (icc)", True, str(exc))
    icc = (bridge.get("Options") or {}).get("com.docker.network.bridge.enable_icc", "true")
    detail = "icc off" if icc == "false" else "icc on; tool containers have network none"
    return Advice("2.2", "no traffic between containers on docker0 (icc)", icc == "false", detail)


def _nproc_advice(probe: Probe | None) -> Advice:
    title = "default ulimits (nproc) configured"
    if probe is None:
        return Advice("2.8", title, True, "not seen: no canary probe ran")
    soft, hard = probe.limits.get("Max processes", ("?", "?"))
    unlimited = "unlimited" in (soft, hard)
    detail = f"tools inherit nproc {soft}/{hard} from the daemon; PidsLimit bounds each run"
    return Advice("2.8", title, not unlimited, detail)


async def _remove(docker: aiodocker.Docker, name: str) -> None:
    try:
        await remove_container(docker, name)
        await remove_volume(docker, name)
    except InfraError as exc:
        logger.error("doctor_cleanup_failed name=%s error=%s", name, exc)


STATUS_STYLE = {"PASS": "green", "FAIL": "bold red", "RELAXED": "yellow"}


def render(console: Console, report: DoctorReport) -> None:
    """Print PASS/FAIL per item and tool, then the daemon advice."""
    for tool in report.tools:
        console.print(f"[bold]{escape(tool.tool)}[/] (runtime {tool.runtime})")
        if tool.error is not None:
            console.print(f"  [bold red]FAIL[/] no canary: {escape(tool.error)}")
            continue
        for finding in tool.findings:
            style = STATUS_STYLE[finding.status]
            console.print(
                f"  [{style}]{finding.status:<7}[/] {finding.id:<5} {finding.title}: "
                f"[dim]{escape(finding.detail)}[/]"
            )
        if tool.probe_note:
            console.print(f"  [yellow]note[/] kernel view not checked: {escape(tool.probe_note)}")
    console.print("[bold]daemon[/]")
    for advice in report.advice:
        label = "[green]OK    [/]" if advice.ok else "[yellow]ADVICE[/]"
        console.print(f"  {label}  {advice.id:<10} {advice.title}: [dim]{escape(advice.detail)}[/]")
    verdict = "[bold red]FAIL[/]" if report.failed else "[green]PASS[/]"
    console.print(f"baseline: {verdict} ({len(report.tools)} tool(s))")
