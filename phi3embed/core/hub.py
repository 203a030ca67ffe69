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
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from phi3embed.core.checkpoint import CONFIG_FILES, INDEX_FILE, SINGLE_FILE, select_keys
from phi3embed.core.safetensors_io import (
    LENGTH_BYTES,
    SafetensorsFormatError,
    TensorInfo,
    encode_header,
    header_length,
    parse_header,
)
from phi3embed.errors import CheckpointError

CACHE_ENV = "PHI3EMBED_CACHE"
ORIGIN_FILE = "phi3embed-origin.json"
PARTS = ("vision", "text")
HEADER_PROBE = 64 * 1024  # first read of a weight file: the length and, usually, the whole JSON header
MAX_GAP = 1 << 20  # never merge across a gap larger than this
GAP_BUDGET = 0.02  # merged gaps may add at most this fraction of the payload
MAX_REQUEST = 64 << 20  # bytes per ranged GET
IN_FLIGHT = 4
CONNECT_TIMEOUT = 3.0
READ_ATTEMPTS = 3  # per range, resuming where the previous attempt stopped
OFFLINE_REASON = "HF_HUB_OFFLINE is set"


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


# --------------------------------------------------------------------------- what a fetch reads


@dataclass(frozen=True)
class RemoteFile:
    """One weight file on the hub, as its HEAD and its safetensors header describe it."""

    name: str
    url: str  # where ranged GETs go (the resolve URL, or the CDN location it redirects to)
    headers: dict[str, str] = field(repr=False)
    etag: str | None
    size: int
    header_bytes: int  # 8 + the JSON header's length
    tensors: dict[str, TensorInfo] = field(repr=False)  # TensorInfo.file is Path(name)


@dataclass(frozen=True)
class FetchPlan:
    """What fetching the needed tensors of a commit moves: per part (one cache entry each), the keys and, per
    weight file, the coalesced byte ranges to GET."""

    commit: str
    files: list[RemoteFile]
    keys: dict[str, list[str]]  # part -> keys, in file order
    ranges: dict[str, dict[str, list[tuple[int, int]]]]  # part -> weight file name -> [start, end) to GET

    def _info(self, key: str) -> TensorInfo:
        return next(f.tensors[key] for f in self.files if key in f.tensors)

    @property
    def tensor_bytes(self) -> int:
        """Payload of the needed tensors."""
        return sum(self._info(k).nbytes for ks in self.keys.values() for k in ks)

    @property
    def header_bytes(self) -> int:
        return sum(header_read_size(f) for f in self.files)

    @property
    def range_bytes(self) -> int:
        return sum(e - s for by_file in self.ranges.values() for rs in by_file.values() for s, e in rs)

    @property
    def fetch_bytes(self) -> int:
        """Bytes of weight files a fetch reads: headers plus the coalesced ranges (configs not counted)."""
        return self.header_bytes + self.range_bytes

    @property
    def whole_files_bytes(self) -> int:
        """What downloading the weight files that hold needed tensors would move."""
        return sum(f.size for f in self.files)


def header_read_size(f: RemoteFile) -> int:
    """Bytes read to get a header: one probe, plus the rest of the header when it is longer."""
    return max(min(HEADER_PROBE, f.size), f.header_bytes)


def plan_ranges(
    spans: list[tuple[int, int]], *, max_gap: int = MAX_GAP, budget: float = GAP_BUDGET, max_request: int = MAX_REQUEST
) -> list[tuple[int, int]]:
    """Coalesce ``[start, end)`` spans into few requests: adjacent spans join; gaps are merged smallest first,
    each at most ``max_gap``, until they add ``budget`` x the payload; requests are cut at ``max_request``."""
    if not spans:
        return []
    ordered = sorted(spans)
    joined: list[list[int]] = [list(ordered[0])]
    for s, e in ordered[1:]:
        if s <= joined[-1][1]:
            joined[-1][1] = max(joined[-1][1], e)
        else:
            joined.append([s, e])
    payload = sum(e - s for s, e in joined)
    gaps = sorted((joined[i + 1][0] - joined[i][1], i) for i in range(len(joined) - 1))
    allowed = budget * payload
    merge_after: set[int] = set()
    for size, i in gaps:
        if size > max_gap or size > allowed:
            break
        allowed -= size
        merge_after.add(i)
    merged: list[tuple[int, int]] = []
    start = joined[0][0]
    for i, (_, e) in enumerate(joined):
        if i not in merge_after:
            merged.append((start, e))
            if i + 1 < len(joined):
                start = joined[i + 1][0]
    out = []
    for s, e in merged:
        for piece in range(s, e, max_request):
            out.append((piece, min(e, piece + max_request)))
    return out


