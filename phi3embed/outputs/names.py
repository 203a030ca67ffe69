"""Names the file system or a format cannot hold: the one place that turns an image's name into something
storable (an output path, a pack key, UTF-8 text) without losing it.

An image's name (:attr:`phi3embed.inputs.listing.Source.name`) is a Python ``str`` as the operating system
gives it: bytes that are not valid UTF-8 (a Latin-1 file name on an old server, a tar member written on
Windows, a binary parquet key) are kept as lone surrogates (``os.fsdecode``, "surrogateescape"), so
:func:`exact_bytes` gives the name's bytes back exactly. The name stays the image's identity everywhere
(manifest, resume, dedup, ``combine``, ``--shard``, ``phi3embed.open``); only what is *stored* changes:

* :func:`output_path`: the per-image output inside DIR. Each path component is kept as it is when it is valid
  UTF-8 without control characters and fits the file system's 255 bytes (the last one with ``.npy`` /
  ``.safetensors`` added); any other component becomes ``<readable part>~<16 hex digits><extension>``: a
  shortened, cleaned prefix, a hash of the component's exact bytes, and the image extension (``.png``) when
  there is a clean one. A path longer than :data:`PATH_BUDGET` bytes keeps its leading folders while they
  fit and folds the rest into one such component. A kept component never ends like a replaced one (a real
  name that does is replaced too), so two names never share an output. (``..``, ``.`` and empty components are left as
  they are, for :meth:`phi3embed.outputs.publish.Publisher.safe_path` to refuse: the listing never names one.)
* :func:`pack_key`: a pack file's tensor key: the name itself when it is valid UTF-8, else its readable form
  plus ``~`` and the hash.
* :func:`readable`: UTF-8 text for JSON, safetensors metadata and messages: undecodable bytes as ``\\xNN``.
  The manifest keeps the exact bytes of such a field beside it (:mod:`phi3embed.outputs.records`).

:func:`unstorable_reason` says why a name is not stored as it is (``plan`` reports it beforehand).
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

NAME_MAX = 255  #: bytes in one path component (ext4, xfs, btrfs, tmpfs, zfs)
#: bytes of an output path inside DIR: Linux's PATH_MAX is 4096 for DIR and this path together, so DIR itself
#: may take up to 1023 bytes. (Output names must not depend on where DIR is: parts of a job in other folders,
#: ``plan`` and ``combine`` must all find the same name.)
PATH_BUDGET = 3072
HASH_HEX = 16  # hex digits of the hash in a replaced component (64 bits of blake2b)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MARK = re.compile(rf"~[0-9a-f]{{{HASH_HEX}}}(\.[^/]*)?\Z")  # how a replaced component ends
_KEY_MARK = re.compile(rf"~[0-9a-f]{{{HASH_HEX}}}\Z")  # how a replaced pack key ends
_CLEAN_EXT = re.compile(r"\.[A-Za-z0-9]{1,15}\Z")
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f/\ud800-\udfff]")


def exact_bytes(text: str) -> bytes:
    """The bytes ``text`` stands for: UTF-8, with surrogate-escaped bytes (``os.fsdecode``) given back as they
    were; any other lone surrogate (from a hand-written JSON ``\\udXXX`` escape) as its own three bytes."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def from_bytes(raw: bytes) -> str:
    """Bytes -> the ``str`` Python's ``os`` functions use for them (inverse of :func:`exact_bytes`)."""
    return raw.decode("utf-8", "surrogateescape")


def is_text(text: str) -> bool:
    """True when ``text`` is valid Unicode (no lone surrogate): it can be written as UTF-8 as it is."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def readable(text: str) -> str:
    """``text`` as valid UTF-8 text: each byte that is not UTF-8 written as ``\\xNN`` (``text`` itself when it is
    valid). For people and for formats that need UTF-8; not reversible (the exact bytes are kept elsewhere)."""
    return text if is_text(text) else exact_bytes(text).decode("utf-8", "backslashreplace")


def printable(text: str) -> str:
    """``text`` for a line people read: :func:`readable`, and control characters as ``\\xNN`` too."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", readable(text))


