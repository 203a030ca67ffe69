"""phi3embed: the exact image-token embeddings Phi-3-vision and Phi-3.5-vision feed their language model.

Names are imported lazily, so ``import phi3embed`` (and ``phi3embed --help``) does not pay for torch and
transformers until something that needs them is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
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
    "ClipConfig": "config",
    "PreprocessConfig": "config",
    "VisionConfig": "config",
    "Phi3VisionEmbedder": "embedder",
    "num_image_tokens": "hd",
    "HDGrid": "preprocess",
    "Preprocessed": "preprocess",
    "hd_grid": "preprocess",
    "preprocess_image": "preprocess",
    "load_text_embeddings": "merge",
    "merge_image_embeddings": "merge",
    "latest_records": "reader",
    "read": "reader",
}

if TYPE_CHECKING:
    from .config import ClipConfig, PreprocessConfig, VisionConfig
    from .embedder import Phi3VisionEmbedder
    from .hd import num_image_tokens
    from .merge import load_text_embeddings, merge_image_embeddings
    from .preprocess import HDGrid, Preprocessed, hd_grid, preprocess_image
    from .reader import latest_records, read


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'phi3embed' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
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
    "HDGrid",
    "ImageError",
    "MergeError",
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
    "preprocess_image",
    "read",
]
