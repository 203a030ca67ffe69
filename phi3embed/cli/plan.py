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
from collections.abc import Iterable
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
    cpu_advice,
    human_bytes,
    measure_option,
    model_settings,
)
from phi3embed.cli.progress import cpu_note, listing_notes, skipped_special
from phi3embed.core.stages import DEFAULT_STAGE, STAGES
from phi3embed.inputs.listing import InputError, Source, list_inputs, parse_shard, shard_of
from phi3embed.outputs.names import printable, readable, readable_json

if TYPE_CHECKING:  # the plan module imports torch: only the command that runs pays for it, not --help
    from phi3embed.jobs.plan import PlanResult, PlanRow, PlanSettings


#: ``--stage`` of encode and plan: the stages of phi3embed.core.stages, as a Typer choice.
Stage = Enum("Stage", [(name, name) for name in STAGES], type=str)  # type: ignore[misc]


class PlanFormat(str, Enum):
    """What encode would write: ``--format npy`` / ``safetensors``, or ``--pack`` (pack)."""

    npy = "npy"
    safetensors = "safetensors"
    pack = "pack"


STAGE_HELP = (
    "What is stored: projected (the language model's image tokens, [T, D]), hd (the same tokens before the "
    "projection, [T, 4C]) or clip (CLIP's features of the real crops, [crops, patches, C])."
)

#: Renamed names listed in the table mode's note (``--json`` has them all on a short job).
RENAMED_SHOWN = 10

#: A job of at most this many images is short: its per-image rows are printed (the table, or ``images`` in
#: ``--json``) without ``--rows``. Past it only the totals, the notes and the first errors are, so that plan
#: on ten million images needs no memory per image and prints what a person reads.
SHORT_JOB = 1000

#: Error lines printed for a long job (all of them for a short one); their total is always said.
ERRORS_SHOWN = 20


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
    all_rows: Annotated[
        bool,
        typer.Option(
            "--rows",
            help=f"Print every image's row however many there are (streamed as they are planned: with --json as "
            f"the document's images, else one tab-separated line each past {SHORT_JOB:,} images). Without it a "
            f"job of more than {SHORT_JOB:,} images prints the totals, notes and first errors only (--json: no "
            f"images list, rows_omitted says how many).",
        ),
    ] = False,
    measure: Annotated[
        bool | None,
        measure_option("not measured (plan reads headers only); the CPU's bf16 matrix units are still reported"),
    ] = None,
) -> None:
    """Predict crop grids, token counts, output sizes and GFLOP of encoding INPUT. Reads image headers only.

    Up to 1,000 images the table lists each image; past that only the totals (and the notes and first errors),
    unless --rows. Memory does not grow with the number of images.

    Exit code 0 when every image can be planned, 1 when some cannot, 2 on usage, input, model or config errors.
    """

    from phi3embed.jobs.plan import plan, plan_settings

    shard_spec = parse_shard(shard) if shard is not None else None
    try:
        listing = list_inputs(inputs, image_column=image_column)
    except OSError as exc:
        raise InputError(f"cannot read the inputs: {exc}") from None
    sources: Iterable[Source] = listing.sources
    if shard_spec is not None:  # filtered as it is read: no list of the shard's sources
        index, count = shard_spec
        sources = (s for s in listing.sources if shard_of(s.group, count) == index)
    vision, pre, label = model_settings(model, num_crops)
    settings = plan_settings(vision=vision, preprocess=pre, out_dtype=out_dtype.value, stage=stage.value)
    special = listing.special
    extra_totals = {
        "skipped_special": special,
        "skipped_archives": len(listing.archive_paths),
        "skipped_looping_links": len(listing.looping_links),
        "repeated_names": len(listing.repeated),
    }
    stream: _JsonStream | _LineStream | None = None
    if all_rows:
        stream = _JsonStream(label, settings) if as_json else _LineStream(SHORT_JOB)
    result = plan(
        sources,
        vision=vision,
        preprocess=pre,
        out_dtype=out_dtype.value,
        exif_transpose=exif_transpose,
        stage=stage.value,
        output_format=output_format.value,
        keep_rows=0 if isinstance(stream, _JsonStream) else SHORT_JOB,
        keep_notes=SHORT_JOB,
        on_row=stream.row if stream is not None else None,
    )
    long_job = result.totals.images > SHORT_JOB
    advice = cpu_advice(
        vision,
        bool(measure),
        not_asked="--no-measure" if measure is False else "plan --measure or phi3embed info times it",
    )
    if not as_json and (advice.speed is not None or (advice.units.any and advice.on_cpu)):
        typer.echo(f"note: {cpu_note(advice)}", err=True)
    if special:  # pipes, sockets, devices in the folders: encode skips them too
        typer.echo(f"note: {skipped_special(special)}", err=True)
    for note in listing_notes(listing):  # the same lines as encode's summary
        typer.echo(f"note: {note}", err=True)
    if as_json:
        totals = {**result.totals.to_dict(), **extra_totals}
        if isinstance(stream, _JsonStream):
            stream.end(totals, advice.to_dict())
        else:
            doc = result.to_dict()
            doc["settings"] = {"model": label, **doc["settings"]}
            doc["totals"] = totals
            doc["cpu"] = advice.to_dict()
            typer.echo(json.dumps(readable_json(doc), indent=2))
        for line in error_lines(result, shown=ERRORS_SHOWN if long_job else None):
            typer.echo(line, err=True)
    elif result.rows_omitted:  # a long job (its rows streamed with --rows)
        _print_totals(result, label)
        _print_failures(result, shown=ERRORS_SHOWN)
    else:
        _print_plan(result, label)
    if result.rows_omitted and not all_rows:
        typer.echo(
            f"note: {result.rows_omitted:,} images: their rows are left out (more than {SHORT_JOB:,}; "
            f"plan --rows{' --json' if as_json else ''} lists them)",
            err=True,
        )
    for line in renamed_lines(result, shown=None if as_json and not long_job else RENAMED_SHOWN):
        typer.echo(line, err=True)
    if result.totals.errors:
        raise typer.Exit(FAILED)


