"""The tool's argv, built from the ToolSpec's entrypoint/command and the run's arguments.

An element that is exactly `{name}` stands for argument `name`; every other element is
taken literally. No shell ever sees the result, and no element is interpolated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.executor.errors import CommandError
from shared.toolspec import PLACEHOLDER, ToolSpec


@dataclass(frozen=True)
class Argv:
    """Entrypoint (None keeps the image's) and command of the container."""

    entrypoint: list[str] | None
    command: list[str]


def build_argv(spec: ToolSpec, arguments: dict[str, Any]) -> Argv:
    """The container's entrypoint and command for these arguments."""
    entrypoint = None if spec.entrypoint is None else expand(spec.entrypoint, arguments)
    return Argv(entrypoint=entrypoint, command=expand(spec.command, arguments))


def expand(elements: list[str], arguments: dict[str, Any]) -> list[str]:
    """Replace each `{name}` element by its argument: lists expand, absent ones drop."""
    argv: list[str] = []
    for element in elements:
        match = PLACEHOLDER.match(element)
        if match is None:
            argv.append(element)
            continue
        name = match.group(1)
        value = arguments.get(name)
        # JSON null means "no value", like an absent argument.
        if value is None:
            continue
        if isinstance(value, list):
            argv.extend(_scalar(name, item) for item in value)
        else:
            argv.append(_scalar(name, value))
    return argv


def _scalar(name: str, value: Any) -> str:
    # bool before int: True is an int in Python, but "true" in JSON.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and "\x00" in value:
        # Docker would fail to exec it, and the run would look like the tool's failure.
        raise CommandError(name, "contains a NUL character, which argv cannot carry")
    if isinstance(value, str | int | float):
        return str(value)
    kind = _JSON_KINDS.get(type(value), type(value).__name__)
    raise CommandError(name, f"{kind} value cannot become a command-line element")


_JSON_KINDS = {dict: "an object", list: "a nested list", type(None): "a null"}
