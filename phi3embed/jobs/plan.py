"""Predict an encode job without running it: per image, the crop grid, token count, output size and cost.

``plan`` takes the sources encode would process (:func:`phi3embed.inputs.listing.expand_inputs`, then
``select_shard``), reads only image *headers* (:func:`phi3embed.core.preprocess.read_image_size`, the same
checks as encode's opening) and computes the geometry as encode does
(:func:`phi3embed.core.preprocess.image_geometry` under the checkpoint's configs). So every name it reports is
a name encode's manifest records, with the token count encode writes, and the output (or pack key) encode
stores it under: a name the file system or a format cannot hold as it is (too long, not UTF-8, control
characters) gets the storable form of :mod:`phi3embed.outputs.names`, and its row says why.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from phi3embed.core.config import PreprocessConfig, VisionConfig
from phi3embed.core.cost import crop_flops, image_flops, token_flops
from phi3embed.core.preprocess import MAX_FILE_BYTES, image_geometry, image_size_of, read_image_size
from phi3embed.core.stages import DEFAULT_STAGE, STAGES, Stage, stage_shape
from phi3embed.errors import ConfigError, ImageError
from phi3embed.inputs.archives import TarMember, read_member
from phi3embed.inputs.listing import Source
from phi3embed.outputs.names import output_path, pack_key, text_fields, unstorable_reason

#: The shape of each stage's output, in words (filled with the model's widths).
STAGE_SHAPES_IN_WORDS = {"projected": "[tokens, {D}]", "hd": "[tokens, {C4}]", "clip": "[crops, {P}, {C}]"}

#: Bytes per element of the stored output dtypes.
OUT_DTYPE_ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class PlanRow:
    """One image: its predicted geometry and cost, or the reason encode would fail on it."""

    name: str  # the name encode's manifest records (and its output file is named after)
    path: str  # what is opened
    width: int | None = None
    height: int | None = None
    rows: int | None = None
    cols: int | None = None
    image_sizes: tuple[int, int] | None = None  # (H', W')
    num_tokens: int | None = None
    bytes: int | None = None  # the chosen stage's array payload (npy/safetensors add a header)
    flops: int | None = None
    error: str | None = None
    shape: tuple[int, ...] | None = None  # of the chosen stage's output
    stage_bytes: dict[str, int] | None = None  # array payload of every stage (phi3embed.core.stages)
    output: str | None = None  # the per-image output encode writes, relative to DIR (None with packs)
    key: str | None = None  # the tensor key in a pack file (packs only)
    renamed: str | None = None  # why the name is not stored as it is (see phi3embed.outputs.names)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def crops(self) -> int | None:
        """CLIP crops encoded: the grid plus the global view."""
        return None if self.rows is None or self.cols is None else 1 + self.rows * self.cols

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON (valid UTF-8: a name that is not has its exact bytes in ``raw``, as in the manifest)."""
        row = {
            "name": self.name,
            "path": self.path,
            "output": self.output,
            "key": self.key,
            "renamed": self.renamed,
            "status": "ok" if self.ok else "error",
            "error": self.error,
            "width": self.width,
            "height": self.height,
            "crops_grid": None if self.rows is None else [self.rows, self.cols],
            "crops": self.crops,
            "image_sizes": None if self.image_sizes is None else list(self.image_sizes),
            "num_tokens": self.num_tokens,
            "shape": None if self.shape is None else list(self.shape),
            "bytes": self.bytes,
            "bytes_by_stage": self.stage_bytes,
            "gflop": None if self.flops is None else round(self.flops / 1e9, 3),
        }
        return text_fields(row)


@dataclass(frozen=True)
class PlanTotals:
    images: int
    ok: int
    errors: int
    renamed: int  # images stored under another name than their own (PlanRow.renamed)
    crops: int
    num_tokens: int
    bytes: int
    flops: int
    stage_bytes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = asdict(self)
        out["bytes_by_stage"] = out.pop("stage_bytes")
        out["gflop"] = round(out.pop("flops") / 1e9, 3)
        return out


class PlanTally:
    """The totals of a plan, counted one row at a time: O(1) memory whatever the number of images."""

    def __init__(self) -> None:
        self.images = self.ok = self.errors = self.renamed = 0
        self.crops = self.num_tokens = self.bytes = self.flops = 0
        self.stage_bytes: dict[str, int] = dict.fromkeys(STAGES, 0)

    def add(self, row: PlanRow) -> None:
        self.images += 1
        if not row.ok:
            self.errors += 1
            return
        self.ok += 1
        self.renamed += row.renamed is not None
        self.crops += row.crops or 0
        self.num_tokens += row.num_tokens or 0
        self.bytes += row.bytes or 0
        self.flops += row.flops or 0
        for st, size in (row.stage_bytes or {}).items():
            self.stage_bytes[st] += size

    def totals(self) -> PlanTotals:
        return PlanTotals(
            images=self.images,
            ok=self.ok,
            errors=self.errors,
            renamed=self.renamed,
            crops=self.crops,
            num_tokens=self.num_tokens,
            bytes=self.bytes,
            flops=self.flops,
            stage_bytes=dict(self.stage_bytes),
        )


