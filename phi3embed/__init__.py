"""phi3embed: the exact image-token embeddings Phi-3-vision and Phi-3.5-vision feed their language model.

Names are imported lazily, so ``import phi3embed`` (and ``phi3embed --help``) does not pay for torch and
transformers until something that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from phi3embed.errors import (
    CheckpointError,
    ConfigError,
    DecompressionBombError,
    DeviceOutOfMemoryError,
    ImageError,
    MergeError,
    Phi3EmbedError,
    UnsupportedImageError,
)

__version__ = "0.1.0"

_LAZY = {
    "ClipConfig": "core.config",
    "PreprocessConfig": "core.config",
    "VisionConfig": "core.config",
    "Phi3VisionEmbedder": "core.embedder",
    "num_image_tokens": "core.hd",
    "HDGrid": "core.preprocess",
    "Preprocessed": "core.preprocess",
    "hd_grid": "core.preprocess",
    "preprocess_image": "core.preprocess",
    "load_text_embeddings": "core.prompt",
    "merge_image_embeddings": "core.prompt",
    "latest_records": "outputs.reader",
    "read": "outputs.reader",
    "open": "outputs.mapping:open_outputs",
    "EmbeddingStore": "outputs.mapping",
    "EmbeddingDataset": "outputs.dataset",
    "PaddedBatch": "outputs.dataset",
    "pad_collate": "outputs.dataset",
}

if TYPE_CHECKING:
    from phi3embed.core.config import ClipConfig, PreprocessConfig, VisionConfig
    from phi3embed.core.embedder import Phi3VisionEmbedder
    from phi3embed.core.hd import num_image_tokens
    from phi3embed.core.preprocess import HDGrid, Preprocessed, hd_grid, preprocess_image
    from phi3embed.core.prompt import load_text_embeddings, merge_image_embeddings
    from phi3embed.outputs.dataset import EmbeddingDataset, PaddedBatch, pad_collate
    from phi3embed.outputs.mapping import EmbeddingStore
    from phi3embed.outputs.mapping import open_outputs as open  # noqa: A004
    from phi3embed.outputs.reader import latest_records, read


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'phi3embed' has no attribute {name!r}")
    module, _, attr = where.partition(":")  # "module:attr" when the public name differs (open: no builtin shadowed)
    value = getattr(importlib.import_module(f"phi3embed.{module}"), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CheckpointError",
    "ClipConfig",
    "ConfigError",
    "DecompressionBombError",
    "DeviceOutOfMemoryError",
    "EmbeddingDataset",
    "EmbeddingStore",
    "HDGrid",
    "ImageError",
    "MergeError",
    "PaddedBatch",
    "Phi3EmbedError",
    "Phi3VisionEmbedder",
    "PreprocessConfig",
    "Preprocessed",
    "UnsupportedImageError",
    "VisionConfig",
    "__version__",
    "hd_grid",
    "latest_records",
    "load_text_embeddings",
    "merge_image_embeddings",
    "num_image_tokens",
    "open",
    "pad_collate",
    "preprocess_image",
    "read",
]
