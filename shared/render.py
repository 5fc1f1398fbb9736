"""How the CLI shows runs, events, tools, artifacts and the stack, with rich.

Everything a tool, a ToolSpec or another NATS client controls reaches the terminal through
`text()`: as rich Text (never parsed as markup or emoji codes), with control characters
shown as escapes, so that no output can move the cursor, retitle the window or forge a line.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.table import Table
from rich.text import Text

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
# C0 but newline and tab, DEL, C1; and the bidi overrides that reorder what a line shows.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def safe(value: object) -> str:
    """str(value) with each control character but newline and tab written as an escape
    (ESC as \\x1b, CR as \\r), so that the terminal shows it instead of obeying it."""
    return CONTROL_CHARS.sub(lambda match: _escape_char(match.group()), str(value))


def _escape_char(char: str) -> str:
    escaped = repr(char)[1:-1]
    return escaped if escaped.startswith("\\") else f"\\u{ord(char):04x}"


def text(value: object, style: str = "") -> Text:
    """Untrusted text for the terminal: escaped controls, no markup, no emoji codes."""
    return Text(safe(value), style=style)


def line(*parts: Text | str | tuple[object, str]) -> Text:
    """Parts joined by spaces; a plain str is ours (no markup), a (value, style) is styled."""
    joined = Text()
    for index, part in enumerate(parts):
        if index:
            joined.append(" ")
        if isinstance(part, tuple):
            joined.append(text(*part))
        elif isinstance(part, Text):
            joined.append(part)
        else:
            joined.append(text(part))
    return joined


def error(console: Console, message: object) -> None:
    """One `error: ...` line."""
    console.print(line(("error:", "red"), message))


def status_text(status: str) -> Text:
    return text(status, STATUS_STYLES.get(status, "bold red"))


def size_text(size_bytes: int) -> str:
    if size_bytes < 1024:
        return f"{size_bytes} B"
    if size_bytes < 1024 * 1024:
        return f"{size_bytes / 1024:.1f} KiB"
    return f"{size_bytes / (1024 * 1024):.1f} MiB"


def event_line(event: RunEvent, with_run_id: bool = False) -> Text:
    """One line per run event: time, type, where, and what it says."""
    millis = int(event.at * 1000) % 1000
    clock = time.strftime("%H:%M:%S", time.localtime(event.at)) + f".{millis:03d}"
    parts: list[Text | str | tuple[object, str]] = [(clock, "dim")]
    if with_run_id:
        parts += [(f"{event.tenant}/{event.run_id}", "dim"), event.tool]
    parts.append((f"{event.type:<18}", "bold"))
    if event.status:
        parts.append(status_text(event.status))
    if event.reason:
        parts.append(f"reason={event.reason}")
    if event.duration_ms is not None:
        parts.append(f"{event.duration_ms:.0f} ms")
    if event.message:
        parts.append(event.message)
    if event.data:
        parts.append((_compact(event.data), "dim"))
    if event.source:
        parts.append((f"({event.source})", "dim"))
    return line(*parts)


def queued(console: Console, run_id: str, trace_id: str | None) -> None:
    console.print(line("run", (run_id, "bold"), "queued", (f"trace_id {trace_id}", "dim")))


def rejection(console: Console, reply: AdmissionReply) -> None:
    """The reason of a rejected request and each failing argument path."""
    console.print(line(status_text("rejected"), f"reason={reply.reason or '?'}"))
    if reply.message:
        console.print(line(" ", reply.message))
    for error_ in reply.errors:
        where = error_.path or "(root)"
        console.print(line(" ", (f"{where}:", "yellow"), error_.message))


def result(console: Console, run: RunResult) -> None:
    """Status, exit code, output, stderr tail, timings and trace of a finished run."""
    header: list[Text | str | tuple[object, str]] = ["run", run.run_id, status_text(run.status)]
    if run.exit_code is not None:
        header.append(f"exit_code={run.exit_code}")
    if run.reason:
        header.append(f"reason={run.reason}")
    console.print(line(*header))
    if run.message:
        console.print(line(" ", run.message))
    _output(console, run)
    _stderr_tail(console, run)
    if run.timings.total_ms is not None:
        console.print(text(f"total {run.timings.total_ms:.0f} ms on {run.executor or '?'}", "dim"))
    if run.trace_id:
        console.print(text(f"trace_id {run.trace_id}", "dim"))


def _output(console: Console, run: RunResult) -> None:
    if run.output is not None:
        console.print(text("output", "bold"))
        dumped = json.dumps(run.output, indent=2, ensure_ascii=False)
        console.print(JSONHighlighter()(text(dumped)))
    elif run.stdout:
        console.print(text("stdout", "bold"))
        console.print(text(run.stdout.rstrip("\n")))
    if run.stdout_truncated:
        console.print(text(f"stdout truncated; {run.stdout_bytes} bytes produced", "yellow"))


def _stderr_tail(console: Console, run: RunResult) -> None:
    if not run.stderr:
        return
    lines = run.stderr.rstrip("\n").splitlines()
    shown = lines[-STDERR_TAIL_LINES:]
    console.print(line(("stderr", "bold"), (f"(last {len(shown)} of {len(lines)} lines)", "dim")))
    console.print(text("\n".join(shown), "dim"))


def artifacts(
    console: Console,
    refs: list[ArtifactRef],
    saved: dict[str, Path] | None = None,
    refused: dict[str, str] | None = None,
) -> None:
    """A table of artifacts: path, size, sha256, and where each was saved when given."""
    if not refs:
        console.print(text("no artifacts", "dim"))
        return
    with_destination = saved is not None or refused is not None
    saved, refused = saved or {}, refused or {}
    table = Table(title="artifacts", title_justify="left")
    table.add_column("path", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("sha256", overflow="fold")
    if with_destination:
        table.add_column("saved to", overflow="fold")
    for ref in refs:
        row = [text(ref.path), text(size_text(ref.size_bytes)), text(ref.sha256)]
        if with_destination:
            where = text(saved.get(ref.path, ""))
            if ref.path in refused:
                where = text(f"refused: {refused[ref.path]}", "red")
            row.append(where)
        table.add_row(*row)
    console.print(table)


def rejected_artifacts(console: Console, run: RunResult) -> None:
    for item in run.rejected_artifacts:
        console.print(
            line(("artifact not stored", "yellow"), f"{item.path}:", item.reason, item.message)
        )


def artifact_saved(console: Console, path: str, target: Path, ref: ArtifactRef) -> None:
    size = size_text(ref.size_bytes)
    console.print(line("saved", path, "->", str(target), f"({size}, sha256 {ref.sha256})"))


def tools(console: Console, tool_list: ToolList) -> None:
    table = Table(title=f"{len(tool_list.tools)} tools", title_justify="left")
    for column in ("tool", "version", "arguments", "description"):
        table.add_column(column)
    for tool in sorted(tool_list.tools, key=lambda t: t.name):
        table.add_row(
            text(tool.name),
            text(tool.version),
            text(_arguments(tool.arguments_schema)),
            text(tool.description),
        )
    console.print(table)


def _arguments(schema: dict[str, Any]) -> str:
    """name: type pairs of a JSON Schema's properties; required ones marked with *."""
    required = set(schema.get("required", []))
    parts = []
    for name, prop in (schema.get("properties") or {}).items():
        kind = prop.get("type", "any") if isinstance(prop, dict) else "any"
        parts.append(f"{name}{'*' if name in required else ''}: {kind}")
    return ", ".join(parts)


def components(console: Console, found: list[Component], title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("component", "state", "pid", "detail"):
        table.add_column(column)
    for component in found:
        style = STATE_STYLES.get(component.state, "yellow")
        pid = str(component.pid) if component.pid else ""
        table.add_row(
            text(component.name),
            text(component.state, style),
            text(pid),
            text(component.detail),
        )
    console.print(table)


def _compact(data: dict[str, Any]) -> str:
    """The event's data as key=value, long values cut; the result repeats what follows."""
    parts = []
    for key, value in data.items():
        if key in HIDDEN_EVENT_DATA:
            continue
        encoded = json.dumps(value, separators=(",", ":"))
        parts.append(f"{key}={encoded if len(encoded) <= 40 else encoded[:37] + '...'}")
    return " ".join(parts)
