"""Preparing one image for the encoder, the same way in every engine: read, sha256, decode + HD tiling.

The local engine's worker processes and the Ray actors both call :meth:`Preparer.prepare`. A bad image never
raises: it gives a one-line error naming the file (an image that decodes but cannot be tiled still reports
its header size, which explains the failure). Time is counted in ONE clock, the preparing thread's CPU time
(wall time would count waiting for a busy core).
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass, replace

from PIL import Image

from phi3embed.core.config import PreprocessConfig
from phi3embed.core.preprocess import AlphaMode, Preprocessed, preprocess_image
from phi3embed.errors import ImageError, UnsupportedImageError
from phi3embed.inputs.listing import Source
from phi3embed.outputs.records import ImageFacts


@dataclass
class Prepared:
    """One image after reading: ``item`` for the encoder, or ``error`` (one line)."""

    facts: ImageFacts
    item: Preprocessed | None = None
    error: str | None = None
    seconds: float = 0.0  # CPU time spent reading and tiling


def read_source(path: str | os.PathLike[str], *, label: str | None = None) -> tuple[bytes, int]:
    """The file's bytes and modification time; failures are the one-line ImageErrors ``open_image`` gives,
    naming the file ``label`` (default: ``path``)."""
    path = os.fspath(path)
    label = label or path
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            return fh.read(), st.st_mtime_ns
    except IsADirectoryError:
        raise ImageError("is a directory, not an image file", path=label) from None
    except FileNotFoundError:
        raise ImageError("broken symbolic link" if os.path.islink(path) else "file not found", path=label) from None
    except PermissionError:
        raise ImageError("permission denied", path=label) from None
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}", path=label) from None


def header_size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height from the image header (None, None when there is none)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height
    except Exception:
        return None, None


@dataclass(frozen=True)
class Preparer:
    """Source (or path + bytes) -> :class:`Prepared`. Plain data: pickled into worker processes."""

    config: PreprocessConfig
    alpha: AlphaMode = "drop"
    exif_transpose: bool = False

    def __call__(self, source: Source) -> Prepared:
        return self.prepare(source.path)

    def prepare(self, path: str, *, label: str | None = None, data: bytes | None = None) -> Prepared:
        """Read ``path`` (unless its ``data`` is given: then there is no modification time), hash, decode
        and tile it; errors name the file ``label`` (default: ``path``)."""
        label = label or path
        start = time.thread_time()
        facts = ImageFacts()
        try:
            mtime_ns = None
            if data is None:
                data, mtime_ns = read_source(path, label=label)
            facts = ImageFacts(sha256=hashlib.sha256(data).hexdigest(), size=len(data), mtime_ns=mtime_ns)
            item = preprocess_image(data, self.config, alpha=self.alpha, exif_transpose=self.exif_transpose, name=label)
        except ImageError as exc:
            if isinstance(exc, UnsupportedImageError) and data:  # decoded fine: its size explains the failure
                width, height = header_size(data)
                facts = replace(facts, width=width, height=height)
            return Prepared(facts, error=str(exc), seconds=time.thread_time() - start)
        except Exception as exc:  # a decoder bug must not stop the job either
            error = " ".join(f"{label}: unexpected {type(exc).__name__} while reading: {exc}".split())
            return Prepared(facts, error=error, seconds=time.thread_time() - start)
        grid = item.grid
        facts = replace(
            facts,
            width=grid.width,
            height=grid.height,
            image_sizes=grid.image_sizes,
            crops=(grid.rows, grid.cols),
            num_tokens=item.num_tokens,
        )
        return Prepared(facts, item=item, seconds=time.thread_time() - start)
