"""Preparing one image for the encoder, the same way in every engine: read, sha256, decode + HD tiling.

Reading follows the file rules of :func:`phi3embed.core.preprocess.read_image_file`: only a regular file of at
most ``max_bytes`` is opened (a named pipe, socket or device is an error before any open), a file Pillow does not
identify from its header is not read further, and the bytes hashed are the bytes decoded (one read).

The local engine's worker processes and the Ray actors both call :meth:`Preparer.prepare`. A bad image never
raises: it gives a one-line error naming the file (an image that decodes but cannot be tiled still reports
its header size, which explains the failure). Time is counted in ONE clock, the preparing thread's CPU time
(wall time would count waiting for a busy core).
"""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass, replace

from phi3embed.core.config import PreprocessConfig
from phi3embed.core.preprocess import (
    MAX_FILE_BYTES,
    AlphaMode,
    Preprocessed,
    image_size_of,
    preprocess_image,
    read_image_file,
)
from phi3embed.errors import ImageError, UnsupportedImageError
from phi3embed.inputs.archives import Member, member_label, read_member
from phi3embed.inputs.listing import Source
from phi3embed.outputs.records import ImageFacts


@dataclass
class Prepared:
    """One image after reading: ``item`` for the encoder, or ``error`` (one line)."""

    facts: ImageFacts
    item: Preprocessed | None = None
    error: str | None = None
    seconds: float = 0.0  # CPU time spent reading and tiling


def header_size(data: bytes) -> tuple[int | None, int | None]:
    """Width and height from the image header, as ``plan`` reads them (None, None when there is none)."""
    try:
        return image_size_of(io.BytesIO(data), label="<bytes>")
    except Exception:
        return None, None


@dataclass(frozen=True)
class Preparer:
    """Source (or path + bytes) -> :class:`Prepared`. Plain data: pickled into worker processes."""

    config: PreprocessConfig
    alpha: AlphaMode = "drop"
    exif_transpose: bool = False
    max_bytes: int = MAX_FILE_BYTES  # larger files are refused from their size, unread

    def __call__(self, source: Source) -> Prepared:
        if source.member is None:
            return self.prepare(source.path)
        return self.prepare_member(source.path, source.member)

    def prepare_member(self, path: str, member: Member, *, archive_label: str | None = None) -> Prepared:
        """An image inside the archive at ``path`` (errors name it ``<archive_label>/<member path>``): its bytes
        prepared exactly as a loose file's bytes; the facts keep the archive's size and modification time (what
        resume compares) and the member's sha256."""
        start = time.thread_time()
        try:
            data, st = read_member(path, member, max_bytes=self.max_bytes, archive_label=archive_label)
        except ImageError as exc:
            return Prepared(ImageFacts(), error=str(exc), seconds=time.thread_time() - start)
        prepared = self.prepare(path, label=member_label(archive_label or path, member), data=data)
        prepared.facts = replace(prepared.facts, size=st.st_size, mtime_ns=st.st_mtime_ns)
        prepared.seconds = time.thread_time() - start
        return prepared

    def prepare(self, path: str, *, label: str | None = None, data: bytes | None = None) -> Prepared:
        """Read ``path`` (unless its ``data`` is given: then there is no modification time), hash, decode
        and tile it; errors name the file ``label`` (default: ``path``)."""
        label = label or path
        start = time.thread_time()
        facts = ImageFacts()
        try:
            mtime_ns = None
            if data is None:
                data, st = read_image_file(path, label=label, max_bytes=self.max_bytes)
                mtime_ns = st.st_mtime_ns
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
