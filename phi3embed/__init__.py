"""phi3embed: the exact image-token embeddings Phi-3-vision and Phi-3.5-vision feed their language model.

Names are imported on first use (PEP 562), so that ``import phi3embed.cli`` (the ``phi3embed --help``
path) and worker processes do not pay for torch and transformers until they need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": ".errors",
    "ClipConfig": ".config",
    "ConfigError": ".errors",
    "DecompressionBombError": ".errors",
    "HDGrid": ".preprocess",
    "ImageError": ".errors",
    "Phi3EmbedError": ".errors",
    "Phi3VisionEmbedder": ".embedder",
    "PreprocessConfig": ".config",
    "Preprocessed": ".preprocess",
    "UnsupportedImageError": ".errors",
    "VisionConfig": ".config",
    "hd_grid": ".preprocess",
    "latest_records": ".reader",
    "num_image_tokens": ".hd",
    "preprocess_image": ".preprocess",
    "read": ".reader",
}

__all__ = [
    "__version__",
    "CheckpointError",
    "ClipConfig",
    "ConfigError",
    "DecompressionBombError",
    "HDGrid",
    "ImageError",
    "Phi3EmbedError",
    "Phi3VisionEmbedder",
    "PreprocessConfig",
    "Preprocessed",
    "UnsupportedImageError",
    "VisionConfig",
    "hd_grid",
    "latest_records",
    "num_image_tokens",
    "preprocess_image",
    "read",
]

if TYPE_CHECKING:
    from .config import ClipConfig, PreprocessConfig, VisionConfig
    from .embedder import Phi3VisionEmbedder
    from .errors import (
        CheckpointError,
        ConfigError,
        DecompressionBombError,
        ImageError,
        Phi3EmbedError,
        UnsupportedImageError,
    )
    from .hd import num_image_tokens
    from .preprocess import HDGrid, Preprocessed, hd_grid, preprocess_image
    from .reader import latest_records, read


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'phi3embed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
