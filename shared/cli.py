"""`billy-tools`: start the embedded stack, run tools, follow events, fetch artifacts.

Exit codes: 0 success, 1 failure (a run that did not succeed, an unreachable service),
2 a rejected request, 130 interrupted. Errors print one line, without a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import typer
from pydantic import ByteSize, TypeAdapter, ValidationError
from rich.console import Console

from shared import render, stack, tracing
from shared.client import (
    BillyToolsClient,
    RunNotFound,
    RunRejected,
    SavedArtifacts,
    UnsafeArtifactPath,
    checked_run_id,
    safe_artifact_path,
)
from shared.errors import BillyToolsError
from shared.settings import Settings
from shared.wire import RequestedLimits, RunResult, to_builtins

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_REJECTED, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_OUT_DIR = Path("billy-artifacts")
# After the result arrives, how long the event printer may take to show the last events.
EVENTS_DRAIN_S = 2.0

# Plain (click-style) help: typer's rich panels show every flag as taking a `<bool>`.
app = typer.Typer(
    name="billy-tools",
    help="Run Billy's tools in hardened Docker containers, over NATS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
artifacts_app = typer.Typer(
    help="Artifacts stored by a run.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(artifacts_app, name="artifacts")

console = Console()
err_console = Console(stderr=True)


class UsageError(BillyToolsError):
    """A command-line value is malformed."""


@app.callback()
def configure(
    ctx: typer.Context,
    nats_url: Annotated[
        str | None, typer.Option("--nats-url", help="NATS server; default $NATS_URL.")
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option("--state-dir", help="Embedded stack state; $BILLY_STATE_DIR.")
    ] = None,
) -> None:
    """Settings come from the environment (NATS_URL, BILLY_*); options override them."""
    overrides = {"nats_url": nats_url, "state_dir": state_dir}
    ctx.obj = {key: value for key, value in overrides.items() if value is not None}


def settings_of(ctx: typer.Context) -> Settings:
    try:
        return Settings(**(ctx.obj or {}))
    except ValidationError as exc:
        raise UsageError(f"invalid settings: {exc.errors()[0]['msg']}") from exc


def execute(work: Coroutine[Any, Any, int | None]) -> None:
    """Run one command's coroutine; billy-tools errors become one line and exit 1."""
    try:
        code = asyncio.run(work)
    except BillyToolsError as exc:
        render.error(err_console, exc)
        raise typer.Exit(EXIT_FAILED) from None
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None
    raise typer.Exit(code or EXIT_OK)


# -- the stack --------------------------------------------------------------------------


@app.command()
def up(ctx: typer.Context) -> None:
    """Start nats-server and the admission, executor and artifacts services (idempotent)."""
    settings = settings_of(ctx)

    async def work() -> None:
        with err_console.status("starting the stack") as spinner:

            def progress(step: str) -> None:
                # Without a terminal the spinner shows nothing: say each step on a line.
                if err_console.is_terminal:
                    spinner.update(render.text(step))
                else:
                    err_console.print(render.text(step, "dim"))

            components = await stack.up(settings, progress=progress)
        render.components(console, components, f"stack up ({settings.nats_url})")
        logs_dir = stack.StackPaths(settings.state_dir).logs_dir
        console.print(render.text(f"logs in {logs_dir}", "dim"))

    execute(work())


@app.command()
def down(ctx: typer.Context) -> None:
    """Stop what `billy-tools up` started."""
    settings = settings_of(ctx)

    async def work() -> None:
        stopped = await stack.down(settings)
        if not stopped:
            run_dir = stack.StackPaths(settings.state_dir).run_dir
            console.print(render.text(f"nothing to stop (no pid files in {run_dir})"))
            return
        render.components(console, stopped, "stack down")

    execute(work())


@app.command()
def status(ctx: typer.Context) -> None:
    """Show whether nats-server and each service run and answer."""
    settings = settings_of(ctx)

    async def work() -> int:
        components = await stack.status(settings)
        render.components(console, components, f"stack ({settings.nats_url})")
        healthy = all(c.state == "running" for c in components)
        return EXIT_OK if healthy else EXIT_FAILED

    execute(work())


