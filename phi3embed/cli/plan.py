"""``phi3embed plan``: what ``encode`` would do with the same INPUTs, read from image headers only.

The inputs are listed exactly as encode lists them (:func:`phi3embed.inputs.listing.expand_inputs`, then
``--shard``), each image reported by the name encode's manifest records. stdout carries the table or, with
``--json``, one JSON document; messages go to stderr. Names encode stores under another name (the file
system or the format cannot hold them as they are) are listed with the output they get. Exit code 0 when
every image can be planned, 1 when some cannot (they are reported, the others still planned), 2 on usage,
input, model or config errors.
"""

# No ``from __future__ import annotations``: Typer reads these annotations at runtime.

import json
import sys
from enum import Enum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from phi3embed.cli.errors import FAILED, one_line_errors
from phi3embed.cli.options import (
    AsJson,
    ConfigModel,
    ExifTranspose,
    ImageColumn,
    NumCrops,
    OutDType,
    human_bytes,
    model_settings,
)
from phi3embed.cli.progress import listing_notes, skipped_special
from phi3embed.core.stages import DEFAULT_STAGE, STAGES
from phi3embed.inputs.listing import InputError, list_inputs, parse_shard, select_shard
from phi3embed.outputs.names import printable, readable, readable_json

if TYPE_CHECKING:  # the plan module imports torch: only the command that runs pays for it, not --help
    from phi3embed.jobs.plan import PlanResult


#: ``--stage`` of encode and plan: the stages of phi3embed.core.stages, as a Typer choice.
Stage = Enum("Stage", [(name, name) for name in STAGES], type=str)  # type: ignore[misc]


class PlanFormat(str, Enum):
    """What encode would write: ``--format npy`` / ``safetensors``, or ``--pack`` (pack)."""

    npy = "npy"
    safetensors = "safetensors"
    pack = "pack"


#: Renamed names listed in the table mode's note (``--json`` has them all).
RENAMED_SHOWN = 10

STAGE_HELP = (
    "What is stored: projected (the language model's image tokens, [T, D]), hd (the same tokens before the "
    "projection, [T, 4C]) or clip (CLIP's features of the real crops, [crops, patches, C])."
)


@one_line_errors
def plan_command(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT...", help="Files, directories, globs or - for stdin.")],
    model: ConfigModel = None,
    num_crops: NumCrops = None,
    out_dtype: Annotated[
        OutDType, typer.Option("--out-dtype", help="Stored dtype the output sizes are computed for.")
    ] = OutDType.float32,
    exif_transpose: ExifTranspose = False,
    stage: Annotated[Stage, typer.Option(help=STAGE_HELP + " Output sizes are computed for it.")] = Stage[
        DEFAULT_STAGE
    ],
    shard: Annotated[
        str | None,
        typer.Option(
            metavar="I/N",
            help="Only shard I of N (0-based), split by a stable hash of each name (of each archive's name for the "
            "images inside tar and parquet files), as encode splits.",
        ),
    ] = None,
    image_column: ImageColumn = None,
    output_format: Annotated[
        PlanFormat,
        typer.Option(
            "--format",
            help="The outputs encode would write (pack: --pack), for the names they get: a name the file system or "
            "the format cannot hold as it is is stored under a shortened name with a hash.",
        ),
    ] = PlanFormat.npy,
    as_json: AsJson = False,
) -> None:
    """Predict crop grids, token counts, output sizes and GFLOP of encoding INPUT. Reads image headers only.

    Exit code 0 when every image can be planned, 1 when some cannot, 2 on usage, input, model or config errors.
    """

    from phi3embed.jobs.plan import plan

    shard_spec = parse_shard(shard) if shard is not None else None
    try:
        listing = list_inputs(inputs, image_column=image_column)
    except OSError as exc:
        raise InputError(f"cannot read the inputs: {exc}") from None
    sources = listing.sources
    if shard_spec is not None:
        sources = select_shard(sources, *shard_spec)
    vision, pre, label = model_settings(model, num_crops)
    result = plan(
        sources,
        vision=vision,
        preprocess=pre,
        out_dtype=out_dtype.value,
        exif_transpose=exif_transpose,
        stage=stage.value,
        output_format=output_format.value,
    )
    special = listing.special
    if special:  # pipes, sockets, devices in the folders: encode skips them too
        typer.echo(f"note: {skipped_special(special)}", err=True)
    for note in listing_notes(listing):  # the same lines as encode's summary
        typer.echo(f"note: {note}", err=True)
    if as_json:
        doc = result.to_dict()
        doc["settings"] = {"model": label, **doc["settings"]}
        doc["totals"]["skipped_special"] = special
        doc["totals"]["skipped_archives"] = len(listing.archive_paths)
        doc["totals"]["skipped_looping_links"] = len(listing.looping_links)
        doc["totals"]["repeated_names"] = len(listing.repeated)
        typer.echo(json.dumps(readable_json(doc), indent=2))
        for row in result.rows:
            if row.error:
                typer.echo(f"error: {readable(row.error)}", err=True)
    else:
        _print_plan(result, label)
    for line in renamed_lines(result, shown=None if as_json else RENAMED_SHOWN):
        typer.echo(line, err=True)
    if result.totals.errors:
        raise typer.Exit(FAILED)