# --------------------------------------------------------------------------- HTTP through huggingface_hub


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Silence huggingface_hub's own warnings (retry notices) while we make a call we report ourselves."""
    hf_logger = logging.getLogger("huggingface_hub")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logger.setLevel(level)


def _network_errors() -> tuple[type[BaseException], ...]:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return (httpx2.TransportError, OfflineModeIsEnabled)


def _timeout() -> Any:
    import httpx2
    from huggingface_hub import constants

    return httpx2.Timeout(float(constants.HF_HUB_DOWNLOAD_TIMEOUT), connect=CONNECT_TIMEOUT)


def _user_headers() -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    from phi3embed import __version__

    return build_hf_headers(library_name="phi3embed", library_version=__version__)


class HubUnreachable(Exception):
    """Internal: the hub did not answer (the caller decides whether the caches make up for it)."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _hub_error(repo_id: str, exc: BaseException, what: str) -> CheckpointError:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, GatedRepoError):
        return CheckpointError(
            f"{what}: the repository is gated; accept its terms and log in (hf auth login)", path=repo_id
        )
    if isinstance(exc, RevisionNotFoundError):
        return CheckpointError(f"{what}: no such revision in the repository", path=repo_id)
    if isinstance(exc, RepositoryNotFoundError):
        return CheckpointError(
            f"{what}: no such repository on the hub (or it is private and no token gives access)", path=repo_id
        )
    return CheckpointError(f"{what}: {type(exc).__name__}: {_one_line(exc)}", path=repo_id)


def probe_commit(repo_id: str, revision: str | None) -> str:
    """The commit ``revision`` names, from one HEAD of config.json: no retries, a short connect timeout,
    nothing printed. Raises HubUnreachable when the hub cannot be reached (or offline mode is on)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError

    if constants.is_offline_mode():
        raise HubUnreachable(OFFLINE_REASON)
    url = hf_hub_url(repo_id, "config.json", revision=revision)
    try:
        with _quiet_hf():
            meta = get_hf_file_metadata(url, timeout=_timeout(), headers=_user_headers(), retry_on_errors=False)
    except _network_errors() as exc:
        raise HubUnreachable(_one_line(exc)) from None
    except RemoteEntryNotFoundError:
        raise CheckpointError("the repository has no config.json", path=repo_id) from None
    except RepositoryNotFoundError as exc:  # also revision not found, gated
        raise _hub_error(repo_id, exc, "cannot read config.json") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status is not None and status >= 500:
            raise HubUnreachable(f"the hub answered {status}") from None
        raise _hub_error(repo_id, exc, "cannot read config.json") from None
    if not meta.commit_hash:
        raise CheckpointError(
            f"{urlsplit(url).netloc} answered without an X-Repo-Commit header: HF_ENDPOINT does not point at a hub",
            path=repo_id,
        )
    return meta.commit_hash


