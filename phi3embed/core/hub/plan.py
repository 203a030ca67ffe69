"""What a fetch reads: the remote weight files' headers, and the needed tensors' byte ranges, coalesced.

Ranges are merged across gaps only while the merged gaps waste at most 2% of the payload (each gap at most
1 MiB), then cut into requests of at most 64 MiB.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from phi3embed.core.layout import INDEX_FILE, select_keys
from phi3embed.core.safetensors_io import TensorInfo
from phi3embed.errors import CheckpointError

HEADER_PROBE = 64 * 1024  # first read of a weight file: the length and, usually, the whole JSON header
MAX_GAP = 1 << 20  # never merge across a gap larger than this
GAP_BUDGET = 0.02  # merged gaps may add at most this fraction of the payload
MAX_REQUEST = 64 << 20  # bytes per ranged GET
PARTS = ("vision", "text")  # what a cache entry holds: the vision tensors, or the token-embedding table


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

    def file(self, name: str) -> RemoteFile:
        return next(f for f in self.files if f.name == name)

    def file_fetch_bytes(self, name: str) -> int:
        """What a fetch reads of one weight file: its header and its ranges."""
        return header_read_size(self.file(name)) + sum(
            e - s for by_file in self.ranges.values() for s, e in by_file.get(name, [])
        )

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


def make_plan(
    repo_id: str, commit: str, files: list[RemoteFile], parts: list[str], weight_map: dict[str, str] | None
) -> FetchPlan:
    """The plan for ``parts`` of a commit whose weight files (those holding wanted keys) are ``files``; the
    index's ``weight_map`` (None for a single-file repository) is checked against the headers."""
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