@dataclass(frozen=True)
class PlanSettings:
    """What every row of a plan is computed under (the document's ``settings``), known before any image."""

    num_crops: int
    out_dtype: str
    hidden_size: int
    layers_run: int
    layers_total: int
    flops_per_crop: int
    flops_per_token: int
    stage: Stage = DEFAULT_STAGE
    output: str = "[tokens, D]"  # the chosen stage's shape, in words

    def settings_dict(self) -> dict[str, Any]:
        return {
            "num_crops": self.num_crops,
            "stage": self.stage,
            "output": self.output,
            "out_dtype": self.out_dtype,
            "hidden_size": self.hidden_size,
            "clip_layers_run": self.layers_run,
            "clip_layers_total": self.layers_total,
            "gflop_per_crop": round(self.flops_per_crop / 1e9, 3),
            "mflop_per_token": round(self.flops_per_token / 1e6, 3),
        }


@dataclass(frozen=True, kw_only=True)
class PlanResult(PlanSettings):
    """A plan: its settings, its totals, the rows kept (all of them unless :func:`plan` was told to keep at
    most so many) and the first error and renamed rows (all of them unless told otherwise)."""

    rows: list[PlanRow]
    totals: PlanTotals
    rows_omitted: int = 0  # images whose rows were not kept (0, or every image: rows are kept whole or not at all)
    first_errors: list[PlanRow] = field(default_factory=list)  # the first rows with an error, in input order
    first_renamed: list[PlanRow] = field(default_factory=list)  # the first ok rows with ``renamed`` set

    def to_dict(self) -> dict[str, Any]:
        """The document: ``settings``, ``images`` (the rows; left out, with ``rows_omitted``, when not kept)
        and ``totals``."""
        doc: dict[str, Any] = {"settings": self.settings_dict()}
        if self.rows_omitted:
            doc["rows_omitted"] = self.rows_omitted
        else:
            doc["images"] = [r.to_dict() for r in self.rows]
        doc["totals"] = self.totals.to_dict()
        return doc


#: How much of a tar member ``plan`` reads first: image headers (EXIF included) nearly always fit.
HEAD_BYTES = 64 * 1024


def _image_size(source: Source, *, exif_transpose: bool) -> tuple[int, int]:
    """A loose file's size from its header; an archive member's from its bytes, read as encode reads them: a tar
    member's first :data:`HEAD_BYTES` only, unless its header does not fit in them."""
    member = source.member
    if member is None:
        return read_image_size(source.path, exif_transpose=exif_transpose)
    if isinstance(member, TarMember) and not member.error and HEAD_BYTES < member.size <= MAX_FILE_BYTES:
        head, _ = read_member(source.path, replace(member, size=HEAD_BYTES), max_bytes=MAX_FILE_BYTES)
        with contextlib.suppress(ImageError):
            return image_size_of(io.BytesIO(head), label=source.label, exif_transpose=exif_transpose)
    data, _ = read_member(source.path, member, max_bytes=MAX_FILE_BYTES)
    return image_size_of(io.BytesIO(data), label=source.label, exif_transpose=exif_transpose)


def plan_row(
    source: Source,
    *,
    vision: VisionConfig,
    preprocess: PreprocessConfig,
    itemsize: int,
    exif_transpose: bool,
    stage: Stage = DEFAULT_STAGE,
    output_format: str = "npy",
) -> PlanRow:
    """One source's row: its header read, its geometry computed; an ImageError becomes the row's error."""
    if output_format == "pack":
        stored: dict[str, Any] = {"key": pack_key(source.name), "renamed": unstorable_reason(source.name, None)}
    else:
        suffix = f".{output_format}"
        stored = {"output": output_path(source.name, suffix), "renamed": unstorable_reason(source.name, suffix)}
    try:
        width, height = _image_size(source, exif_transpose=exif_transpose)
        grid, tokens = image_geometry(width=width, height=height, cfg=preprocess)
    except ImageError as exc:
        error = str(exc) if exc.path else f"{source.path}: {exc.reason}"
        return PlanRow(name=source.name, path=source.path, error=error, **stored)
    shapes = {st: stage_shape(st, rows=grid.rows, cols=grid.cols, cfg=vision) for st in STAGES}
    sizes: dict[str, int] = {st: math.prod(shape) * itemsize for st, shape in shapes.items()}
    return PlanRow(
        name=source.name,
        path=source.path,
        width=width,
        height=height,
        rows=grid.rows,
        cols=grid.cols,
        image_sizes=grid.image_sizes,
        num_tokens=tokens,
        bytes=sizes[stage],
        flops=image_flops(vision, rows=grid.rows, cols=grid.cols),
        shape=shapes[stage],
        stage_bytes=sizes,
        **stored,
    )


