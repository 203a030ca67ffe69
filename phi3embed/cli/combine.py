"""Typer command ``combine``: are the outputs of a job's ``--shard`` parts complete? (over :mod:`phi3embed.outputs.combine`)

``register(app)`` adds it to the application that ``phi3embed.cli.app`` builds, with ``merge-manifests`` (its
name before 0.2) as a hidden alias so that existing scripts keep working. People read stderr; ``--json``
puts the report on stdout. Exit codes: 0 complete, 1 incomplete (missing, failed or lost images, or
parts made with different settings; records of images that are no longer inputs are a note), 2 usage errors (a DIR without manifest, an INPUT naming nothing).
"""

# No ``from __future__ import annotations``: Typer reads these annotations at runtime.

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from phi3embed.cli.errors import FAILED, OK, one_line_errors
from phi3embed.cli.options import ImageColumn

SHOWN = 10  # names listed per problem kind for people (--json lists all)

COMBINE_HELP = """Check that the outputs of a job split with --shard are complete, and optionally write one manifest for all.

DIR...: the output directories of the parts (or one directory all parts wrote into).

With --inputs (the INPUT arguments of encode, without --shard), every listed image must have an ok record whose output is whole (its size matches the record), in one of the DIRs; records of images that are no longer inputs are reported as a note, not a failure. Without --inputs, every recorded image is checked. All ok records must share the same model fingerprint and settings.

-o/--out FILE writes the best record of every image (names sorted), with output paths relative to FILE's folder: phi3embed.read() on that folder then reads the whole job.

Exit codes: 0 complete; 1 incomplete (missing, failed or lost images, mixed settings); 2 usage errors.
"""


def register(app: typer.Typer) -> None:
    """Add ``combine`` (and its hidden alias ``merge-manifests``) to ``app``."""
    app.command("combine", help=COMBINE_HELP, no_args_is_help=True)(combine_command)
    app.command("merge-manifests", help=COMBINE_HELP, no_args_is_help=True, hidden=True)(combine_command)


@one_line_errors
def combine_command(
    dirs: Annotated[list[Path], typer.Argument(metavar="DIR...", help="Output directories of the parts.")],
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--inputs",
            "-i",
            metavar="INPUT",
            help="The full input list, as given to encode (repeat for several; - reads paths from stdin).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", metavar="FILE", help="Write the combined manifest here.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No report on stderr (the exit code tells).")] = False,
    image_column: ImageColumn = None,
) -> None:
    from rich.console import Console

    from phi3embed.inputs.listing import expand_inputs
    from phi3embed.outputs.combine import check_outputs, write_combined
    from phi3embed.outputs.names import readable_json

    sources = expand_inputs(inputs, exclude=[str(d) for d in dirs], image_column=image_column) if inputs else None
    report = check_outputs(dirs, sources)
    written = write_combined(report, out) if out is not None else None
    failures = {name: report.chosen[name].record.error for name in report.failed}
    data: dict[str, Any] = {
        "complete": report.complete,
        "dirs": [str(d) for d in dirs],
        "listed": report.listed,
        "recorded": len(report.chosen),
        "ok": report.ok_count,
        "failed": [{"name": n, "error": e} for n, e in failures.items()],
        "missing": report.missing,
        "lost": report.lost,
        "stale": report.stale,
        "unreadable_lines": report.unreadable,
        "mixed_settings": report.mixed_settings,
        "combined_manifest": str(out) if out is not None else None,
    }
    if as_json:
        typer.echo(json.dumps(readable_json(data), ensure_ascii=True))  # names that are not UTF-8: \xNN
    if not quiet:
        _render(Console(stderr=True), data, written)
    raise typer.Exit(OK if report.complete else FAILED)


def _render(console: Any, data: dict[str, Any], written: int | None) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    state = Text("complete", style="bold green") if data["complete"] else Text("incomplete", style="bold red")
    table.add_row("phi3embed combine", state)
    table.add_row("directories", ", ".join(data["dirs"]))
    listed = "not given (only recorded images are checked)" if data["listed"] is None else str(data["listed"])
    table.add_row("images", f"{listed} listed, {data['recorded']} recorded, {data['ok']} ok")

    def names(items: list[str]) -> str:
        more = len(items) - SHOWN
        return "\n".join(items[:SHOWN]) + (f"\n... and {more} more (--json lists all)" if more > 0 else "")

    if data["missing"]:
        table.add_row(f"missing ({len(data['missing'])})", Text(names(data["missing"]), style="red"))
    if data["failed"]:
        lines = [f"{f['error'] or f['name']}" for f in data["failed"]]
        table.add_row(f"failed ({len(lines)})", Text(names(lines), style="red"))
    if data["lost"]:
        table.add_row(f"output lost ({len(data['lost'])})", Text(names(data["lost"]), style="red"))
    if data["stale"]:
        stale = data["stale"]
        table.add_row(
            f"note ({len(stale)})",
            f"recorded but no longer among the inputs (not judged): {names(stale)}",
        )
    if data["unreadable_lines"]:
        n = data["unreadable_lines"]
        table.add_row(
            "note", f"skipped {n} manifest line{'s' if n != 1 else ''} that cannot be read (not JSON records)"
        )
    if data["mixed_settings"]:
        table.add_row("settings", Text("ok records differ in model fingerprint or settings", style="bold red"))
    if written is not None:
        table.add_row("combined", f"{data['combined_manifest']} ({written} records)")
    if not data["complete"]:
        table.add_row("next", "rerun the parts that miss images (same command): finished images are skipped")
    console.print(table, highlight=False)
