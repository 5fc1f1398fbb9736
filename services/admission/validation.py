"""Checks of a run request before it is admitted: size and depth bounds, the tool's
arguments schema, its command placeholders, and its inputs."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import msgspec
from jsonschema import Draft202012Validator

from services.admission.errors import InvalidArguments, MalformedRequest, RequestRejected
from shared.errors import WireError
from shared.toolspec import ToolSpec
from shared.wire import ArgumentError, InputFile, RunRequest, decode

MAX_ARGUMENT_DEPTH = 32
MAX_ARGUMENT_BYTES = 256 * 1024
MAX_REPORTED_ERRORS = 50
# Hostile arguments can fail at every item; gathering stops here so that validation stays
# cheap, and the reported errors are the first ones sorted.
MAX_COLLECTED_ERRORS = 1000
# jsonschema messages quote the failing value, which may be 256 KiB long.
MAX_ERROR_MESSAGE_CHARS = 200
# Room in a request for request_id, tool, tenant, limits, input names and JSON punctuation.
REQUEST_OVERHEAD_BYTES = 64 * 1024

# argv elements are C strings: the kernel would end one at its first NUL.
NUL_IN_ARGV = "contains a NUL character, which argv cannot carry"

Segment = str | int
Failure = tuple[tuple[Segment, ...], str]


def decode_request(data: bytes) -> RunRequest:
    """Decode a RunRequest strictly; the error names the failing field."""
    try:
        return decode(data, RunRequest)
    except WireError as exc:
        raise MalformedRequest(str(exc)) from exc
    except RecursionError as exc:
        # Only the free-form arguments can nest; msgspec stops at the interpreter's limit.
        raise RequestRejected(
            "arguments_too_deep",
            f"arguments nest far deeper than {MAX_ARGUMENT_DEPTH} levels",
        ) from exc


def max_request_bytes(specs: Iterable[ToolSpec]) -> int:
    """The largest encoded request any tool of the catalog can accept."""
    input_bytes = max((int(spec.limits.input_bytes) for spec in specs), default=0)
    base64_bytes = (input_bytes + 2) // 3 * 4
    return MAX_ARGUMENT_BYTES + base64_bytes + REQUEST_OVERHEAD_BYTES


def check_request_size(size_bytes: int, limit_bytes: int) -> None:
    """Refuse a request before decoding it when no tool could accept its size."""
    if size_bytes > limit_bytes:
        raise RequestRejected(
            "request_too_large",
            f"request is {size_bytes} bytes; admission accepts at most {limit_bytes}",
        )


def json_depth(value: Any, stop_above: int | None = None) -> int:
    """Nesting depth of decoded JSON (0 for a scalar); stops early past `stop_above`."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if stop_above is not None and deepest > stop_above:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_argument_bounds(arguments: dict[str, Any]) -> None:
    """Depth and size bounds, checked before the schema sees the arguments."""
    depth = json_depth(arguments, stop_above=MAX_ARGUMENT_DEPTH)
    if depth > MAX_ARGUMENT_DEPTH:
        raise RequestRejected(
            "arguments_too_deep",
            f"arguments nest at least {depth} levels deep; at most {MAX_ARGUMENT_DEPTH} allowed",
        )
    size_bytes = len(msgspec.json.encode(arguments))
    if size_bytes > MAX_ARGUMENT_BYTES:
        raise RequestRejected(
            "arguments_too_large",
            f"arguments are {size_bytes} bytes encoded; at most {MAX_ARGUMENT_BYTES} allowed",
        )


def json_pointer(segments: Iterable[Segment]) -> str:
    """RFC 6901 pointer of a place in the arguments ("" is the arguments object)."""
    return "".join("/" + str(s).replace("~", "~0").replace("/", "~1") for s in segments)


class ArgumentValidator:
    """Validates one tool's arguments: bounds, arguments_schema, command placeholders."""

    def __init__(self, spec: ToolSpec) -> None:
        self.tool = spec.name
        self._schema = Draft202012Validator(
            spec.arguments_schema, format_checker=Draft202012Validator.FORMAT_CHECKER
        )
        self._placeholders = spec.placeholders()

    def check(self, arguments: dict[str, Any]) -> None:
        """Raise InvalidArguments listing every failing place, sorted, at most 50."""
        check_argument_bounds(arguments)
        schema_failures = list(
            itertools.islice(self._schema_failures(arguments), MAX_COLLECTED_ERRORS)
        )
        failures = schema_failures + list(self._placeholder_failures(arguments))
        if not failures:
            return

        failures.sort(key=_failure_order)
        errors = [
            ArgumentError(path=json_pointer(segments), message=message)
            for segments, message in failures[:MAX_REPORTED_ERRORS]
        ]
        count = (
            f"{len(failures)}+" if len(schema_failures) == MAX_COLLECTED_ERRORS else len(failures)
        )
        first = errors[0]
        raise InvalidArguments(
            f"arguments of tool {self.tool} fail at {count} place(s); first at "
            f"{first.path or '(root)'}: {first.message}",
            errors,
        )

    def _schema_failures(self, arguments: dict[str, Any]) -> Iterator[Failure]:
        for error in self._schema.iter_errors(arguments):
            yield tuple(error.absolute_path), _shortened(error.message)

    def _placeholder_failures(self, arguments: dict[str, Any]) -> Iterator[Failure]:
        # A placeholder becomes one argv element, or one per item of a list.
        for name in self._placeholders:
            value = arguments.get(name)
            if isinstance(value, dict):
                yield (name,), f"command placeholder {{{name}}} cannot take an object"
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    if isinstance(item, dict | list):
                        yield (
                            (name, index),
                            f"command placeholder {{{name}}} expands a list into argv; "
                            "its items cannot be objects or lists",
                        )
                    elif _has_nul(item):
                        yield (name, index), NUL_IN_ARGV
            elif _has_nul(value):
                yield (name,), NUL_IN_ARGV


def check_inputs(inputs: list[InputFile], spec: ToolSpec) -> None:
    """Input names are unique and their bytes fit the tool's input_bytes."""
    repeated = sorted(name for name, seen in Counter(i.name for i in inputs).items() if seen > 1)
    if repeated:
        raise RequestRejected(
            "duplicate_input",
            f"{len(repeated)} input name(s) given more than once: {', '.join(repeated[:10])}",
        )
    total_bytes = sum(len(i.data) for i in inputs)
    allowed_bytes = int(spec.limits.input_bytes)
    if total_bytes > allowed_bytes:
        raise RequestRejected(
            "inputs_too_large",
            f"{len(inputs)} input(s) hold {total_bytes} bytes; tool {spec.name} accepts at "
            f"most {allowed_bytes}",
        )


def _has_nul(value: Any) -> bool:
    return isinstance(value, str) and "\x00" in value


def _failure_order(failure: Failure) -> tuple:
    # Array indexes sort as numbers, so /items/3 comes before /items/10.
    segments, message = failure
    key = tuple((0, s, "") if isinstance(s, int) else (1, 0, s) for s in segments)
    return key, message


def _shortened(message: str) -> str:
    if len(message) <= MAX_ERROR_MESSAGE_CHARS:
        return message
    return message[: MAX_ERROR_MESSAGE_CHARS - 1] + "…"
