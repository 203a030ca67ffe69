"""What phi3embed uses of huggingface_hub, in one place: its HTTP session, timeouts, headers and error types.

Everything else in :mod:`phi3embed.core.hub` calls these functions and never huggingface_hub's HTTP client
or its error classes directly. huggingface_hub is imported on first use (the CLI starts without it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any


class Failure(Enum):
    """What went wrong in a call to the hub, whatever the huggingface_hub generation calls it."""

    OFFLINE = "offline"  # HF_HUB_OFFLINE is set
    NETWORK = "network"  # no answer: connection refused or reset, timeout, a body cut short
    MISSING = "missing"  # the file is not in the repository (at that revision)
    GATED = "gated"
    REVISION = "revision"  # no such branch, tag or commit
    REPOSITORY = "repository"  # no such repository, or private without a token
    SERVER = "server"  # a 5xx answer
    OTHER = "other"


@dataclass(frozen=True)
class FileMetadata:
    commit: str | None  # X-Repo-Commit
    etag: str | None
    location: str  # where the file's bytes are (the URL asked, or the CDN location it redirects to)
    size: int | None


@dataclass
class Answer:
    """A streamed answer: status and headers, then its body in chunks."""

    status: int
    headers: Mapping[str, str]
    chunks: Iterator[bytes]
    raise_for_status: Callable[[], None]  # huggingface_hub's typed error for an error status


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence huggingface_hub's own warnings (retry notices) while we make a call we report ourselves."""
    hf_logger = logging.getLogger("huggingface_hub")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logger.setLevel(level)


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def timeout(connect: float) -> Any:
    """The timeout object of huggingface_hub's HTTP client: ``connect`` seconds to connect, huggingface_hub's
    download timeout (HF_HUB_DOWNLOAD_TIMEOUT) between bytes."""
    import httpx2
    from huggingface_hub import constants

    return httpx2.Timeout(float(constants.HF_HUB_DOWNLOAD_TIMEOUT), connect=connect)


def user_headers(library_version: str) -> dict[str, str]:
    """huggingface_hub's headers (token, user agent) for a request made by phi3embed."""
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers(library_name="phi3embed", library_version=library_version)


def hub_url(repo_id: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, revision=revision)


def classify(exc: BaseException) -> Failure:
    """Which :class:`Failure` an exception raised by huggingface_hub or its HTTP client is."""
    import httpx2
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, OfflineModeIsEnabled):
        return Failure.OFFLINE
    if isinstance(exc, (httpx2.TransportError, LocalEntryNotFoundError)):
        return Failure.NETWORK
    if isinstance(exc, EntryNotFoundError):
        return Failure.MISSING
    if isinstance(exc, GatedRepoError):
        return Failure.GATED
    if isinstance(exc, RevisionNotFoundError):
        return Failure.REVISION
    if isinstance(exc, RepositoryNotFoundError):
        return Failure.REPOSITORY
    if isinstance(exc, HfHubHTTPError):
        status = status_of(exc)
        if status is not None and status >= 500:
            return Failure.SERVER
    return Failure.OTHER


def file_metadata(url: str, *, headers: dict[str, str], timeout: Any, retry: bool) -> FileMetadata:
    """One HEAD of ``url`` (redirects within the hub followed; ``retry``: huggingface_hub's retries on 5xx and
    network errors, where the generation has them)."""
    from huggingface_hub import get_hf_file_metadata

    meta = get_hf_file_metadata(url, timeout=timeout, headers=headers, retry_on_errors=retry)
    return FileMetadata(commit=meta.commit_hash, etag=meta.etag, location=meta.location or url, size=meta.size)


@contextlib.contextmanager
def stream_get(url: str, *, headers: dict[str, str], timeout: Any, chunk_size: int) -> Iterator[Answer]:
    """A GET on huggingface_hub's session, its body streamed; an error status is raised (as huggingface_hub's
    typed error) only by :meth:`Answer.raise_for_status`."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    with get_session().stream("GET", url, headers=headers, timeout=timeout) as response:
        yield Answer(
            status=response.status_code,
            headers=response.headers,
            chunks=response.iter_bytes(chunk_size),
            raise_for_status=lambda: hf_raise_for_status(response),
        )


def download(repo_id: str, filename: str, *, revision: str, cache_dir: str | None) -> Path:
    """One file through hf_hub_download (into the Hugging Face cache)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir))


def cached_file(repo_id: str, filename: str, *, revision: str, cache_dir: str | None) -> Path | None:
    """The file in the Hugging Face cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None


def hf_cache_dir(cache_dir: str | None) -> Path:
    """The Hugging Face hub cache in use."""
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of huggingface_hub's error for an answer, if it has one."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)