def renamed_lines(result: "PlanResult", *, shown: int | None) -> list[str]:
    """The note on names stored under another name: a count, then ``name (why) -> output`` lines."""
    renamed = [r for r in result.rows if r.ok and r.renamed]
    if not renamed:
        return []
    n = len(renamed)
    many = n > 1
    lines = [
        f"note: {n} {'images get' if many else 'image gets'} another output name: the file system or the format "
        f"cannot hold {'theirs' if many else 'its'} as it is (the manifest record keeps the name):"
    ]
    for row in renamed[:shown]:
        stored = row.output if row.output is not None else f"pack key {printable(row.key or '')}"
        lines.append(f"  {printable(row.name)} ({row.renamed}) -> {stored}")
    if shown is not None and n > shown:
        lines.append(f"  ... and {n - shown} more (plan --json lists all)")
    return lines


def _gflop(flops: int) -> str:
    return f"{flops / 1e9:,.1f}"


def _print_plan(result: "PlanResult", label: str) -> None:
    console = Console(file=sys.stdout)
    if not console.is_terminal:  # a file or a pipe: wide enough that names are not folded
        longest = max((len(printable(r.name)) for r in result.rows), default=0)
        console = Console(file=sys.stdout, width=max(console.width, longest + 72))
    console.print(
        Text(
            f"model {label} · num_crops {result.num_crops} · {result.stage} output {result.output} "
            f"{result.out_dtype} · CLIP layers run {result.layers_run}/{result.layers_total} · "
            f"{_gflop(result.flops_per_crop)} GFLOP per crop + {result.flops_per_token / 1e6:.1f} MFLOP per token"
        )
    )
    t = result.totals
    table = Table(show_footer=True, header_style="bold", footer_style="bold")
    table.add_column("image", footer=f"{t.ok} images", overflow="fold")
    table.add_column("W x H", justify="right")
    table.add_column("grid", justify="center")
    table.add_column("crops", justify="right", footer=str(t.crops))
    table.add_column("tokens", justify="right", footer=f"{t.num_tokens:,}")
    table.add_column("output", justify="right", footer=human_bytes(t.bytes))
    table.add_column("GFLOP", justify="right", footer=_gflop(t.flops))
    for row in result.rows:
        if row.ok:
            table.add_row(
                Text(printable(row.name)),
                f"{row.width}x{row.height}",
                f"{row.rows}x{row.cols}",
                str(row.crops),
                f"{row.num_tokens:,}",
                human_bytes(row.bytes or 0),
                _gflop(row.flops or 0),
            )
    console.print(table)
    if t.errors:
        console.print(Text(f"{t.errors} of {t.images} images cannot be encoded:", style="bold red"))
        failed = Table(header_style="bold")
        failed.add_column("image", overflow="fold")
        failed.add_column("reason", overflow="fold")
        for row in result.rows:
            if row.error:
                reason = readable(row.error.removeprefix(f"{row.path}: "))
                failed.add_row(Text(printable(row.name)), Text(reason, style="red"))
        console.print(failed)
