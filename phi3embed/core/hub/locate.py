"""Locating a hub model: the caches first, then (one HEAD told the commit) a fetch or its plan.

For ``owner/name`` :func:`locate` finds, in this order:

1. a Hugging Face cache snapshot that holds the configs and every weight file with a needed tensor: used
   as it is (nothing copied);
2. an entry of the phi3embed cache for the repository's commit;
3. nothing: with ``fetch=True`` the needed tensors are read from the hub and written as a new entry;
   with ``fetch=False`` (``phi3embed info``) only the weight files' headers are read and a
   :class:`~.plan.FetchPlan` says what a fetch would move.

When the hub cannot be reached (or ``HF_HUB_OFFLINE=1``), the commit a revision named when last seen
online is looked up in the refs of both caches, and the model is found offline or the run stops with one
line saying what to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi3embed.core.hub import cache, remote
from phi3embed.core.hub.fetch import ByteCounter, fetch_part
from phi3embed.core.hub.plan import PARTS, FetchPlan, header_read_size, make_plan
from phi3embed.core.layout import INDEX_FILE, SINGLE_FILE, select_keys
from phi3embed.errors import CheckpointError


@dataclass
class HubModel:
    """Where a hub model's checkpoint lies, or what fetching it would read."""

    repo_id: str
    commit: str
    location: str  # "hub cache" (Hugging Face's, used in place), "phi3embed cache", or "hub" (not cached)
    config_dir: Path
    roots: list[Path]  # checkpoint folders holding the wanted tensors (empty when location is "hub")
    plan: FetchPlan | None = None  # set when something was, or would be, fetched
    bytes_fetched: int = 0  # weight-file bytes actually received by this call (headers and tensors)


def unreachable_message(repo_id: str, reason: str) -> str:
    """One line: why the hub is out of reach, that the model is not cached, and the ways out."""
    offline = reason == remote.OFFLINE_REASON
    first = (
        "offline mode (HF_HUB_OFFLINE=1) and the model is not in the Hugging Face or phi3embed cache"
        if offline
        else f"the hub cannot be reached ({reason}) and the model is not cached here"
    )
    return (
        f"{first}; pass a local checkpoint folder as --model, or run `phi3embed download {repo_id}` on a machine "
        f"with network (with {cache.CACHE_ENV} or HF_HOME on a disk this one sees)"
        + ("" if offline else ", then run with HF_HUB_OFFLINE=1")
    )


def locate(
    repo_id: str,
    *,
    revision: str | None = None,
    vision: bool = True,
    text: bool = False,
    cache_dir: str | None = None,
    fetch: bool = True,
) -> HubModel:
    """Find (or fetch, or plan the fetch of) the wanted tensors of ``repo_id`` at ``revision``."""
    parts = [p for p, on in zip(PARTS, (vision, text), strict=True) if on]
    try:
        commit = remote.probe_commit(repo_id, revision)
    except remote.HubUnreachable as why:
        seen = cache.offline_commit(repo_id, revision, cache_dir)
        found = None if seen is None else _cached_model(repo_id, seen, parts, cache_dir, vision, text)
        if found is None:
            raise CheckpointError(unreachable_message(repo_id, str(why)), path=repo_id) from None
        return found
    cache.remember_ref(repo_id, revision, commit)
    config_dir = _configs(repo_id, commit, cache_dir)
    cached = _cached_model(repo_id, commit, parts, cache_dir, vision, text)
    if cached is not None:
        return cached
    index = remote.download(repo_id, INDEX_FILE, commit, cache_dir, required=False)
    weight_map: dict[str, str] | None = None
    if index is not None:
        found_map: Any = json.loads(index.read_text()).get("weight_map")
        if not isinstance(found_map, dict):
            raise CheckpointError(f"{INDEX_FILE} has no weight_map", path=repo_id)
        weight_map = {str(k): str(v) for k, v in found_map.items()}
        names = sorted({weight_map[k] for k in select_keys(weight_map, vision=vision, text=text)})
    else:
        names = [SINGLE_FILE]
    files = [remote.remote_file(repo_id, name, commit) for name in names]
    plan = make_plan(repo_id, commit, files, parts, weight_map)
    headers_read = sum(header_read_size(f) for f in files)
    if not fetch:
        return HubModel(repo_id, commit, "hub", config_dir, [], plan, headers_read)
    counter = ByteCounter()
    roots = [fetch_part(repo_id, plan, part, config_dir, revision, counter) for part in parts]
    return HubModel(repo_id, commit, "phi3embed cache", roots[0], roots, plan, headers_read + counter.value)


def locate_configs(repo_id: str, *, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A folder holding the model's config files (no weights): the HF cache, a phi3embed entry, or fetched."""
    try:
        commit = remote.probe_commit(repo_id, revision)
    except remote.HubUnreachable as why:
        seen = cache.offline_commit(repo_id, revision, cache_dir)
        found = None if seen is None else cache.cached_configs(repo_id, seen, cache_dir, PARTS)
        if found is None:
            raise CheckpointError(unreachable_message(repo_id, str(why)), path=repo_id) from None
        return found
    cache.remember_ref(repo_id, revision, commit)
    return _configs(repo_id, commit, cache_dir)


def _configs(repo_id: str, commit: str, cache_dir: str | None) -> Path:
    """config.json (required) and preprocessor_config.json through hf_hub_download; their folder."""
    config = remote.download(repo_id, "config.json", commit, cache_dir, required=True)
    assert config is not None
    remote.download(repo_id, "preprocessor_config.json", commit, cache_dir, required=False)
    return config.parent


def _cached_model(
    repo_id: str, commit: str, parts: list[str], cache_dir: str | None, vision: bool, text: bool
) -> HubModel | None:
    """The model at ``commit`` from a cache, with no network: complete in the HF cache (used in place), else
    phi3embed's vision-only entries; None when neither has it."""
    snapshot = cache.hf_snapshot(repo_id, commit, cache_dir, vision, text)
    if snapshot is not None:
        return HubModel(repo_id, commit, "hub cache", snapshot, [snapshot])
    entries = cache.cached_entries(repo_id, commit, parts)
    if entries is not None:
        return HubModel(repo_id, commit, "phi3embed cache", entries[0], entries)
    return None