def _download(repo_id: str, filename: str, commit: str, cache_dir: str | None, *, required: bool) -> Path | None:
    """One small file (config, index) through hf_hub_download, pinned to ``commit``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        with _quiet_hf():
            return Path(hf_hub_download(repo_id, filename, revision=commit, cache_dir=cache_dir))
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"cannot fetch {filename}: the hub stopped answering ({_one_line(exc)})", path=repo_id
        ) from None
    except EntryNotFoundError:
        if required:
            raise CheckpointError(f"{filename} not found in the repository", path=repo_id) from None
        return None
    except Exception as exc:
        raise _hub_error(repo_id, exc, f"cannot fetch {filename}") from None


def _file_target(repo_id: str, name: str, commit: str) -> tuple[str, dict[str, str], str | None, int]:
    """Where to GET a weight file (the hub URL or its CDN location), with which headers; its etag and size."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, name, revision=commit)
    headers = _user_headers()
    try:
        with _quiet_hf():
            meta = get_hf_file_metadata(url, timeout=_timeout(), headers=headers, retry_on_errors=True)
    except _network_errors() as exc:
        raise CheckpointError(f"cannot reach the hub for {name}: {_one_line(exc)}", path=repo_id) from None
    except Exception as exc:
        raise _hub_error(repo_id, exc, f"cannot read the metadata of {name}") from None
    if meta.size is None:
        raise CheckpointError(f"the hub reports no size for {name}", path=repo_id)
    location = meta.location or url
    if urlsplit(location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed CDN URL: the token stays with the hub, as hf_hub_download does
    return location, headers, meta.etag, int(meta.size)


def _get_range(
    repo_id: str,
    f_name: str,
    url: str,
    headers: dict[str, str],
    size: int,
    start: int,
    end: int,
    sink: Callable[[int, bytes], None],
) -> int:
    """GET bytes ``[start, end)``; every chunk goes to ``sink(offset, data)``. Returns the bytes received.

    The answer must be 206 with exactly ``bytes start-(end-1)/size``; network errors resume where they
    stopped, up to READ_ATTEMPTS times."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    pos = start
    received = 0
    for attempt in range(READ_ATTEMPTS):
        asked = f"bytes={pos}-{end - 1}"
        try:
            with get_session().stream(
                "GET", url, headers={**headers, "Range": asked, "Accept-Encoding": "identity"}, timeout=_timeout()
            ) as response:
                if response.status_code == 200:
                    raise CheckpointError(
                        f"the server ignored the byte range asked for {f_name} and started sending the whole "
                        f"file ({size:,} bytes); stopped. Download the model with `hf download {repo_id}` and pass "
                        "its folder, or use an endpoint that serves ranges",
                        path=repo_id,
                    )
                hf_raise_for_status(response)
                want = f"bytes {pos}-{end - 1}/{size}"
                got_range = response.headers.get("Content-Range", "")
                if response.status_code != 206 or got_range != want:
                    raise CheckpointError(
                        f"asked {f_name} for {want}, the server answered {response.status_code} with "
                        f"Content-Range {got_range!r}",
                        path=repo_id,
                    )
                for chunk in response.iter_bytes(1 << 20):
                    if pos + len(chunk) > end:
                        raise CheckpointError(f"the server sent more than the asked range of {f_name}", path=repo_id)
                    sink(pos, chunk)
                    pos += len(chunk)
                    received += len(chunk)
            if pos != end:
                raise CheckpointError(f"{f_name}: the answer ended {end - pos} bytes short of the range", path=repo_id)
            return received
        except _network_errors() as exc:
            if attempt + 1 == READ_ATTEMPTS:
                raise CheckpointError(
                    f"reading {f_name} failed {READ_ATTEMPTS} times ({_one_line(exc)}); nothing was cached, "
                    "run again to start over",
                    path=repo_id,
                ) from None
            time.sleep(0.2 * (attempt + 1))
        except CheckpointError:
            raise
        except Exception as exc:
            raise _hub_error(repo_id, exc, f"cannot read {f_name}") from None
    raise AssertionError("unreachable")


def remote_file(repo_id: str, name: str, commit: str) -> RemoteFile:
    """HEAD a weight file, then read its safetensors header by range (one request, two for a long header)."""
    url, headers, etag, size = _file_target(repo_id, name, commit)
    if size < 8:
        raise CheckpointError(f"{name} is not a safetensors file ({size} bytes)", path=repo_id)
    buf = bytearray()

    def keep(offset: int, data: bytes) -> None:
        buf.extend(data)

    _get_range(repo_id, name, url, headers, size, 0, min(HEADER_PROBE, size), keep)
    where = f"{repo_id}/{name}"
    try:
        n = header_length(bytes(buf[:LENGTH_BYTES]), file_size=size, where=where)
        if LENGTH_BYTES + n > len(buf):
            _get_range(repo_id, name, url, headers, size, len(buf), LENGTH_BYTES + n, keep)
        raw = bytes(buf[LENGTH_BYTES : LENGTH_BYTES + n])
        tensors = parse_header(raw, file=Path(name), file_size=size, where=where).tensors
    except SafetensorsFormatError as exc:
        raise CheckpointError(exc.reason, path=where) from None
    return RemoteFile(
        name=name, url=url, headers=headers, etag=etag, size=size, header_bytes=LENGTH_BYTES + n, tensors=tensors
    )


# --------------------------------------------------------------------------- the cache


def _entry(repo_id: str, commit: str, part: str) -> Path:
    return repo_folder(repo_id) / commit / part


def _ref_path(repo_id: str, revision: str) -> Path:
    return repo_folder(repo_id) / "refs" / quote(revision, safe="")


def _is_commit(revision: str | None) -> bool:
    return revision is not None and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _remember_ref(repo_id: str, revision: str | None, commit: str) -> None:
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


def _offline_commit(repo_id: str, revision: str | None, cache_dir: str | None) -> str | None:
    """The commit a revision named when last seen online: ours, else the HF cache's refs/."""
    name = revision or "main"
    if _is_commit(name):
        return name
    ours = _ref_path(repo_id, name)
    if ours.is_file():
        return ours.read_text().strip()
    from huggingface_hub import constants

    hf_ref = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "refs" / name
    return hf_ref.read_text().strip() if hf_ref.is_file() else None


def _fsync_path(path: Path, *, directory: bool = False) -> None:
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


class _Counter:
    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


def _fetch_part(
    repo_id: str, plan: FetchPlan, part: str, config_dir: Path, revision: str | None, counter: _Counter
) -> Path:
    """Write one cache entry: the part's tensors by ranged GETs into a temporary folder, then rename."""
    final = _entry(repo_id, plan.commit, part)
    with _entry_lock(repo_id, plan.commit, part):
        if final.is_dir():  # another process fetched it while we waited
            return final
        parent = final.parent
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".tmp-{part}-*"):  # left by a killed fetch (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = parent / f".tmp-{part}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_entry(tmp, repo_id, plan, part, config_dir, revision, counter)
            os.rename(tmp, final)
            _fsync_path(parent, directory=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _write_entry(
    tmp: Path, repo_id: str, plan: FetchPlan, part: str, config_dir: Path, revision: str | None, counter: _Counter
) -> None:
    keys = set(plan.keys[part])
    files = [f for f in plan.files if keys & set(f.tensors)]
    all_tensors = {k: f.tensors[k] for f in files for k in f.tensors if k in keys}
    ordered = plan.keys[part]  # by file, then offset: the entry keeps the source order
    header, starts = encode_header(
        [(k, all_tensors[k].dtype, all_tensors[k].shape) for k in ordered], metadata={"format": "pt"}
    )
    dst = dict(zip(ordered, starts, strict=True))
    total = len(header) + sum(all_tensors[k].nbytes for k in ordered)
    before = counter.value
    out = tmp / SINGLE_FILE
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, header, 0)
        os.ftruncate(fd, total)
        jobs = []
        for f in files:
            segments = sorted((f.tensors[k].start, f.tensors[k].end, dst[k]) for k in keys & set(f.tensors))
            for start, end in plan.ranges[part][f.name]:
                inside = [seg for seg in segments if seg[0] < end and seg[1] > start]
                jobs.append((f, start, end, inside))

        def run(job: tuple[RemoteFile, int, int, list[tuple[int, int, int]]]) -> None:
            f, start, end, inside = job

            def sink(offset: int, data: bytes) -> None:
                stop = offset + len(data)
                for s, e, d in inside:
                    a, b = max(s, offset), min(e, stop)
                    if a < b:
                        os.pwrite(fd, data[a - offset : b - offset], d + (a - s))

            counter.add(_get_range(repo_id, f.name, f.url, f.headers, f.size, start, end, sink))

        with ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="phi3embed-fetch") as pool:
            for result in [pool.submit(run, job) for job in jobs]:
                result.result()
        os.fsync(fd)
    finally:
        os.close(fd)
    for name in CONFIG_FILES:
        if (config_dir / name).is_file():
            shutil.copyfile(config_dir / name, tmp / name)
            _fsync_path(tmp / name)
    origin = {
        "repo_id": repo_id,
        "revision": revision or "main",
        "commit": plan.commit,
        "part": part,
        "tensors": len(ordered),
        "tensor_bytes": sum(all_tensors[k].nbytes for k in ordered),
        "bytes_fetched": counter.value - before,
        "weight_files": [
            {
                "name": f.name,
                "etag": f.etag,
                "size": f.size,
                "tensors": len(keys & set(f.tensors)),
            }
            for f in files
        ],
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n")
    _fsync_path(tmp / ORIGIN_FILE)
    _fsync_path(tmp, directory=True)


# --------------------------------------------------------------------------- locating a model


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


def _parts(vision: bool, text: bool) -> list[str]:
    return [p for p, on in zip(PARTS, (vision, text), strict=True) if on]


def _hf_snapshot(repo_id: str, commit: str, cache_dir: str | None, vision: bool, text: bool) -> Path | None:
    """The HF cache snapshot of ``commit`` when it holds config.json and every weight file with wanted keys."""
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> Path | None:
        found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=commit)
        return Path(found) if isinstance(found, str) else None

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


