"""What phi3embed uses of huggingface_hub, in one place: its HTTP session, timeouts, headers and error types.

huggingface_hub changed its HTTP client twice: 0.x uses ``requests`` (errors are ``requests`` exceptions,
``get_hf_file_metadata`` has no ``retry_on_errors``, offline mode is the ``HF_HUB_OFFLINE`` constant), 1.x
``httpx`` and 2.x ``httpx2`` (a streaming ``Client.stream``, ``constants.is_offline_mode()``). This module
asks the installed huggingface_hub which client its session is and imports only that one; everything else
in :mod:`phi3embed.core.hub` calls these functions and never an HTTP client or huggingface_hub's error
classes directly. The error classes used here are the ones every generation exports from
``huggingface_hub.utils``. huggingface_hub is imported on first use (the CLI starts without it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urljoin, urlsplit


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


@functools.cache
def client() -> str:
    """The HTTP client huggingface_hub's session is made with: ``requests``, ``httpx`` or ``httpx2``."""
    from huggingface_hub.utils import get_session

    return type(get_session()).__module__.split(".")[0]


def _client_module() -> ModuleType:
    return importlib.import_module(client())


def is_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)  # 1.x and later; 0.x has only the constant
    return bool(check()) if check is not None else bool(constants.HF_HUB_OFFLINE)


def timeout(connect: float) -> Any:
    """The timeout of huggingface_hub's HTTP client: ``connect`` seconds to connect, huggingface_hub's
    download timeout (HF_HUB_DOWNLOAD_TIMEOUT) between bytes."""
    from huggingface_hub import constants

    read = float(getattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10))
    if client() == "requests":
        return (connect, read)
    return _client_module().Timeout(read, connect=connect)


def _network_errors() -> tuple[type[BaseException], ...]:
    """The client's exceptions for "no (complete) answer": refused, reset, timed out, a body cut short."""
    http = _client_module()
    if client() == "requests":
        return (http.ConnectionError, http.Timeout, http.exceptions.ChunkedEncodingError)
    return (http.TransportError,)


def user_headers(library_version: str) -> dict[str, str]:
    """huggingface_hub's headers (token, user agent) for a request made by phi3embed."""
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers(library_name="phi3embed", library_version=library_version)


def hub_url(repo_id: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, filename, revision=revision)


def classify(exc: BaseException) -> Failure:
    """Which :class:`Failure` an exception raised by huggingface_hub or its HTTP client is."""
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
    if isinstance(exc, (LocalEntryNotFoundError, *_network_errors())):
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
    network errors, where the generation has them: 0.x makes one attempt)."""
    from huggingface_hub import get_hf_file_metadata

    if _has_retry_option():
        meta = get_hf_file_metadata(url, timeout=timeout, headers=headers, retry_on_errors=retry)
    elif retry:
        meta = get_hf_file_metadata(url, timeout=timeout, headers=headers)  # 0.x: always retries, ~23 s at most
    else:
        return _head_once(url, headers=headers, timeout=timeout)
    return FileMetadata(commit=meta.commit_hash, etag=meta.etag, location=meta.location or url, size=meta.size)


def _head_once(url: str, *, headers: dict[str, str], timeout: Any) -> FileMetadata:
    """One HEAD without retries, read as get_hf_file_metadata reads it, for huggingface_hub 0.x (whose
    get_hf_file_metadata retries network errors five times): redirects within the hub (a renamed repository)
    are followed, one to another host is the file's location; the linked etag and size (of a file stored
    out of git) come first."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    session: Any = get_session()
    asked = {**headers, "Accept-Encoding": "identity"}
    for _ in range(10):
        response = session.head(url, headers=asked, allow_redirects=False, timeout=timeout)
        target = response.headers.get("Location", "")
        if not (300 <= response.status_code < 400 and target and not urlsplit(target).netloc):
            break
        url = urljoin(url, target)
    hf_raise_for_status(response)
    h = response.headers
    etag = h.get("X-Linked-Etag") or h.get("ETag")
    size = h.get("X-Linked-Size") or h.get("Content-Length")
    return FileMetadata(
        commit=h.get("X-Repo-Commit"),
        etag=None if etag is None else etag.removeprefix("W/").strip('"'),
        location=h.get("Location") or url,
        size=None if size is None else int(size),
    )


@functools.cache
def _has_retry_option() -> bool:
    from huggingface_hub import get_hf_file_metadata

    return "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters


@contextlib.contextmanager
def stream_get(url: str, *, headers: dict[str, str], timeout: Any, chunk_size: int) -> Iterator[Answer]:
    """A GET on huggingface_hub's session, its body streamed; an error status is raised (as huggingface_hub's
    typed error) only by :meth:`Answer.raise_for_status`. Redirects are followed by the client, which drops
    the authorization header when one leads to another host."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    session: Any = get_session()  # a requests.Session (0.x), an httpx / httpx2 Client (1.x / 2.x)
    if client() == "requests":
        with contextlib.closing(session.get(url, headers=headers, timeout=timeout, stream=True)) as response:
            yield Answer(
                status=response.status_code,
                headers=response.headers,
                chunks=response.iter_content(chunk_size),
                raise_for_status=lambda: hf_raise_for_status(response),
            )
        return
    with session.stream("GET", url, headers=headers, timeout=timeout) as response:
        yield Answer(
            status=response.status_code,
            headers=response.headers,
            chunks=response.iter_bytes(chunk_size),
            raise_for_status=lambda: hf_raise_for_status(response),
        )


def download(repo_id: str, filename: str, *, revision: str, cache_dir: str | None) -> Path:
    """One file through hf_hub_download (into the Hugging Face cache)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=hf_cache_dir(cache_dir)))


def cached_file(repo_id: str, filename: str, *, revision: str, cache_dir: str | None) -> Path | None:
    """The file in the Hugging Face cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=hf_cache_dir(cache_dir), revision=revision)
    return Path(found) if isinstance(found, str) else None


def hf_cache_dir(cache_dir: str | None) -> Path:
    """The Hugging Face hub cache in use: passed explicitly to every call (0.x binds its default at import)."""
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE)


def describe(exc: BaseException) -> str:
    """One short line for an error: the operating system's words for a network error when the client wraps
    them (``requests`` nests them in urllib3's retry errors, with a request id), else the error's text."""
    text = " ".join(str(exc).split())
    if isinstance(exc, _network_errors()):
        os_error = re.search(r"\[Errno -?\d+\] [^'\"()]*[^'\"() ]", text)
        if os_error:
            return os_error.group(0)
    text = re.sub(r",? ?'?\(Request ID: [^)]*\)'?", "", text)
    return text or type(exc).__name__


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of huggingface_hub's error for an answer, if it has one."""
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)
