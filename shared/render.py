"""How the CLI shows runs, events, tools, artifacts and the stack, with rich."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.stack import Component
from shared.wire import AdmissionReply, ArtifactRef, RunEvent, RunResult, ToolList

STDERR_TAIL_LINES = 20
STATUS_STYLES = {
    "succeeded": "bold green",
    "queued": "cyan",
    "running": "cyan",
    "rejected": "bold yellow",
}
HIDDEN_EVENT_DATA = {"result"}
STATE_STYLES = {"started": "green", "reused": "green", "running": "green", "stopped": "yellow"}


def status_text(status: str) -> str:
    return f"[{STATUS_STYLES.get(status, 'bold red')}]{status}[/]"


def size_text(size_bytes: int) -> str:
    if size_bytes < 1024:
        return f"{size_bytes} B"
    if size_bytes < 1024 * 1024:
        return f"{size_bytes / 1024:.1f} KiB"
    return f"{size_bytes / (1024 * 1024):.1f} MiB"


def event_line(event: RunEvent, with_run_id: bool = False) -> str:
    """One line per run event: time, type, where, and what it says."""
    millis = int(event.at * 1000) % 1000
    clock = time.strftime("%H:%M:%S", time.localtime(event.at)) + f".{millis:03d}"
    parts = [f"[dim]{clock}[/]"]
    if with_run_id:
        parts.append(f"[dim]{event.tenant}/{event.run_id}[/] {escape(event.tool)}")
    parts.append(f"[bold]{event.type:<18}[/]")
    if event.status:
        parts.append(status_text(event.status))
    if event.reason:
        parts.append(f"reason={escape(event.reason)}")
    if event.duration_ms is not None:
        parts.append(f"{event.duration_ms:.0f} ms")
    if event.message:
        parts.append(escape(event.message))
    if event.data:
        parts.append(f"[dim]{escape(_compact(event.data))}[/]")
    if event.source:
        parts.append(f"[dim]({escape(event.source)})[/]")
    return " ".join(parts)


def rejection(console: Console, reply: AdmissionReply) -> None:
    """The reason of a rejected request and each failing argument path."""
    console.print(f"{status_text('rejected')} reason={escape(reply.reason or '?')}")
    if reply.message:
        console.print(f"  {escape(reply.message)}")
    for error in reply.errors:
        where = error.path or "(root)"
        console.print(f"  [yellow]{escape(where)}[/]: {escape(error.message)}")


def result(console: Console, run: RunResult) -> None:
    """Status, exit code, output, stderr tail, timings and trace of a finished run."""
    header = f"run {run.run_id} {status_text(run.status)}"
    if run.exit_code is not None:
        header += f" exit_code={run.exit_code}"
    if run.reason:
        header += f" reason={escape(run.reason)}"
    console.print(header)
    if run.message:
        console.print(f"  {escape(run.message)}")
    _output(console, run)
    _stderr_tail(console, run)
    if run.timings.total_ms is not None:
        console.print(f"[dim]total {run.timings.total_ms:.0f} ms on {run.executor or '?'}[/]")
    if run.trace_id:
        console.print(f"[dim]trace_id {run.trace_id}[/]")


def _output(console: Console, run: RunResult) -> None:
    if run.output is not None:
        console.print("[bold]output[/]")
        console.print_json(json.dumps(run.output))
    elif run.stdout:
        console.print("[bold]stdout[/]")
        console.print(escape(run.stdout.rstrip("\n")), highlight=False)
    if run.stdout_truncated:
        console.print(f"[yellow]stdout truncated; {run.stdout_bytes} bytes produced[/]")


def _stderr_tail(console: Console, run: RunResult) -> None:
    if not run.stderr:
        return
    lines = run.stderr.rstrip("\n").splitlines()
    shown = lines[-STDERR_TAIL_LINES:]
    console.print(f"[bold]stderr[/] [dim](last {len(shown)} of {len(lines)} lines)[/]")
    console.print(escape("\n".join(shown)), style="dim", highlight=False)


def artifacts(
    console: Console,
    refs: list[ArtifactRef],
    saved: dict[str, Path] | None = None,
    refused: dict[str, str] | None = None,
) -> None:
    """A table of artifacts: path, size, sha256 and where each was saved."""
    if not refs:
        console.print("[dim]no artifacts[/]")
        return
    saved, refused = saved or {}, refused or {}
    table = Table(title="artifacts", title_justify="left")
    table.add_column("path", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("sha256", overflow="fold")
    table.add_column("saved to", overflow="fold")
    for ref in refs:
        where = str(saved[ref.path]) if ref.path in saved else ""
        if ref.path in refused:
            where = f"[red]refused: {escape(refused[ref.path])}[/]"
        table.add_row(escape(ref.path), size_text(ref.size_bytes), ref.sha256, where)
    console.print(table)


def rejected_artifacts(console: Console, run: RunResult) -> None:
    for item in run.rejected_artifacts:
        console.print(
            f"[yellow]artifact not stored[/] {escape(item.path)}: "
            f"{escape(item.reason)} {escape(item.message)}"
        )


def tools(console: Console, tool_list: ToolList) -> None:
    table = Table(title=f"{len(tool_list.tools)} tools", title_justify="left")
    for column in ("tool", "version", "arguments", "description"):
        table.add_column(column)
    for tool in sorted(tool_list.tools, key=lambda t: t.name):
        table.add_row(
            tool.name, tool.version, _arguments(tool.arguments_schema), escape(tool.description)
        )
    console.print(table)


def _arguments(schema: dict[str, Any]) -> str:
    """name: type pairs of a JSON Schema's properties; required ones marked with *."""
    required = set(schema.get("required", []))
    parts = []
    for name, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type", "any") if isinstance(prop, dict) else "any"
        parts.append(f"{name}{'*' if name in required else ''}: {kind}")
    return escape(", ".join(parts))


def components(console: Console, found: list[Component], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("component", "state", "pid", "detail"):
        table.add_column(column)
    for component in found:
        style = STATE_STYLES.get(component.state, "yellow")
        pid = str(component.pid) if component.pid else ""
        table.add_row(
            component.name, f"[{style}]{component.state}[/]", pid, escape(component.detail)
        )
    console.print(table)


def _compact(data: dict[str, Any]) -> str:
    """The event's data as key=value, long values cut; the result repeats what follows."""
    parts = []
    for key, value in data.items():
        if key in HIDDEN_EVENT_DATA:
            continue
        text = json.dumps(value, separators=(",", ":"))
        parts.append(f"{key}={text if len(text) <= 40 else text[:37] + '...'}")
    return " ".join(parts)
