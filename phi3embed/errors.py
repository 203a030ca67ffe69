"""Typed errors. Every message names the file (when there is one) and the reason, on one line."""

from __future__ import annotations

from pathlib import Path


class Phi3EmbedError(Exception):
    """Base class of every error phi3embed raises on purpose."""

    def __init__(self, reason: str, *, path: str | Path | None = None) -> None:
        self.reason = " ".join(str(reason).split())  # always one line
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {self.reason}" if self.path else self.reason)


class ConfigError(Phi3EmbedError):
    """config.json / preprocessor_config.json is missing, malformed or describes an unsupported model."""


class CheckpointError(Phi3EmbedError):
    """The weights cannot be found or do not match what the config describes."""


class ImageError(Phi3EmbedError):
    """One image cannot be read or cannot be tiled. Other images are unaffected."""


class DecompressionBombError(ImageError):
    """The image has more pixels than Pillow's safety limit allows."""


class UnsupportedImageError(ImageError):
    """The reference pipeline cannot tile this image (e.g. its resized height truncates to 0)."""


class MergeError(Phi3EmbedError, ValueError):
    """Prompt ids, image embeddings and the token-embedding table do not fit together (docs/pipeline.md §14).

    Also a ``ValueError``, so callers of the drop-in ``phi3embed.core.compat`` class can catch it as one.
    """


class DeviceOutOfMemoryError(Phi3EmbedError, MemoryError):
    """The device ran out of memory for one forward pass; a smaller batch size (crops per pass) fits.

    Also a ``MemoryError``, so generic out-of-memory handlers still recognise it.
    """