class _JsonStream:
    """The ``--json`` document written as the rows are planned, byte for byte what ``json.dumps(doc,
    indent=2)`` writes for the whole document: ``settings``, then each row of ``images``, then ``totals`` and
    ``cpu``."""

    def __init__(self, label: str, settings: "PlanSettings") -> None:
        self.rows = 0
        head = _nested(readable_json({"model": label, **settings.settings_dict()}), 1)
        sys.stdout.write('{\n  "settings": ' + head + ',\n  "images": [')

    def row(self, row: "PlanRow") -> None:
        sys.stdout.write(("," if self.rows else "") + "\n    " + _nested(readable_json(row.to_dict()), 2))
        self.rows += 1

    def end(self, totals: dict[str, object], cpu: dict[str, object]) -> None:
        close = "\n  ]" if self.rows else "]"
        sys.stdout.write(close + ',\n  "totals": ' + _nested(readable_json(totals), 1))
        sys.stdout.write(',\n  "cpu": ' + _nested(cpu, 1) + "\n}\n")
        sys.stdout.flush()


def _nested(value: object, depth: int) -> str:
    """``value`` as ``json.dumps(indent=2)`` writes it ``depth`` levels down in a document."""
    return json.dumps(value, indent=2).replace("\n", "\n" + "  " * depth)


class _LineStream:
    """``--rows`` without ``--json``: the rows are held while there are at most ``short`` (a short job gets the
    table); past that they are printed, and every row after them, as one tab-separated line each."""

    def __init__(self, short: int) -> None:
        self.short, self.streaming = short, False
        self.held: list[PlanRow] = []

    def row(self, row: "PlanRow") -> None:
        if self.streaming:
            self._line(row)
            return
        self.held.append(row)
        if len(self.held) > self.short:
            self.streaming = True
            typer.echo("image\tW x H\tgrid\tcrops\ttokens\toutput bytes\tGFLOP")
            for held in self.held:
                self._line(held)
            self.held = []

    @staticmethod
    def _line(row: "PlanRow") -> None:
        if row.ok:  # the failures are listed after the totals, as in the table
            fields = [f"{row.width}x{row.height}", f"{row.rows}x{row.cols}", row.crops, row.num_tokens, row.bytes]
            typer.echo("\t".join([printable(row.name), *map(str, fields), f"{(row.flops or 0) / 1e9:.3f}"]))