def _cached_entries(repo_id: str, commit: str, parts: list[str]) -> list[Path] | None:
    entries = [_entry(repo_id, commit, p) for p in parts]
    return entries if all((e / ORIGIN_FILE).is_file() for e in entries) else None


def unreachable_message(repo_id: str, reason: str) -> str:
    """One line: why the hub is out of reach, that the model is not cached, and the ways out."""
    offline = reason == OFFLINE_REASON
    first = (
        "offline mode (HF_HUB_OFFLINE=1) and the model is not in the Hugging Face or phi3embed cache"
        if offline
        else f"the hub cannot be reached ({reason}) and the model is not cached here"
    )
    return (
        f"{first}; pass a local checkpoint folder as --model, or run `phi3embed download {repo_id}` on a machine "
        f"with network (with {CACHE_ENV} or HF_HOME on a disk this one sees)"
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
    parts = _parts(vision, text)
    try:
        commit = probe_commit(repo_id, revision)
    except HubUnreachable as why:
        return _locate_offline(repo_id, revision, parts, cache_dir, vision, text, str(why))
    _remember_ref(repo_id, revision, commit)
    config = _download(repo_id, "config.json", commit, cache_dir, required=True)
    assert config is not None
    _download(repo_id, "preprocessor_config.json", commit, cache_dir, required=False)
    cached = _cached_model(repo_id, commit, parts, cache_dir, vision, text)
    if cached is not None:
        return cached
    index = _download(repo_id, INDEX_FILE, commit, cache_dir, required=False)
    weight_map: Any = None
    if index is not None:
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{INDEX_FILE} has no weight_map", path=repo_id)
        names = sorted({str(weight_map[k]) for k in select_keys(weight_map, vision=vision, text=text)})
    else:
        names = [SINGLE_FILE]
    files = [remote_file(repo_id, name, commit) for name in names]
    plan = _plan(repo_id, commit, files, parts, weight_map if index is not None else None)
    headers_read = sum(header_read_size(f) for f in files)
    if not fetch:
        return HubModel(repo_id, commit, "hub", config.parent, [], plan, headers_read)
    counter = _Counter()
    roots = [_fetch_part(repo_id, plan, part, config.parent, revision, counter) for part in parts]
    return HubModel(repo_id, commit, "phi3embed cache", roots[0], roots, plan, headers_read + counter.value)


def _plan(
    repo_id: str, commit: str, files: list[RemoteFile], parts: list[str], weight_map: dict[str, Any] | None
) -> FetchPlan:
    stored: dict[str, RemoteFile] = {}
    for f in files:
        for key in f.tensors:
            if key in stored:
                raise CheckpointError(f"tensor {key} is stored twice ({stored[key].name}, {f.name})", path=repo_id)
            stored[key] = f
    keys: dict[str, list[str]] = {}
    ranges: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for part in parts:
        vision, text = part == "vision", part == "text"
        if weight_map is not None:
            for key in select_keys(weight_map, vision=vision, text=text):
                if key not in stored or stored[key].name != weight_map[key]:
                    raise CheckpointError(
                        f"tensor {key} is listed in {INDEX_FILE} but not stored in {weight_map[key]}", path=repo_id
                    )
        chosen = select_keys(stored, vision=vision, text=text)
        if not chosen:
            what = "vision tensors" if vision else "token-embedding table"
            raise CheckpointError(f"the repository's weights hold no {what}", path=repo_id)
        keys[part] = sorted(chosen, key=lambda k: (stored[k].name, stored[k].tensors[k].start))
        ranges[part] = {
            f.name: plan_ranges([(f.tensors[k].start, f.tensors[k].end) for k in keys[part] if stored[k] is f])
            for f in files
            if any(stored[k] is f for k in keys[part])
        }
    return FetchPlan(commit=commit, files=files, keys=keys, ranges=ranges)


def _locate_offline(
    repo_id: str, revision: str | None, parts: list[str], cache_dir: str | None, vision: bool, text: bool, reason: str
) -> HubModel:
    commit = _offline_commit(repo_id, revision, cache_dir)
    cached = None if commit is None else _cached_model(repo_id, commit, parts, cache_dir, vision, text)
    if cached is None:
        raise CheckpointError(unreachable_message(repo_id, reason), path=repo_id)
    return cached


def _cached_model(
    repo_id: str, commit: str, parts: list[str], cache_dir: str | None, vision: bool, text: bool
) -> HubModel | None:
    """The model at ``commit`` from a cache, with no network: complete in the HF cache (used in place), else
    phi3embed's vision-only entries; None when neither has it."""
    snapshot = _hf_snapshot(repo_id, commit, cache_dir, vision, text)
    if snapshot is not None:
        return HubModel(repo_id, commit, "hub cache", snapshot, [snapshot])
    entries = _cached_entries(repo_id, commit, parts)
    if entries is not None:
        return HubModel(repo_id, commit, "phi3embed cache", entries[0], entries)
    return None


def locate_configs(repo_id: str, *, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """A folder holding the model's config files (no weights): the HF cache, a phi3embed entry, or fetched."""
    try:
        commit = probe_commit(repo_id, revision)
    except HubUnreachable as why:
        commit_seen = _offline_commit(repo_id, revision, cache_dir)
        if commit_seen is not None:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=commit_seen)
            if isinstance(found, str):
                return Path(found).parent
            for part in PARTS:
                if (_entry(repo_id, commit_seen, part) / ORIGIN_FILE).is_file():
                    return _entry(repo_id, commit_seen, part)
        raise CheckpointError(unreachable_message(repo_id, str(why)), path=repo_id) from None
    _remember_ref(repo_id, revision, commit)
    config = _download(repo_id, "config.json", commit, cache_dir, required=True)
    assert config is not None
    _download(repo_id, "preprocessor_config.json", commit, cache_dir, required=False)
    return config.parent


def read_config_dir(folder: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """config.json and (if present) preprocessor_config.json of a folder."""
    from phi3embed.core.config import read_json

    pre = folder / "preprocessor_config.json"
    return read_json(folder / "config.json"), read_json(pre) if pre.is_file() else None
