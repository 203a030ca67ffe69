"""The manifest record, defined once: writers make it, the manifest stores it, the reader, resume and
``combine`` read it.

A :class:`Record` is one line of ``manifest.jsonl``. :meth:`Record.to_json` gives the fields in the order
they have always been written (old output folders resume, and the same inputs give the same bytes);
:meth:`Record.from_json` accepts any line an earlier version wrote. ``record["name"]`` reads a field as
``record.name`` does, so code that treated records as dicts (README: ``for record, tensor in
phi3embed.read(...)``) keeps working.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch

from phi3embed.core.stages import DEFAULT_STAGE, Stage, parse_stage
from phi3embed.errors import ConfigError
from phi3embed.inputs.listing import Source
from phi3embed.outputs.formats import OUTPUT_DTYPES, dtype_name
from phi3embed.outputs.names import from_bytes, text_fields

Format = Literal["npy", "safetensors", "pack"]
NO_STAGE: Literal["none"] = "none"  # encode --stage none: vectors only, no token matrices
StoredStage = Stage | Literal["none"]
Signature = tuple[Any, ...]  # what a finished record must match to be skipped on resume


@dataclass(frozen=True)
class OutputSettings:
    """Everything that determines the stored bytes (plus ``device``, recorded for information)."""

    model: str  # what the user passed: hub id, preset or path
    fingerprint: str  # of the vision weights (Phi3VisionEmbedder.fingerprint)
    num_crops: int
    dtype: torch.dtype  # stored
    compute_dtype: torch.dtype
    format: Format = "npy"
    pack_bytes: int | None = None  # target pack file size, only with format "pack"
    alpha: str = "drop"
    exif_transpose: bool = False
    device: str = "cpu"
    stage: StoredStage = DEFAULT_STAGE  # which intermediate is stored (phi3embed.core.stages); "none": none
    vectors: tuple[str, ...] = ()  # the vector kinds written beside it (phi3embed.outputs.vectors)

    def __post_init__(self) -> None:
        if self.dtype not in OUTPUT_DTYPES or self.compute_dtype not in OUTPUT_DTYPES:
            raise ConfigError("dtypes must be float32, float16 or bfloat16")
        if self.format == "npy" and self.dtype == torch.bfloat16:
            raise ConfigError("npy cannot store bfloat16: use --format safetensors, or --out-dtype float32/float16")
        if (self.format == "pack") != (self.pack_bytes is not None):
            raise ConfigError("pack_bytes goes with format 'pack' and only with it")
        if self.stage != NO_STAGE:
            parse_stage(self.stage)
        elif not self.vectors:
            raise ConfigError("--stage none stores no token matrices: it needs --vectors")

    def record_fields(self) -> dict[str, Any]:
        """The settings as a manifest record states them."""
        return {
            "dtype": dtype_name(self.dtype),
            "num_crops": self.num_crops,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "compute_dtype": dtype_name(self.compute_dtype),
            "format": self.format,
            "alpha": self.alpha,
            "exif_transpose": self.exif_transpose,
            "device": self.device,
            "stage": self.stage,
            "vector_kinds": list(self.vectors) or None,
        }

    def signature(self) -> Signature:
        """What a finished record must match to be skipped on resume (:meth:`Record.signature`)."""
        stated = self.record_fields()
        return _hashable(stated[name] for name in SIGNATURE_FIELDS)


#: The record fields a finished image must share with the current settings to be skipped on resume.
SIGNATURE_FIELDS = (
    "fingerprint", "num_crops", "dtype", "compute_dtype", "format", "alpha", "exif_transpose", "stage", "vector_kinds"
)  # fmt: skip
#: Record fields left out of a manifest line while they are None (lines stay as they were without vectors).
_OPTIONAL_FIELDS = ("vector_kinds", "vectors", "vector_row", "attempt", "time")


@dataclass(frozen=True)
class ImageFacts:
    """What was learnt about one source while reading it (any field may be unknown after a failure)."""

    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    width: int | None = None
    height: int | None = None
    image_sizes: tuple[int, int] | None = None  # (H', W')
    crops: tuple[int, int] | None = None  # (rows, cols)
    num_tokens: int | None = None

    def record_fields(self) -> dict[str, Any]:
        """The facts as a manifest record states them (sizes as JSON lists)."""
        fields_ = asdict(self)
        for pair in ("image_sizes", "crops"):
            fields_[pair] = list(fields_[pair]) if fields_[pair] else None
        return fields_


@dataclass(frozen=True)
class Record:
    """One manifest line: an image, the attempt's outcome, and the settings it was made with.

    Field order is the on-disk order. ``attempt`` and ``time`` are stamped when the manifest appends the
    record (:meth:`phi3embed.outputs.manifest.ManifestLog.append`); before that (e.g. inside a pack file's
    metadata) they are None and left out of the JSON.

    Text fields hold names exactly as the operating system gave them (``name`` may hold surrogate-escaped
    bytes that are not UTF-8: :mod:`phi3embed.outputs.names`). The JSON is always valid UTF-8: such a field is
    written in its readable form (``\\xNN`` for each such byte) and its exact bytes go, base64, into the
    object ``raw`` (``"raw": {"name": "Y2Fm6S5wbmc="}``), which :meth:`from_json` reads back.
    """

    name: str
    source: str
    status: str  # "ok" or "error"
    output: str | None
    key: str | None
    error: str | None
    width: int | None
    height: int | None
    image_sizes: list[int] | None
    crops: list[int] | None
    num_tokens: int | None
    shape: list[int] | None
    dtype: str
    num_crops: int | None
    model: str | None
    fingerprint: str | None
    compute_dtype: str | None
    format: str | None
    alpha: str | None
    exif_transpose: bool | None
    device: str | None
    sha256: str | None
    size: int | None
    mtime_ns: int | None
    stage: str = DEFAULT_STAGE  # lines written before stages existed hold projected tokens
    duplicate_of: str | None = None  # the image with the same bytes whose output this one shares (not encoded)
    output_size: int | None = None  # bytes of a per-image output file: resume and combine compare its size
    vector_kinds: list[str] | None = None  # the vectors written for it (encode --vectors)
    vectors: str | None = None  # the vector shard holding its row: DIR/vectors/<kind>/img_emb/<vectors>.npy
    vector_row: int | None = None  # its row there
    attempt: int | None = None
    time: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __getitem__(self, field: str) -> Any:
        """``record["name"]``: the dict-style access the reader has always offered."""
        if field not in _FIELDS:
            raise KeyError(field)
        return getattr(self, field)

    def signature(self) -> Signature:
        """The settings part of the record, comparable with :meth:`OutputSettings.signature`."""
        return _hashable(getattr(self, name) for name in SIGNATURE_FIELDS)

    def stamped(self, attempt: int, time: str) -> Record:
        return replace(self, attempt=attempt, time=time)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the manifest line (unstamped records leave out ``attempt`` and ``time``); text
        that is not valid UTF-8 in its readable form, its exact bytes in ``raw``."""
        data = {f: getattr(self, f) for f in _FIELDS}  # (asdict deep-copies: 2/3 of a record's encoding time)
        for late in _OPTIONAL_FIELDS:
            if data[late] is None:
                del data[late]
        return text_fields(data)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record | None:
        """A manifest line's object -> Record; None when it is not a record (no string ``name``)."""
        if not isinstance(data.get("name"), str):
            return None
        raw = data.get("raw")  # only lines with text that is not UTF-8 have it
        values = {f: exact_field(data, f) for f in _FIELDS} if raw else {f: data.get(f) for f in _FIELDS}
        values["stage"] = data.get("stage") or DEFAULT_STAGE  # a line from before stages existed
        return cls(**values)


