"""What phi3embed asks the hub, through :mod:`.adapter`: the commit a revision names, small files through
``hf_hub_download``, a weight file's metadata and safetensors header, and byte ranges with their checks.

Network: one HEAD of ``config.json`` (short connect timeout, no retries, huggingface_hub's warnings
silenced) tells the commit, or that the hub cannot be reached. Weight files are read by ranged GETs on
huggingface_hub's own HTTP session and headers (token, ``HF_ENDPOINT``, proxies, user agent). Every answer
must be a 206 with exactly the asked range; a server that ignores Range stops the read (it never downloads
the whole file behind our back); network errors resume where they stopped, up to READ_ATTEMPTS times.
Errors become one-line :class:`~phi3embed.errors.CheckpointError`\\ s here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from phi3embed.core.hub import adapter
from phi3embed.core.hub.adapter import Failure
from phi3embed.core.hub.plan import HEADER_PROBE, RemoteFile
from phi3embed.core.safetensors_io import LENGTH_BYTES, SafetensorsFormatError, header_length, parse_header
from phi3embed.errors import CheckpointError

CONNECT_TIMEOUT = 3.0
READ_ATTEMPTS = 3  # per range, resuming where the previous attempt stopped
CHUNK = 1 << 20
OFFLINE_REASON = "HF_HUB_OFFLINE is set"


class HubUnreachable(Exception):
    """The hub did not answer (the caller decides whether the caches make up for it)."""


def _one_line(exc: BaseException) -> str:
    return adapter.describe(exc)


def _timeout() -> Any:
    return adapter.timeout(CONNECT_TIMEOUT)


def _user_headers() -> dict[str, str]:
    from phi3embed import __version__

    return adapter.user_headers(__version__)


def hub_error(repo_id: str, exc: BaseException, what: str, failure: Failure | None = None) -> CheckpointError:
    """One line for an answer of the hub that is not the file asked for."""
    failure = failure or adapter.classify(exc)
    if failure is Failure.GATED:
        return CheckpointError(
            f"{what}: the repository is gated; accept its terms and log in (hf auth login)", path=repo_id
        )
    if failure is Failure.REVISION:
        return CheckpointError(f"{what}: no such revision in the repository", path=repo_id)
    if failure is Failure.REPOSITORY:
        return CheckpointError(
            f"{what}: no such repository on the hub (or it is private and no token gives access)", path=repo_id
        )
    return CheckpointError(f"{what}: {type(exc).__name__}: {_one_line(exc)}", path=repo_id)


def probe_commit(repo_id: str, revision: str | None) -> str:
    """The commit ``revision`` names, from one HEAD of config.json: no retries, a short connect timeout,
    nothing printed. Raises HubUnreachable when the hub cannot be reached (or offline mode is on)."""
    if adapter.is_offline():
        raise HubUnreachable(OFFLINE_REASON)
    url = adapter.hub_url(repo_id, "config.json", revision)
    try:
        with adapter.quiet():
            meta = adapter.file_metadata(url, headers=_user_headers(), timeout=_timeout(), retry=False)
    except Exception as exc:
        failure = adapter.classify(exc)
        if failure in (Failure.NETWORK, Failure.OFFLINE):
            raise HubUnreachable(_one_line(exc)) from None
        if failure is Failure.SERVER:
            raise HubUnreachable(f"the hub answered {adapter.status_of(exc)}") from None
        if failure is Failure.MISSING:
            raise CheckpointError("the repository has no config.json", path=repo_id) from None
        raise hub_error(repo_id, exc, "cannot read config.json", failure) from None
    if not meta.commit:
        raise CheckpointError(
            f"{urlsplit(url).netloc} answered without an X-Repo-Commit header: HF_ENDPOINT does not point at a hub",
            path=repo_id,
        )
    return meta.commit


def download(repo_id: str, filename: str, commit: str, cache_dir: str | None, *, required: bool) -> Path | None:
    """One small file (config, index) through hf_hub_download, pinned to ``commit``."""
    try:
        with adapter.quiet():
            return adapter.download(repo_id, filename, revision=commit, cache_dir=cache_dir)
    except Exception as exc:
        failure = adapter.classify(exc)
        if failure in (Failure.NETWORK, Failure.OFFLINE):
            raise CheckpointError(
                f"cannot fetch {filename}: the hub stopped answering ({_one_line(exc)})", path=repo_id
            ) from None
        if failure is Failure.MISSING:
            if required:
                raise CheckpointError(f"{filename} not found in the repository", path=repo_id) from None
            return None
        raise hub_error(repo_id, exc, f"cannot fetch {filename}", failure) from None


def _file_target(repo_id: str, name: str, commit: str) -> tuple[str, dict[str, str], str | None, int]:
    """Where to GET a weight file (the hub URL or its CDN location), with which headers; its etag and size."""
    url = adapter.hub_url(repo_id, name, commit)
    headers = _user_headers()
    try:
        with adapter.quiet():
            meta = adapter.file_metadata(url, headers=headers, timeout=_timeout(), retry=True)
    except Exception as exc:
        if adapter.classify(exc) in (Failure.NETWORK, Failure.OFFLINE):
            raise CheckpointError(f"cannot reach the hub for {name}: {_one_line(exc)}", path=repo_id) from None
        raise hub_error(repo_id, exc, f"cannot read the metadata of {name}") from None
    if meta.size is None:
        raise CheckpointError(f"the hub reports no size for {name}", path=repo_id)
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # a signed CDN URL: the token stays with the hub, as hf_hub_download does
    return meta.location, headers, meta.etag, int(meta.size)


def get_range(
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
    pos = start
    received = 0
    for attempt in range(READ_ATTEMPTS):
        asked = f"bytes={pos}-{end - 1}"
        try:
            with adapter.stream_get(
                url,
                headers={**headers, "Range": asked, "Accept-Encoding": "identity"},
                timeout=_timeout(),
                chunk_size=CHUNK,
            ) as answer:
                if answer.status == 200:
                    raise CheckpointError(
                        f"the server ignored the byte range asked for {f_name} and started sending the whole "
                        f"file ({size:,} bytes); stopped. Download the model with `hf download {repo_id}` and pass "
                        "its folder, or use an endpoint that serves ranges",
                        path=repo_id,
                    )
                answer.raise_for_status()
                want = f"bytes {pos}-{end - 1}/{size}"
                got_range = answer.headers.get("Content-Range", "")
                if answer.status != 206 or got_range != want:
                    raise CheckpointError(
                        f"asked {f_name} for {want}, the server answered {answer.status} with "
                        f"Content-Range {got_range!r}",
                        path=repo_id,
                    )
                for chunk in answer.chunks:
                    if pos + len(chunk) > end:
                        raise CheckpointError(f"the server sent more than the asked range of {f_name}", path=repo_id)
                    sink(pos, chunk)
                    pos += len(chunk)
                    received += len(chunk)
            if pos != end:
                raise CheckpointError(f"{f_name}: the answer ended {end - pos} bytes short of the range", path=repo_id)
            return received
        except CheckpointError:
            raise
        except Exception as exc:
            if adapter.classify(exc) is not Failure.NETWORK:
                raise hub_error(repo_id, exc, f"cannot read {f_name}") from None
            if attempt + 1 == READ_ATTEMPTS:
                raise CheckpointError(
                    f"reading {f_name} failed {READ_ATTEMPTS} times ({_one_line(exc)}); nothing was cached, "
                    "run again to start over",
                    path=repo_id,
                ) from None
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def remote_file(repo_id: str, name: str, commit: str) -> RemoteFile:
    """HEAD a weight file, then read its safetensors header by range (one request, two for a long header)."""
    url, headers, etag, size = _file_target(repo_id, name, commit)
    if size < LENGTH_BYTES:
        raise CheckpointError(f"{name} is not a safetensors file ({size} bytes)", path=repo_id)
    buf = bytearray()

    def keep(offset: int, data: bytes) -> None:
        buf.extend(data)

    get_range(repo_id, name, url, headers, size, 0, min(HEADER_PROBE, size), keep)
    where = f"{repo_id}/{name}"
    try:
        n = header_length(bytes(buf[:LENGTH_BYTES]), file_size=size, where=where)
        if LENGTH_BYTES + n > len(buf):
            get_range(repo_id, name, url, headers, size, len(buf), LENGTH_BYTES + n, keep)
        raw = bytes(buf[LENGTH_BYTES : LENGTH_BYTES + n])
        tensors = parse_header(raw, file=Path(name), file_size=size, where=where).tensors
    except SafetensorsFormatError as exc:
        raise CheckpointError(exc.reason, path=where) from None
    return RemoteFile(
        name=name, url=url, headers=headers, etag=etag, size=size, header_bytes=LENGTH_BYTES + n, tensors=tensors
    )
