"""Hub ids: configs through ``hf_hub_download``, the needed tensors by HTTP range reads, a vision-only cache.

For ``owner/name`` (see docs/pipeline.md §13 for the real layout) :func:`locate` finds, in this order:

1. a Hugging Face cache snapshot that holds the configs and every weight file with a needed tensor: used
   as it is (nothing copied);
2. an entry of the phi3embed cache for the repository's commit (below);
3. nothing: with ``fetch=True`` the needed tensors are read from the hub and written as a new entry;
   with ``fetch=False`` (``phi3embed info``) only the weight files' headers are read and a
   :class:`FetchPlan` says what a fetch would move.

Network: one HEAD of ``config.json`` (short connect timeout, no retries, huggingface_hub's warnings
silenced) tells the commit, or that the hub cannot be reached; then everything is found offline or the
run stops with one line saying what to do. ``HF_HUB_OFFLINE=1`` skips the HEAD. Configs and the index come
through ``hf_hub_download`` pinned to that commit; weight files through ranged GETs on huggingface_hub's
own HTTP client and headers (token, ``HF_ENDPOINT``, proxies, user agent): first each file's safetensors
header, then only the byte ranges of the needed tensors, coalesced (gaps merged only while they waste at
most 2% of the payload), split into pieces of at most 64 MiB, four in flight. Every answer must be a 206
with exactly the asked range; a server that ignores Range stops the fetch (it never downloads the whole
file behind our back).

The cache (``PHI3EMBED_CACHE``, default ``$HF_HOME/phi3embed``, i.e. ``~/.cache/huggingface/phi3embed``)::

    models--owner--name/
      refs/main                      commit sha that "main" had when last seen online (like the HF cache)
      <commit>/vision/               config.json, preprocessor_config.json, model.safetensors (vision tensors
                                     in their stored dtype), phi3embed-origin.json (repo, commit, weight
                                     files with etags and sizes, bytes fetched)
      <commit>/text/                 the same with only the token-embedding table (load_text_embeddings)
      .locks/                        one lock per entry: concurrent runs fetch once, the others wait

An entry is keyed by repository and commit (a commit fixes every file's etag; the etags are recorded and
compared when an entry is written again). It is written in ``<commit>/.tmp-<part>-...`` beside its final
place, fsynced and renamed into place, so an entry that exists is complete; a killed fetch leaves only
the temporary folder, removed by the next fetch of that entry, which starts over. Entries are never
modified; a new commit gets a new entry, and deleting the folder is always safe.

The package, one concern per module: :mod:`.adapter` (what phi3embed uses of huggingface_hub, for each of its
generations), :mod:`.remote` (what we ask the hub, and its errors as one line), :mod:`.plan` (weight files and
the byte ranges to fetch), :mod:`.cache` (entries, refs, locks, atomic writing), :mod:`.fetch` (a plan carried
out into an entry), :mod:`.locate` (the caches first, then a fetch or its plan).
"""

from phi3embed.core.hub.cache import CACHE_ENV, ORIGIN_FILE, cache_root
from phi3embed.core.hub.locate import HubModel, locate, locate_configs, unreachable_message
from phi3embed.core.hub.plan import (
    GAP_BUDGET,
    HEADER_PROBE,
    MAX_GAP,
    MAX_REQUEST,
    FetchPlan,
    RemoteFile,
    header_read_size,
    plan_ranges,
)

__all__ = [
    "CACHE_ENV",
    "GAP_BUDGET",
    "HEADER_PROBE",
    "MAX_GAP",
    "MAX_REQUEST",
    "ORIGIN_FILE",
    "FetchPlan",
    "HubModel",
    "RemoteFile",
    "cache_root",
    "header_read_size",
    "locate",
    "locate_configs",
    "plan_ranges",
    "unreachable_message",
]
