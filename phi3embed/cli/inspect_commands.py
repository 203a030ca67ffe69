"""Typer commands ``plan``, ``preview`` and ``info``: thin translations over :mod:`phi3embed.inspection`.

``register(app)`` adds them to the application that ``phi3embed.cli.app`` builds. stdout carries only the
requested output (a table for people, or JSON with ``--json``); messages go to stderr. A
:class:`~phi3embed.errors.Phi3EmbedError` becomes one line on stderr and exit code 2; ``plan`` exits 1
when some inputs could not be planned (they are reported, the others are still planned).
"""

# No ``from __future__ import annotations``: Typer reads these annotations at runtime.

import json
import os
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from PIL import Image
from rich.console import Console
from rich.table import Table
from rich.text import Text

from phi3embed.core.config import VisionConfig
from phi3embed.errors import ConfigError, ImageError, Phi3EmbedError

if TYPE_CHECKING:  # .inspect imports torch: only the command that runs pays for it, not --help
    from phi3embed.inspection import PlanResult

DEFAULT_MODEL = "microsoft/Phi-3-vision-128k-instruct"
MODEL_ENV = "PHI3EMBED_MODEL"

_MODEL_HELP = (
    f"Checkpoint: local directory, hub id or preset name (env {MODEL_ENV}, default {DEFAULT_MODEL}). "
    "Only its config files are read."
)
_CROPS_HELP = "Maximum number of 336 px crops (default: the checkpoint's preprocessor_config.json)."

# options that plan and preview read alike (info has its own --model and --num-crops help)
_NumCrops = Annotated[int | None, typer.Option("--num-crops", min=1, help=_CROPS_HELP)]
_ConfigModel = Annotated[str | None, typer.Option("--model", help=_MODEL_HELP, show_default=False)]
_Json = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")]

T = TypeVar("T")


class OutDType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Alpha(str, Enum):
    drop = "drop"
    white = "white"


def register(app: typer.Typer) -> None:
    """Add ``plan``, ``preview`` and ``info`` to ``app``."""
    app.command("plan")(plan_command)
    app.command("preview")(preview_command)
    app.command("info")(info_command)


def _guard(work: Callable[[], T]) -> T:
    """Run ``work``; a Phi3EmbedError becomes one line on stderr and exit code 2."""
    try:
        return work()
    except Phi3EmbedError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _model_source(model: str | None) -> str:
    return model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def _settings(model: str | None, num_crops: int | None) -> tuple[VisionConfig, int, str]:
    """Vision config, num_crops and a label for the model whose configs were used.

    With ``--num-crops`` and no explicit ``--model``, a model that cannot be read (e.g. a stale
    ``PHI3EMBED_MODEL``) is not an error: the released models' configuration is used, with a warning.
    """
    from phi3embed.inspection import model_configs

    source = _model_source(model)
    try:
        vision, pre = model_configs(source)
    except Phi3EmbedError as exc:
        if model is not None or num_crops is None:
            raise
        typer.echo(f"warning: {exc}; using the released models' configuration (hidden size 3072)", err=True)
        return VisionConfig(), num_crops, "released-model defaults"
    return vision, num_crops if num_crops is not None else pre.num_crops, source


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _gflop(flops: int) -> str:
    return f"{flops / 1e9:,.1f}"


# --------------------------------------------------------------------------- plan


def plan_command(
    inputs: Annotated[
        list[str], typer.Argument(metavar="INPUT...", help="Image files, or directories (recursed for images).")
    ],
    num_crops: _NumCrops = None,
    model: _ConfigModel = None,
    out_dtype: Annotated[
        OutDType, typer.Option("--out-dtype", help="Stored dtype the output sizes are computed for.")
    ] = OutDType.float32,
    exif_transpose: Annotated[
        bool, typer.Option("--exif-transpose", help="Plan for images rotated by their EXIF orientation.")
    ] = False,
    as_json: _Json = False,
) -> None:
    """Predict crop grids, token counts, output sizes and GFLOP. Reads image headers only.

    Exit code 0 when every input can be planned, 1 when some cannot, 2 on usage, model or config errors.
    """

    from phi3embed.inspection import plan

    def work() -> "tuple[PlanResult, str]":
        vision, crops, label = _settings(model, num_crops)
        return plan(
            inputs, num_crops=crops, out_dtype=out_dtype.value, vision=vision, exif_transpose=exif_transpose
        ), label

    result, label = _guard(work)
    if as_json:
        doc = result.to_dict()
        doc["settings"] = {"model": label, **doc["settings"]}
        typer.echo(json.dumps(doc, indent=2))
        for row in result.rows:
            if row.error:
                typer.echo(f"error: {row.error}", err=True)
    else:
        _print_plan(result, label)
    if result.totals.errors:
        raise typer.Exit(1)


