"""Random names for the property tests of names the file system or a format cannot hold (tests/test_names.py,
tests/test_names_e2e.py): seeded, so a failure names the seed that reproduces it.

Names are bytes built from pieces that each break something: bytes that are not UTF-8, control characters,
multi-byte characters (a cut inside one must not give invalid UTF-8), runs long enough to pass 255 bytes,
endings that look like the hash of a shortened name, and characters shells and JSON treat specially.
"""

from __future__ import annotations

import os
import random

from phi3embed.inputs.archives import safe_inner
from phi3embed.inputs.listing import IMAGE_EXTENSIONS
from phi3embed.outputs.names import name_hash

PIECES: tuple[bytes, ...] = (
    b"a", b"Z", b"7", b"-", b"_", b" ", b".", b"~", b"'", b'"', b"\\", b":", b"%", b"*", b"?", b"[",
    "é".encode(), "日本".encode(), "😀".encode(), "\u2028".encode(),  # valid, several bytes each
    b"\xe9", b"\xff", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xf0\x9f",  # not UTF-8 (Latin-1, cut, surrogate)
    b"\n", b"\t", b"\r", b"\x01", b"\x1b", b"\x7f",  # control characters
)  # fmt: skip


def component(rng: random.Random, *, max_bytes: int = 255) -> bytes:
    """One path component: no ``/``, no NUL, never ``.`` or ``..``, not hidden, at most ``max_bytes`` bytes."""
    kind = rng.random()
    if kind < 0.15:  # long: near or past the 255-byte limit once a suffix is added
        body = rng.choice([b"L", "é".encode(), "日".encode(), b"\xe9"]) * rng.randint(60, 300)
    elif kind < 0.25:  # looks like a shortened name already
        body = b"x~" + name_hash(str(rng.random())).encode() + rng.choice([b"", b".png"])
    elif kind < 0.6:  # an ordinary name: stored as it is
        body = b"".join(rng.choice(PIECES[:20]) for _ in range(rng.randint(1, 12)))
    else:
        body = b"".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6)))
    body = body[:max_bytes].lstrip(b".") or b"n"
    return body


def image_name(rng: random.Random, *, depth: int = 3, max_bytes: int = 255) -> bytes:
    """A relative path of 1..``depth`` components whose last one ends with an image extension (in 255 bytes)."""
    parts = [component(rng, max_bytes=max_bytes) for _ in range(rng.randint(1, depth))]
    ext = rng.choice([b".png", b".jpg", b".PNG", b".webp"])
    parts[-1] = parts[-1][: max_bytes - len(ext)] + ext
    return b"/".join(parts)


def loose_names(seed: int, count: int) -> list[bytes]:
    """File names for a folder: distinct, no file is also a folder of another."""
    rng = random.Random(seed)
    names: list[bytes] = []
    files: set[bytes] = set()
    folders: set[bytes] = set()
    while len(names) < count:
        name = image_name(rng)
        parts = name.split(b"/")
        prefixes = {b"/".join(parts[:i]) for i in range(1, len(parts))}
        if name in files or name in folders or prefixes & files:
            continue
        names.append(name)
        files.add(name)
        folders |= prefixes
    return names


def member_names(seed: int, count: int) -> list[bytes]:
    """Tar member names: like file names, plus long ones (no 255-byte limit inside a tar) and some ``..``."""
    rng = random.Random(seed)
    names: list[bytes] = []
    seen: set[str] = set()
    while len(names) < count:
        name = image_name(rng, depth=4, max_bytes=600)
        if rng.random() < 0.1:  # a deep path past the output path budget
            name = b"/".join(b"D" * rng.randint(200, 255) for _ in range(14)) + b"/" + name
        if rng.random() < 0.05:
            name = b"../" + name  # leads outside DIR: an error record, as before
        inner = safe_inner(os.fsdecode(name))
        if inner is not None and inner in seen or any(inner and inner.startswith(s + "/") for s in seen):
            continue
        if inner is not None:
            seen.add(inner)
        names.append(name)
    return names


def parquet_keys(seed: int, count: int) -> list[bytes]:
    """Parquet keys: anything, NUL included; distinct after the listing's normalisation."""
    rng = random.Random(seed)
    keys: list[bytes] = []
    seen: set[str] = set()
    while len(keys) < count:
        key = b"\x00".join(image_name(rng, depth=2, max_bytes=400) for _ in range(rng.randint(1, 2)))
        inner = safe_inner(key.decode("utf-8", "surrogateescape"))
        if inner is None or inner in seen or any(inner.startswith(s + "/") or s.startswith(inner + "/") for s in seen):
            continue
        seen.add(inner)
        keys.append(key)
    return keys


def has_image_extension(name: bytes) -> bool:
    return os.path.splitext(os.fsdecode(name))[1].lower() in IMAGE_EXTENSIONS
