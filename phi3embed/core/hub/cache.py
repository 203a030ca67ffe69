"""The phi3embed cache of vision-only checkpoints: where entries and refs lie, the lock per entry, writing an
entry atomically, and finding a model in it or complete in the Hugging Face cache (no network here).

Layout (``PHI3EMBED_CACHE``, default ``$HF_HOME/phi3embed``): ``models--owner--name/refs/<revision>`` (the
commit a branch or tag named when last seen online), ``<commit>/<part>/`` (one entry: ``vision`` or
``text``), ``.locks/<commit>-<part>.lock``. An entry is written in ``<commit>/.tmp-<part>-...`` beside its
final place, fsynced and renamed into place, so an entry that exists is complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

from phi3embed.core.hub import adapter
from phi3embed.core.layout import INDEX_FILE, SINGLE_FILE, select_keys

CACHE_ENV = "PHI3EMBED_CACHE"
ORIGIN_FILE = "phi3embed-origin.json"  # written last into an entry: where its bytes came from


def cache_root() -> Path:
    """``PHI3EMBED_CACHE``, else ``$HF_HOME/phi3embed`` (``~/.cache/huggingface/phi3embed`` by default)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(hf_home).expanduser() / "phi3embed"


def repo_folder(repo_id: str) -> Path:
    return cache_root() / ("models--" + repo_id.replace("/", "--"))


def entry_path(repo_id: str, commit: str, part: str) -> Path:
    return repo_folder(repo_id) / commit / part


def _ref_path(repo_id: str, revision: str) -> Path:
    return repo_folder(repo_id) / "refs" / quote(revision, safe="")


def _is_commit(revision: str | None) -> bool:
    return revision is not None and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def remember_ref(repo_id: str, revision: str | None, commit: str) -> None:
    """Keep ``revision -> commit`` for offline runs (best effort: a read-only cache still works online)."""
    name = revision or "main"
    if _is_commit(name):
        return
    path = _ref_path(repo_id, name)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.read_text().strip() == commit:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(commit)
        os.replace(tmp, path)


def offline_commit(repo_id: str, revision: str | None, cache_dir: str | None) -> str | None:
    """The commit a revision named when last seen online: ours, else the HF cache's refs/."""
    name = revision or "main"
    if _is_commit(name):
        return name
    ours = _ref_path(repo_id, name)
    if ours.is_file():
        return ours.read_text().strip()
    hf_ref = adapter.hf_cache_dir(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "refs" / name
    return hf_ref.read_text().strip() if hf_ref.is_file() else None


def fsync_path(path: Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _entry_lock(repo_id: str, commit: str, part: str) -> Iterator[None]:
    locks = repo_folder(repo_id) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{commit}-{part}.lock", "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def write_entry(repo_id: str, commit: str, part: str, fill: Callable[[Path], None]) -> Path:
    """The entry of ``part`` at ``commit``: ``fill(folder)`` writes it into a temporary folder (fsyncing what it
    writes), which is then renamed into place. Under the entry's lock: concurrent runs write it once, the
    others wait and use it. A temporary folder left by a killed run is removed first."""
    final = entry_path(repo_id, commit, part)
    with _entry_lock(repo_id, commit, part):
        if final.is_dir():  # another process wrote it while we waited
            return final
        parent = final.parent
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".tmp-{part}-*"):  # left by a killed fetch (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = parent / f".tmp-{part}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            fill(tmp)
            fsync_path(tmp, directory=True)
            os.rename(tmp, final)
            fsync_path(parent, directory=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def cached_entries(repo_id: str, commit: str, parts: list[str]) -> list[Path] | None:
    """The complete entries of ``parts`` at ``commit``, or None when one is missing."""
    entries = [entry_path(repo_id, commit, p) for p in parts]
    return entries if all((e / ORIGIN_FILE).is_file() for e in entries) else None


def hf_snapshot(repo_id: str, commit: str, cache_dir: str | None, vision: bool, text: bool) -> Path | None:
    """The HF cache snapshot of ``commit`` when it holds config.json and every weight file with wanted keys."""

    def cached(name: str) -> Path | None:
        return adapter.cached_file(repo_id, name, revision=commit, cache_dir=cache_dir)

    config = cached("config.json")
    if config is None:
        return None
    index = cached(INDEX_FILE)
    if index is not None:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        keys = select_keys(weight_map, vision=vision, text=text)
        names = sorted({weight_map[k] for k in keys})
    else:
        names = [SINGLE_FILE]
    if not names or any(cached(n) is None for n in names):
        return None
    return config.parent


def cached_configs(repo_id: str, commit: str, cache_dir: str | None, parts: tuple[str, ...]) -> Path | None:
    """A folder holding the config files of ``commit``: the HF cache's, else one of our entries'."""
    config = adapter.cached_file(repo_id, "config.json", revision=commit, cache_dir=cache_dir)
    if config is not None:
        return config.parent
    for part in parts:
        if (entry_path(repo_id, commit, part) / ORIGIN_FILE).is_file():
            return entry_path(repo_id, commit, part)
    return None
