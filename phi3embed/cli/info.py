"""``phi3embed info``: describe a checkpoint from its configs and weight headers (:mod:`phi3embed.core.info`).

stdout carries the table, or one JSON document with ``--json``; no tensor data is read. It also says what this
CPU offers (:mod:`phi3embed.core.cpu`): its bf16 matrix units and, measured on one layer of the checkpoint's
shape with random weights, what ``--dtype bfloat16`` would give encode here.
"""

# No ``from __future__ import annotations``: Typer reads these annotations at runtime.

import json
import platform
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from phi3embed.cli.errors import one_line_errors
from phi3embed.cli.options import (
    DEFAULT_MODEL,
    MODEL_ENV,
    AsJson,
    Revision,
    cpu_advice,
    human_bytes,
    measure_option,
    model_source,
)


@one_line_errors
def info_command(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help=f"Checkpoint: local directory, hub id or preset name (env {MODEL_ENV}, default {DEFAULT_MODEL}).",
            show_default=False,
        ),
    ] = None,
    num_crops: Annotated[int | None, typer.Option("--num-crops", min=1, help="Report for this num_crops.")] = None,
    revision: Revision = None,
    as_json: AsJson = False,
    measure: Annotated[
        bool | None, measure_option("when encode would run on this CPU and it has bf16 matrix units")
    ] = None,
) -> None:
    """Describe a checkpoint from its configs and weight headers (no tensor data is read), and what
    --dtype bfloat16 would give on this CPU."""
    from phi3embed.core.info import model_info

    info = model_info(model_source(model), num_crops=num_crops, revision=revision)
    advice = cpu_advice(info.vision, measure)
    if as_json:
        typer.echo(json.dumps({**info.to_dict(), "cpu": advice.to_dict()}, indent=2))
        return
    clip = info.clip
    rows: list[tuple[str, Any]] = [
        ("checkpoint", info.root),
        ("found in", f"{info.location} (asked for {info.source})" + (f", commit {info.commit}" if info.commit else "")),
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
                "weight file",
                f"{wf.path} ({human_bytes(wf.size)}): {wf.vision_tensors} vision tensors, "
                f"{human_bytes(wf.vision_bytes)}, {human_bytes(wf.bytes_to_read)} read by encode"
                + (f", {human_bytes(wf.bytes_to_fetch)} fetched first" if info.location == "hub" else ""),
            )
        )
    rows.append(("bytes read by encode", f"{info.bytes_to_read:,} of {info.vision_bytes:,} vision bytes"))
    if info.location == "hub":
        rows.append(
            (
                "bytes fetched by encode",
                f"{info.bytes_to_fetch:,} (vision tensors and headers, then cached; the weight files whole are "
                f"{info.whole_files_bytes:,})",
            )
        )
    units = advice.units
    rows.append(("CPU", f"{units.model or platform.machine() or 'unknown'}; bf16 matrix units: {units.label}"))
    rows.append(("  bfloat16", advice.line(measure_hint="--measure times it")))
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, Text(str(value)))
    Console(file=sys.stdout).print(table)
