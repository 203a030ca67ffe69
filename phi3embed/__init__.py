"""phi3embed: the exact image-token embeddings Phi-3-vision and Phi-3.5-vision feed their language model."""

from .config import ClipConfig, PreprocessConfig, VisionConfig
from .embedder import Phi3VisionEmbedder
from .errors import (
    CheckpointError,
    ConfigError,
    DecompressionBombError,
    ImageError,
    MergeError,
    Phi3EmbedError,
    UnsupportedImageError,
)
from .hd import num_image_tokens
from .merge import load_text_embeddings, merge_image_embeddings
from .preprocess import HDGrid, Preprocessed, hd_grid, preprocess_image

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ClipConfig",
    "ConfigError",
    "DecompressionBombError",
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
    "load_text_embeddings",
    "merge_image_embeddings",
    "num_image_tokens",
    "preprocess_image",
]