def text_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A JSON object (one level) made valid UTF-8: each string field that is not valid UTF-8 in its
    :func:`readable` form, and its exact bytes, base64, in ``data["raw"][field]`` (what manifest records and
    ``plan --json`` rows write; :func:`phi3embed.outputs.records.exact_field` reads it back)."""
    raw = {}
    out = dict(data)
    for key, value in data.items():
        if isinstance(value, str) and not is_text(value):
            raw[key] = base64.b64encode(exact_bytes(value)).decode("ascii")
            out[key] = readable(value)
    if raw:
        out["raw"] = raw
    return out


def readable_json(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings...) with every string in its :func:`readable` form, so that
    ``json.dumps`` of it is valid UTF-8 JSON (a lone surrogate would be written as an invalid ``\\udcXX``)."""
    if isinstance(value, str):
        return readable(value)
    if isinstance(value, dict):
        return {readable_json(k): readable_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [readable_json(v) for v in value]
    return value


def name_hash(text: str) -> str:
    """16 hex digits of a hash of ``text``'s exact bytes."""
    return hashlib.blake2b(exact_bytes(text), digest_size=HASH_HEX // 2).hexdigest()


def _nbytes(text: str) -> int:
    return len(exact_bytes(text))


def _kept(component: str, suffix: str) -> bool:
    """True when ``component`` (+ ``suffix``) is stored as it is."""
    if component in ("", ".", ".."):
        return True  # left for the publisher to refuse: a name that leads out of DIR is an error, never renamed
    return (
        is_text(component)
        and not _CONTROL.search(component)
        and not _MARK.search(component)
        and len(component.encode()) + len(suffix) <= NAME_MAX
    )


def _replaced(text: str, suffix: str) -> str:
    """The storable component for ``text`` (a component, or a folded tail with ``/``): readable prefix, hash,
    clean extension, ``suffix``; at most :data:`NAME_MAX` bytes."""
    ext_match = _CLEAN_EXT.search(text)
    ext = ext_match.group(0) if ext_match and ext_match.start() > 0 else ""
    stem = text[: len(text) - len(ext)]
    tag = f"~{name_hash(text)}{ext}{suffix}"
    room = NAME_MAX - len(tag.encode())
    prefix = _UNSAFE_CHARS.sub("_", stem).encode()[:room].decode("utf-8", "ignore")  # cut at a character
    return prefix + tag


def output_path(name: str, suffix: str) -> str:
    """The per-image output of ``name`` relative to DIR, ``suffix`` (``".npy"``) included: ``name + suffix``
    when the file system holds it as it is, else the storable form of the module docstring."""
    parts = name.split("/")
    last = len(parts) - 1
    out = [p + suffix * (i == last) if _kept(p, suffix * (i == last)) else _replaced(p, suffix * (i == last))
           for i, p in enumerate(parts)]  # fmt: skip
    path = "/".join(out)
    if len(path.encode()) <= PATH_BUDGET:
        return path
    kept: list[str] = []  # leading folders while one full component still fits after them
    used = 0
    for component in out[:-1]:
        used += len(component.encode()) + 1
        if used + NAME_MAX > PATH_BUDGET:
            break
        kept.append(component)
    return "/".join([*kept, _replaced("/".join(parts[len(kept) :]), suffix)])


def pack_key(name: str) -> str:
    """The tensor key of ``name`` in a pack file: the name when it is valid UTF-8 (and does not end like a
    replaced key), else ``<readable name>~<hash>``."""
    return name if is_text(name) and not _KEY_MARK.search(name) else f"{readable(name)}~{name_hash(name)}"


def unstorable_reason(name: str, suffix: str | None) -> str | None:
    """Why ``name`` is not stored under ``name + suffix`` (``suffix`` None: as a pack key), None when it is:
    the first reason that applies."""
    if suffix is None:
        return None if pack_key(name) == name else "not valid UTF-8" if not is_text(name) else "ends like a hash"
    if output_path(name, suffix) == name + suffix:
        return None
    parts = name.split("/")
    if not is_text(name):
        return "not valid UTF-8"
    if _CONTROL.search(name):
        return "control characters"
    if any(len(p.encode()) + len(suffix) * (i == len(parts) - 1) > NAME_MAX for i, p in enumerate(parts)):
        return f"a part longer than {NAME_MAX} bytes"
    if any(_MARK.search(p) for p in parts):
        return "ends like a hash"
    return f"longer than {PATH_BUDGET} bytes"