def plan_settings(
    *, vision: VisionConfig, preprocess: PreprocessConfig, out_dtype: str = "float32", stage: Stage = DEFAULT_STAGE
) -> PlanSettings:
    """The settings a plan runs under; ConfigError for a preprocessing geometry the model does not have or an
    unknown dtype."""
    if preprocess.crop_size != vision.clip.image_size or preprocess.patch_size != vision.clip.patch_size:
        raise ConfigError(
            f"preprocess geometry {preprocess.crop_size}/{preprocess.patch_size} differs from the vision config's "
            f"{vision.clip.image_size}/{vision.clip.patch_size} (crop size / patch size)"
        )
    if out_dtype not in OUT_DTYPE_ITEMSIZE:
        raise ConfigError(f"out dtype {out_dtype!r} is not one of {', '.join(OUT_DTYPE_ITEMSIZE)}")
    return PlanSettings(
        num_crops=preprocess.num_crops,
        out_dtype=out_dtype,
        hidden_size=vision.lm_hidden_size,
        layers_run=vision.layers_needed,
        layers_total=vision.clip.num_hidden_layers,
        flops_per_crop=crop_flops(vision.clip, layers=vision.layers_needed),
        flops_per_token=token_flops(vision),
        stage=stage,
        output=STAGE_SHAPES_IN_WORDS[stage].format(
            D=vision.lm_hidden_size, C4=vision.merged_dim, C=vision.clip.hidden_size, P=vision.clip.grid**2
        ),
    )


def plan(
    sources: Iterable[Source],
    *,
    vision: VisionConfig,
    preprocess: PreprocessConfig,
    out_dtype: str = "float32",
    exif_transpose: bool = False,
    stage: Stage = DEFAULT_STAGE,
    output_format: str = "npy",
    keep_rows: int | None = None,
    keep_notes: int | None = None,
    on_row: Callable[[PlanRow], None] | None = None,
) -> PlanResult:
    """Predict, per source, what encoding it would produce and cost; read headers only.

    ``vision`` and ``preprocess`` are the checkpoint's configs (``preprocess.num_crops`` already the one
    encode would use): crop and patch size, layers run, projection and output width. Unreadable or
    untileable images become rows with ``error`` set. ``output_format`` (``npy``, ``safetensors``, ``pack``)
    decides the outputs (and pack keys) the rows name.

    One pass over ``sources`` (any iterable: a lazy listing is read once, in order); the totals are counted
    as the rows are made. ``keep_rows``: the rows are kept while there are at most that many images; past
    it none is (``rows_omitted`` counts them), so memory stays bounded whatever the input. ``keep_notes``:
    how many of the first error rows and renamed rows are kept (their totals count them all). None keeps
    everything. ``on_row`` sees every row as it is made, in input order (to stream them out).
    """
    settings = plan_settings(vision=vision, preprocess=preprocess, out_dtype=out_dtype, stage=stage)
    itemsize = OUT_DTYPE_ITEMSIZE[out_dtype]
    tally = PlanTally()
    rows: list[PlanRow] = []
    first_errors: list[PlanRow] = []
    first_renamed: list[PlanRow] = []
    for source in sources:
        row = plan_row(
            source,
            vision=vision,
            preprocess=preprocess,
            itemsize=itemsize,
            exif_transpose=exif_transpose,
            stage=stage,
            output_format=output_format,
        )
        tally.add(row)
        if on_row is not None:
            on_row(row)
        if keep_rows is None or tally.images <= keep_rows:
            rows.append(row)
        elif rows:
            rows = []  # past keep_rows: none is kept (a partial table would read as the whole job)
        if not row.ok and (keep_notes is None or len(first_errors) < keep_notes):
            first_errors.append(row)
        elif row.ok and row.renamed and (keep_notes is None or len(first_renamed) < keep_notes):
            first_renamed.append(row)
    omitted = tally.images if keep_rows is not None and tally.images > keep_rows else 0
    return PlanResult(
        **{f.name: getattr(settings, f.name) for f in fields(PlanSettings)},
        rows=rows,
        totals=tally.totals(),
        rows_omitted=omitted,
        first_errors=first_errors,
        first_renamed=first_renamed,
    )
