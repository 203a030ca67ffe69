"""What the commands share: the default model, option types named as ``encode`` names them.

The same thing has the same option name in every command (``--model``, ``--num-crops``, ``--out-dtype``,
``--exif-transpose``, ``--alpha``, ``--shard``, ``-o/--out`` for what a command writes).
"""

# No ``from __future__ import annotations``: Typer reads these annotations at runtime.

import os
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from phi3embed.errors import Phi3EmbedError

if TYPE_CHECKING:  # the configs import nothing heavy, but --help should not even load them
    from phi3embed.core.config import PreprocessConfig, VisionConfig
    from phi3embed.core.cpu import Bf16Advice

DEFAULT_MODEL = "microsoft/Phi-3-vision-128k-instruct"
MODEL_ENV = "PHI3EMBED_MODEL"


class OutDType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Alpha(str, Enum):
    drop = "drop"
    white = "white"


NumCrops = Annotated[
    int | None,
    typer.Option("--num-crops", min=1, help="Max 336 px crops per image (default: the checkpoint's)."),
]
ConfigModel = Annotated[
    str | None,
    typer.Option(
        "--model",
        help=f"Checkpoint: local directory, hub id or preset name (env {MODEL_ENV}, default {DEFAULT_MODEL}). "
        "Only its config files are read.",
        show_default=False,
    ),
]
ExifTranspose = Annotated[
    bool, typer.Option("--exif-transpose", help="Apply EXIF orientation first (the reference ignores it).")
]
ImageColumn = Annotated[
    str | None,
    typer.Option(
        "--image-column",
        metavar="NAME",
        help="Parquet INPUTs: the column holding the images (default: the first of image, jpg, png, img).",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of a table.")]
Revision = Annotated[
    str | None,
    typer.Option("--revision", help="Hub revision of a hub id: branch, tag or commit (default: main)."),
]


def model_source(model: str | None) -> str:
    """``--model``, else the environment variable, else the default model."""
    return model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL


def model_settings(model: str | None, num_crops: int | None) -> "tuple[VisionConfig, PreprocessConfig, str]":
    """The checkpoint's configs (``num_crops`` replaced when given) and a label for the model they came from.

    Only config files are read (:func:`phi3embed.core.checkpoint.resolve_configs`). With ``--num-crops`` and no
    explicit ``--model``, a model that cannot be found (e.g. a stale ``PHI3EMBED_MODEL``) is not an error:
    the released models' configuration is used, with a warning.
    """
    from dataclasses import replace

    from phi3embed.core.checkpoint import resolve_configs
    from phi3embed.core.config import PreprocessConfig, VisionConfig

    source = model_source(model)
    try:
        vision, pre = resolve_configs(source)
    except Phi3EmbedError as exc:
        if model is not None or num_crops is None:
            raise
        typer.echo(f"warning: {exc}; using the released models' configuration (hidden size 3072)", err=True)
        return VisionConfig(), PreprocessConfig(num_crops=num_crops), "released-model defaults"
    return vision, pre if num_crops is None else replace(pre, num_crops=num_crops), source


def measure_option(default: str) -> Any:
    """``--measure/--no-measure`` of ``info`` and ``plan`` (None when not given); ``default`` says what then."""
    return typer.Option(
        "--measure/--no-measure",
        help="Time one encoder layer of the checkpoint's shape in float32 and in bfloat16 on this CPU (random "
        f"weights, 1-2 s for the released models) to say what --dtype bfloat16 would give. Default: {default}.",
        show_default=False,
    )


def cpu_advice(vision: "VisionConfig", measure: bool | None, *, not_asked: str = "--no-measure") -> "Bf16Advice":
    """What ``--dtype bfloat16`` would give encode on this CPU, for ``vision``'s shape (``measure``: as
    :func:`phi3embed.core.cpu.bf16_advice` takes it); encode's ``--device auto`` runs on the CPU unless CUDA is
    available."""
    import torch

    from phi3embed.core.cpu import bf16_advice

    return bf16_advice(vision, measure=measure, on_cpu=not torch.cuda.is_available(), not_asked=not_asked)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