def _print_plan(result: "PlanResult", label: str) -> None:
    console = Console(file=sys.stdout)
    if not console.is_terminal:  # a file or a pipe: wide enough that paths are not folded
        longest = max((len(r.path) for r in result.rows), default=0)
        console = Console(file=sys.stdout, width=max(console.width, longest + 72))
    console.print(
        Text(
            f"model {label} · num_crops {result.num_crops} · output [tokens, {result.hidden_size}] "
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
    table.add_column("output", justify="right", footer=_human_bytes(t.bytes))
    table.add_column("GFLOP", justify="right", footer=_gflop(t.flops))
    for row in result.rows:
        if row.ok:
            table.add_row(
                Text(row.path),
                f"{row.width}x{row.height}",
                f"{row.rows}x{row.cols}",
                str(row.crops),
                f"{row.num_tokens:,}",
                _human_bytes(row.bytes or 0),
                _gflop(row.flops or 0),
            )
    console.print(table)
    if t.errors:
        console.print(Text(f"{t.errors} of {t.images} inputs cannot be encoded:", style="bold red"))
        failed = Table(header_style="bold")
        failed.add_column("image", overflow="fold")
        failed.add_column("reason", overflow="fold")
        for row in result.rows:
            if row.error:
                reason = row.error.removeprefix(f"{row.path}: ")
                failed.add_row(Text(row.path), Text(reason, style="red"))
        console.print(failed)


# --------------------------------------------------------------------------- preview


def preview_command(
    image: Annotated[Path, typer.Argument(help="The image to show.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Picture to write (format from its extension).")],
    num_crops: _NumCrops = None,
    model: _ConfigModel = None,
    alpha: Annotated[
        Alpha, typer.Option("--alpha", help="Transparency: drop it (reference) or composite over white.")
    ] = Alpha.drop,
    exif_transpose: Annotated[
        bool, typer.Option("--exif-transpose", help="Apply the EXIF orientation first (the reference does not).")
    ] = False,
    max_side: Annotated[
        int, typer.Option("--max-side", min=64, help="Scale the HD image down to at most this many pixels.")
    ] = 1024,
) -> None:
    """Draw how an image is tiled: the padded HD image with its numbered crop grid, the global view, tokens."""

    from phi3embed.inspection import render_preview

    def work() -> str:
        vision, crops, _ = _settings(model, num_crops)
        fmt = Image.registered_extensions().get(output.suffix.lower())
        if fmt is None:
            raise ConfigError(f"cannot tell the image format from the extension {output.suffix!r}", path=output)
        picture = render_preview(
            image,
            num_crops=crops,
            crop_size=vision.clip.image_size,
            alpha=alpha.value,
            exif_transpose=exif_transpose,
            max_side=max_side,
        )
        try:
            picture.save(output, format=fmt)
        except OSError as exc:
            raise ImageError(f"cannot write the preview: {exc.strerror or exc}", path=output) from None
        return f"wrote {output} ({picture.width}x{picture.height}, num_crops {crops})"

    typer.echo(_guard(work), err=True)


# --------------------------------------------------------------------------- info


def info_command(
    model: Annotated[
        str | None, typer.Option("--model", help=_MODEL_HELP.split(" Only")[0], show_default=False)
    ] = None,
    num_crops: Annotated[int | None, typer.Option("--num-crops", min=1, help="Report for this num_crops.")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag, commit).")] = None,
    as_json: _Json = False,
) -> None:
    """Describe a checkpoint from its configs and weight headers (no tensor data is read)."""
    from phi3embed.inspection import model_info

    info = _guard(lambda: model_info(_model_source(model), num_crops=num_crops, revision=revision))
    if as_json:
        typer.echo(json.dumps(info.to_dict(), indent=2))
        return
    clip = info.clip
    rows: list[tuple[str, Any]] = [
        ("checkpoint", info.root),
        ("found in", f"{info.location} (asked for {info.source})"),
        ("variant", f"{info.variant or 'unknown'} ({info.variant_evidence})"),
        ("vision parameters", f"{info.vision_params:,} in {info.vision_tensors} tensors"),
        ("  used by the fast path", f"{info.vision_params_run:,}"),
        ("stored dtype", f"{', '.join(info.stored_dtypes)} (config torch_dtype {info.config_torch_dtype})"),
        ("num_crops", f"{info.num_crops} ({info.num_crops_source})"),
        (
            "CLIP",
            f"hidden {clip.hidden_size}, {clip.num_hidden_layers} layers, {clip.num_attention_heads} heads, "
            f"MLP {clip.intermediate_size}, patch {clip.patch_size}, image {clip.image_size}",
        ),
        ("layers run", f"{info.layers_run} of {clip.num_hidden_layers} (layer_idx {info.layer_idx})"),
        ("cost", f"{info.gflop_per_crop:,.1f} GFLOP per crop"),
        ("LM hidden size", f"{info.lm_hidden_size} (projection {info.projection_cls}, {info.hd_transform_order})"),
        ("vision tensors check", info.tensors_check),
    ]
    for wf in info.weight_files:
        rows.append(
            (
                "weights file",
                f"{wf.path}: {wf.vision_tensors} vision tensors, {_human_bytes(wf.vision_bytes)}, "
                f"{_human_bytes(wf.bytes_to_read)} read by encode",
            )
        )
    rows.append(("bytes read by encode", f"{info.bytes_to_read:,} of {info.vision_bytes:,} vision bytes"))
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, Text(str(value)))
    Console(file=sys.stdout).print(table)