_FIELDS = tuple(f.name for f in fields(Record))


def exact_field(data: dict[str, Any], field: str) -> Any:
    """``data[field]`` of a manifest line's object, with its exact bytes from ``raw`` when it has them there (a
    name that is not UTF-8); None when absent."""
    raw = data.get("raw")
    coded = raw.get(field) if isinstance(raw, dict) else None
    if isinstance(coded, str):
        try:
            return from_bytes(base64.b64decode(coded, validate=True))
        except (binascii.Error, ValueError):
            pass  # a damaged raw field: the readable form is all there is
    return data.get(field)


def _hashable(values: Iterable[Any]) -> Signature:
    """A signature tuple with lists (``vector_kinds``) as tuples, so that it can key a dict."""
    return tuple(tuple(v) if isinstance(v, list) else v for v in values)


def new_record(
    settings: OutputSettings,
    source: Source,
    facts: ImageFacts | None,
    *,
    status: str,
    output: str | None = None,
    key: str | None = None,
    shape: tuple[int, ...] | None = None,
    error: str | None = None,
    duplicate_of: str | None = None,
    output_size: int | None = None,
) -> Record:
    """The record of one attempt at ``source`` made with ``settings`` (not yet stamped)."""
    return Record(
        name=source.name,
        source=source.path,
        status=status,
        output=output,
        key=key,
        error=error,
        shape=list(shape) if shape is not None else None,
        duplicate_of=duplicate_of,
        output_size=output_size,
        **(facts or ImageFacts()).record_fields(),
        **settings.record_fields(),
    )


def error_record(settings: OutputSettings, source: Source, error: str, facts: ImageFacts | None = None) -> Record:
    """A failed attempt; ``error`` is folded into one line."""
    return new_record(settings, source, facts, status="error", error=" ".join(error.split()))