# -- tools and runs ---------------------------------------------------------------------


@app.command()
def tools(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the tools admission knows."""
    settings = settings_of(ctx)

    async def work() -> None:
        async with BillyToolsClient.connect(settings, "billy-tools-cli") as client:
            tool_list = await client.tools()
        if as_json:
            print(json.dumps(to_builtins(tool_list), indent=2))
        else:
            render.tools(console, tool_list)

    execute(work())


def parse_arguments(pairs: list[str], args_json: str | None) -> dict[str, Any]:
    """--args-json, then each --arg key=value over it (values parsed as JSON when they parse)."""
    arguments: dict[str, Any] = {}
    if args_json:
        try:
            arguments = json.loads(args_json)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--args-json is not JSON: {exc}") from exc
        if not isinstance(arguments, dict):
            raise UsageError("--args-json must be a JSON object")
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--arg {pair!r} is not key=value")
        try:
            arguments[key] = json.loads(text)
        except json.JSONDecodeError:
            arguments[key] = text
    return arguments


def input_paths(paths: list[Path]) -> dict[str, Path]:
    """Inputs by file name; two inputs with one name would overwrite each other."""
    inputs: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            raise UsageError(f"--input {path} is not a readable file")
        if path.name in inputs:
            raise UsageError(f"two inputs are named {path.name!r}: {inputs[path.name]}, {path}")
        inputs[path.name] = path
    return inputs


@app.command()
def run(
    ctx: typer.Context,
    tool: Annotated[str, typer.Argument(help="Tool name (see `billy-tools tools`).")],
    arg: Annotated[
        list[str] | None,
        typer.Option(
            "--arg",
            "-a",
            metavar="KEY=VALUE",
            help="An argument; the value is parsed as JSON when it can be.",
        ),
    ] = None,
    args_json: Annotated[
        str | None, typer.Option("--args-json", help="All arguments as a JSON object.")
    ] = None,
    input_file: Annotated[
        list[Path] | None,
        typer.Option("--input", "-i", metavar="FILE", help="File placed at /workspace/in/<name>."),
    ] = None,
    tenant: Annotated[str, typer.Option(help="Tenant of the run.")] = "default",
    run_timeout: Annotated[
        float | None,
        typer.Option(
            "--run-timeout",
            metavar="SECONDS",
            help="The run's own timeout (its container is killed after it); at most the "
            "tool's limit, default the tool's.",
        ),
    ] = None,
    memory: Annotated[
        str | None,
        typer.Option(
            metavar="BYTES",
            help="The run's memory limit, in bytes or with a unit (64MiB); at most the tool's.",
        ),
    ] = None,
    cpus: Annotated[
        float | None,
        typer.Option(metavar="N", help="The run's CPU limit (0.5, 2); at most the tool's."),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="How long this command waits for the result; the run goes on after it gives "
            "up (see --run-timeout).",
        ),
    ] = 600.0,
    out: Annotated[
        Path | None,
        typer.Option(help="Directory for artifacts; default ./billy-artifacts/<run_id>/."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Run a tool, show its events while it runs, print the result and save its artifacts."""
    settings = settings_of(ctx)
    try:
        arguments = parse_arguments(arg or [], args_json)
        inputs = input_paths(input_file or [])
        limits = requested_limits(run_timeout, memory, cpus)
        check_out_dir(out or DEFAULT_OUT_DIR)
    except UsageError as exc:
        render.error(err_console, exc)
        raise typer.Exit(EXIT_FAILED) from None
    options = RunOptions(tenant, limits, timeout, out, as_json)
    execute(run_tool(settings, tool, arguments, inputs, options))


@dataclass(frozen=True)
class RunOptions:
    """How `run` submits, waits and saves: everything but the tool, arguments and inputs."""

    tenant: str = "default"
    limits: RequestedLimits | None = None
    timeout_s: float = 600.0
    out_dir: Path | None = None
    as_json: bool = False


def requested_limits(
    run_timeout_s: float | None, memory: str | None, cpus: float | None
) -> RequestedLimits | None:
    """The run's own limits from --run-timeout, --memory and --cpus (None when none given)."""
    if run_timeout_s is None and memory is None and cpus is None:
        return None
    for option, value in (("--run-timeout", run_timeout_s), ("--cpus", cpus)):
        if value is not None and value <= 0:
            raise UsageError(f"{option} must be above 0, not {value:g}")
    memory_bytes = None
    if memory is not None:
        try:
            memory_bytes = int(TypeAdapter(ByteSize).validate_python(memory))
        except ValidationError as exc:
            raise UsageError(f"--memory {memory!r} is not a size (bytes, or like 64MiB)") from exc
        if memory_bytes <= 0:
            raise UsageError(f"--memory must be above 0, not {memory!r}")
    return RequestedLimits(timeout_s=run_timeout_s, memory_bytes=memory_bytes, cpus=cpus)


def check_out_dir(out_dir: Path) -> None:
    """Fail before submitting when artifacts could not be saved under out_dir."""
    for path in (out_dir, *out_dir.absolute().parents):
        if path.exists():
            if not path.is_dir():
                what = "--out" if path == out_dir else f"--out {out_dir}: {path}"
                raise UsageError(f"{what} is an existing file, not a directory")
            return


async def run_tool(
    settings: Settings,
    tool: str,
    arguments: dict[str, Any],
    inputs: dict[str, Path],
    options: RunOptions,
) -> int:
    """Submit, follow, show the result, save artifacts; returns the exit code."""
    as_json = options.as_json
    async with BillyToolsClient.connect(settings, "billy-tools-cli") as client:
        try:
            reply = await client.submit(
                tool, arguments, inputs=inputs, tenant=options.tenant, limits=options.limits
            )
        except RunRejected as exc:
            show_rejection(exc, as_json)
            return EXIT_REJECTED
        if not as_json:
            render.queued(console, reply.run_id, reply.trace_id)
        result = await follow(client, reply.run_id, options.timeout_s, show_events=not as_json)

        out_dir = options.out_dir or DEFAULT_OUT_DIR / result.run_id
        saved = await client.save_artifacts(result.run_id, out_dir, result.artifacts)
    show_result(result, saved, as_json)
    if result.status == "rejected":
        return EXIT_REJECTED
    succeeded = result.status == "succeeded" and not saved.refused
    return EXIT_OK if succeeded else EXIT_FAILED


async def follow(
    client: BillyToolsClient, run_id: str, timeout_s: float, show_events: bool
) -> RunResult:
    """Wait for the result while printing the run's events as they arrive."""
    if not show_events:
        return await client.result(run_id, timeout_s=timeout_s)

    with err_console.status(render.text(f"run {run_id}: queued")) as spinner:

        async def print_events() -> None:
            async for event in client.events(run_id):
                spinner.update(render.text(f"run {run_id}: {event.type}"))
                console.print(render.event_line(event))

        printer = asyncio.create_task(print_events())
        try:
            result = await client.result(run_id, timeout_s=timeout_s)
            # The `finished` event follows the ledger closely; let it show, without waiting
            # forever on an event that a crashed component never published.
            await asyncio.wait({printer}, timeout=EVENTS_DRAIN_S)
        finally:
            printer.cancel()
    return result


def show_rejection(exc: RunRejected, as_json: bool) -> None:
    if as_json:
        print(json.dumps(to_builtins(exc.reply), indent=2))
    else:
        render.rejection(err_console, exc.reply)


def show_result(result: RunResult, saved: SavedArtifacts, as_json: bool) -> None:
    saved_to = {ref.path: path for ref, path in saved.saved}
    refused = {ref.path: reason for ref, reason in saved.refused}
    if as_json:
        body = {
            "result": to_builtins(result),
            "saved": {path: str(where) for path, where in saved_to.items()},
            "refused": refused,
        }
        print(json.dumps(body, indent=2))
        return
    render.result(console, result)
    render.artifacts(console, result.artifacts, saved_to, refused)
    render.rejected_artifacts(console, result)


# -- events and artifacts ---------------------------------------------------------------


@app.command()
def events(
    ctx: typer.Context,
    run_id: Annotated[str | None, typer.Argument(help="Replay and follow one run.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's runs.")] = None,
) -> None:
    """Follow one run's events from its first one, or every new event of all runs."""
    settings = settings_of(ctx)

    async def work() -> None:
        if run_id is not None:
            checked_run_id(run_id)
        async with BillyToolsClient.connect(settings, "billy-tools-cli") as client:
            if run_id is None:
                following = f"following events of {tenant or 'all tenants'}; ^C stops"
                console.print(render.text(following, "dim"))
            elif await client.get_run(run_id) is None:
                # Events of a run that never existed would be awaited forever.
                raise RunNotFound(run_id)
            async for event in client.events(run_id, tenant=tenant):
                console.print(render.event_line(event, with_run_id=run_id is None))

    execute(work())


@artifacts_app.command("list")
def artifacts_list(
    ctx: typer.Context,
    run_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List a run's stored artifacts with size and sha256."""
    settings = settings_of(ctx)

    async def work() -> None:
        checked_run_id(run_id)
        async with BillyToolsClient.connect(settings, "billy-tools-cli") as client:
            refs = await client.artifacts(run_id)
        if as_json:
            print(json.dumps(to_builtins(refs), indent=2))
        else:
            render.artifacts(console, refs)

    execute(work())


@artifacts_app.command("get")
def artifacts_get(
    ctx: typer.Context,
    run_id: str,
    path: str,
    dest: Annotated[
        Path | None,
        typer.Option(help="File or existing directory; default ./billy-artifacts/<run_id>/."),
    ] = None,
) -> None:
    """Download one artifact (streamed, checked against its sha256)."""
    settings = settings_of(ctx)

    async def work() -> None:
        checked_run_id(run_id)
        target = artifact_destination(run_id, path, dest)
        async with BillyToolsClient.connect(settings, "billy-tools-cli") as client:
            ref = await client.fetch_artifact(run_id, path, target)
        render.artifact_saved(console, path, target, ref)

    execute(work())


def artifact_destination(run_id: str, path: str, dest: Path | None) -> Path:
    """Where `artifacts get` writes; the artifact's own path is never trusted."""
    if dest is None:
        return safe_artifact_path(DEFAULT_OUT_DIR / run_id, path)
    if dest.is_dir():
        name = PurePosixPath(path).name
        if not name:
            raise UnsafeArtifactPath(path, "has no file name")
        return safe_artifact_path(dest, name)
    return dest


# -- doctor (owned by shared.doctor) ----------------------------------------------------


@app.command()
def doctor(
    ctx: typer.Context,
    tool_names: Annotated[
        list[str] | None, typer.Argument(metavar="[TOOL]...", help="Tools; default all.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check each tool's container against the security baseline; exit 1 on a FAIL."""
    from shared import doctor as doctor_module

    settings = settings_of(ctx)

    async def work() -> int:
        report = await doctor_module.run_doctor(settings, tool_names or None)
        if as_json:
            print(json.dumps(report.to_builtins(), indent=2))
        else:
            doctor_module.render(console, report)
        return EXIT_FAILED if report.failed else EXIT_OK

    execute(work())


# -- images (owned by shared.images, loaded only when used) -----------------------------


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def images(ctx: typer.Context) -> None:
    """Build tool images (`billy-tools images --help`)."""
    try:
        from shared import images as images_module
    except ImportError as exc:
        render.error(err_console, f"images commands are unavailable: {exc}")
        raise typer.Exit(EXIT_FAILED) from None
    command = typer.main.get_command(images_module.app)
    command.main(args=ctx.args, prog_name="billy-tools images", standalone_mode=True)


def main() -> None:
    """Entry point of the `billy-tools` console script."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tracing.configure("billy-tools-cli")
    app()


if __name__ == "__main__":
    main()