def error_lines(result: "PlanResult", *, shown: int | None) -> list[str]:
    """``error: file: reason`` for the first ``shown`` failed images (all kept ones: None), then how many more."""
    first = result.first_errors if shown is None else result.first_errors[:shown]
    lines = [f"error: {readable(row.error or '')}" for row in first]
    more = result.totals.errors - len(first)
    if more:
        lines.append(f"error: ... and {more:,} more images cannot be encoded (plan --rows --json lists them)")
    return lines


def renamed_lines(result: "PlanResult", *, shown: int | None) -> list[str]:
    """The note on names stored under another name: a count, then ``name (why) -> output`` lines for the first
    ``shown`` of them (all the kept ones: None)."""
    n = result.totals.renamed
    if not n:
        return []
    many = n > 1
    lines = [
        f"note: {n:,} {'images get' if many else 'image gets'} another output name: the file system or the format "
        f"cannot hold {'theirs' if many else 'its'} as it is (the manifest record keeps the name):"
    ]
    first = result.first_renamed if shown is None else result.first_renamed[:shown]
    for row in first:
        stored = row.output if row.output is not None else f"pack key {printable(row.key or '')}"
        lines.append(f"  {printable(row.name)} ({row.renamed}) -> {stored}")
    if n > len(first):
        lines.append(f"  ... and {n - len(first):,} more (plan --json{' --rows' if n > SHORT_JOB else ''} lists all)")
    return lines


def _gflop(flops: int) -> str:
    return f"{flops / 1e9:,.1f}"


def _settings_line(result: "PlanResult", label: str) -> Text:
    return Text(
        f"model {label} · num_crops {result.num_crops} · {result.stage} output {result.output} "
        f"{result.out_dtype} · CLIP layers run {result.layers_run}/{result.layers_total} · "
        f"{_gflop(result.flops_per_crop)} GFLOP per crop + {result.flops_per_token / 1e6:.1f} MFLOP per token"
    )


def _print_totals(result: "PlanResult", label: str) -> None:
    """A long job: the settings and one row of totals."""
    console = Console(file=sys.stdout)
    console.print(_settings_line(result, label))
    t = result.totals
    table = Table(header_style="bold")
    for column in ("images", "crops", "tokens", "output", "GFLOP"):
        table.add_column(column, justify="right")
    table.add_row(f"{t.ok:,}", f"{t.crops:,}", f"{t.num_tokens:,}", human_bytes(t.bytes), _gflop(t.flops))
    console.print(table)


def _print_plan(result: "PlanResult", label: str) -> None:
    console = Console(file=sys.stdout)
    if not console.is_terminal:  # a file or a pipe: wide enough that names are not folded
        longest = max((len(printable(r.name)) for r in result.rows), default=0)
        console = Console(file=sys.stdout, width=max(console.width, longest + 72))
    console.print(_settings_line(result, label))
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
    _print_failures(result, shown=None)


def _print_failures(result: "PlanResult", *, shown: int | None) -> None:
    """The failed images (the first ``shown``: None for all kept) and why, after how many there are."""
    t = result.totals
    if not t.errors:
        return
    console = Console(file=sys.stdout)
    console.print(Text(f"{t.errors:,} of {t.images:,} images cannot be encoded:", style="bold red"))
    failed = Table(header_style="bold")
    failed.add_column("image", overflow="fold")
    failed.add_column("reason", overflow="fold")
    first = result.first_errors if shown is None else result.first_errors[:shown]
    for row in first:
        reason = readable((row.error or "").removeprefix(f"{row.path}: "))
        failed.add_row(Text(printable(row.name)), Text(reason, style="red"))
    console.print(failed)
    if t.errors > len(first):
        console.print(Text(f"... and {t.errors - len(first):,} more (plan --rows --json lists them all)"))
