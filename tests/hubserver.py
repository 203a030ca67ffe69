"""A hub-like HTTP server on 127.0.0.1 for tests and benchmarks, and checkpoints in the real sharded layout.

:class:`FakeHub` serves ``/{owner}/{name}/resolve/{revision}/{file}`` (HEAD and GET) as the Hugging Face hub
does for huggingface_hub: ``X-Repo-Commit``, ``ETag``, ``Content-Length``, byte ranges (206 with
``Content-Range``), 404 with ``X-Error-Code: EntryNotFound`` / ``RevisionNotFound`` / ``RepoNotFound``. It
counts the body bytes it sends per file, and can misbehave on purpose: ignore ranges, or break the
connection after sending a number of weight-file bytes. It listens on 127.0.0.1 only (port 0).

:func:`write_sharded_checkpoint` turns a small checkpoint into the real layout: two weight files and an index,
the vision tensors in the first one among large language-model tensors that cost no disk (sparse regions).
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import torch
from safetensors import safe_open

VISION_PREFIX = "model.vision_embed_tokens."
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_DTYPE_NAMES = {"F32": 4, "F16": 2, "BF16": 2}


def huggingface_hub_settings(endpoint: str, *, hf_cache: str, offline: bool = False) -> list[tuple[Any, str, Any]]:
    """``(module, name, value)`` to set so that huggingface_hub talks to ``endpoint`` as if ``HF_ENDPOINT``,
    ``HF_HOME`` and ``HF_HUB_OFFLINE`` had been set before it was imported: its ``constants``, and the copies
    of them that huggingface_hub 0.x binds into ``file_download`` at import (1.x and 2.x read the constants)."""
    import huggingface_hub.constants as constants
    import huggingface_hub.file_download as file_download

    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": offline,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_CACHE": hf_cache,
    }
    out = [(constants, name, value) for name, value in values.items()]
    out += [(file_download, name, value) for name, value in values.items() if hasattr(file_download, name)]
    return out


class FakeHub:
    """``repos``: repo id -> {commit sha -> folder}; ``refs``: repo id -> {branch or tag -> commit sha}."""

    def __init__(self, repos: dict[str, dict[str, Path]], refs: dict[str, dict[str, str]]) -> None:
        self.repos = repos
        self.refs = refs
        self.lock = threading.Lock()
        self._idle = threading.Condition(self.lock)  # notified when no answer is being written
        self._answering = 0
        self._served: Counter[str] = Counter()  # body bytes sent, by file name
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.ignore_range = False
        self.break_after: int | None = None  # weight-file body bytes to send before breaking connections
        self._weight_bytes = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _quiet(self) -> None:
        """Wait (lock held) until no answer is being written: a client may have read the last byte before the
        handler thread counted it, so counts are read and reset only between answers."""
        if not self._idle.wait_for(lambda: self._answering == 0, timeout=30):
            raise TimeoutError("the fake hub is still answering a request after 30 s")

    def reset_counts(self) -> None:
        with self.lock:
            self._quiet()
            self._served.clear()
            self.requests.clear()

    @property
    def weight_bytes_served(self) -> int:
        with self.lock:
            self._quiet()
            return sum(n for name, n in self._served.items() if name.endswith(".safetensors"))

    @property
    def served(self) -> Counter[str]:
        """Body bytes sent so far, by file name (a copy, taken between answers)."""
        with self.lock:
            self._quiet()
            return Counter(self._served)

    def _answer(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        with self.lock:
            self._answering += 1
        try:
            self._respond(h, body=body)
        finally:
            with self.lock:
                self._answering -= 1
                self._idle.notify_all()

    def _respond(self, h: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = h.path.split("?")[0]
        with self.lock:
            self.requests.append((h.command, path, h.headers.get("Range")))
        m = _RESOLVE.match(path)
        if m is None:
            return self._error(h, 404, "EntryNotFound", None)
        repo, rev, name = m["repo"], unquote(m["rev"]), unquote(m["file"])
        if repo not in self.repos:
            return self._error(h, 401, "RepoNotFound", None)
        commit = self.refs.get(repo, {}).get(rev, rev)
        folder = self.repos[repo].get(commit)
        if folder is None:
            return self._error(h, 404, "RevisionNotFound", None)
        file = folder / name
        if not file.is_file():
            return self._error(h, 404, "EntryNotFound", commit)
        size = file.stat().st_size
        start, end, status = 0, size, 200
        asked = h.headers.get("Range")
        if asked and not self.ignore_range:
            rm = re.fullmatch(r"bytes=(\d+)-(\d*)", asked.strip())
            if rm is None or int(rm[1]) >= size:
                return self._error(h, 416, None, commit)
            start = int(rm[1])
            end = min(size, int(rm[2]) + 1) if rm[2] else size
            status = 206
        h.send_response(status)
        h.send_header("X-Repo-Commit", commit)
        h.send_header("ETag", f'"{commit[:12]}-{name}-{size}"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(end - start))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        h.end_headers()
        if not body:
            return
        try:
            with open(file, "rb") as fh:
                fh.seek(start)
                pos = start
                while pos < end:
                    n = min(1 << 20, end - pos)
                    if self.break_after is not None and name.endswith(".safetensors"):
                        with self.lock:
                            left = self.break_after - self._weight_bytes
                        if left <= 0:
                            h.close_connection = True
                            h.connection.shutdown(2)  # mid-stream: the client sees a short body
                            return
                        n = min(n, left)
                    data = fh.read(n)
                    h.wfile.write(data)
                    with self.lock:
                        self._served[name] += len(data)
                        if name.endswith(".safetensors"):
                            self._weight_bytes += len(data)
                    pos += len(data)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    def _error(self, h: BaseHTTPRequestHandler, status: int, code: str | None, commit: str | None) -> None:
        h.send_response(status)
        if code:
            h.send_header("X-Error-Code", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Length", "0")
        h.end_headers()


def _write_safetensors(path: Path, entries: list[tuple[str, str, list[int], bytes | None]]) -> dict[str, Any]:
    """Write ``(key, dtype, shape, data or None)`` in this order; None leaves a hole (sparse, reads as zeros)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, dtype, shape, _ in entries:
        n = _DTYPE_NAMES[dtype]
        for d in shape:
            n *= d
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    base = 8 + len(raw)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for key, _, _, data in entries:
            if data is not None:
                fh.seek(base + header[key]["data_offsets"][0])
                fh.write(data)
        fh.truncate(base + offset)
    return header


def write_sharded_checkpoint(
    source: Path, dest: Path, *, lm_rows: int = 4096, alias: bool = False, text_table: bool = True
) -> Path:
    """The real layout from a small single-file checkpoint ``source`` (e.g. tests/factory.make_checkpoint).

    ``model-00001-of-00002.safetensors``: the text table, decoder layers 0-2 (large, sparse), half of the vision
    tensors, one more large language-model tensor, the other half, and (``alias``) the ``wte`` alias of the
    text table; ``model-00002-of-00002.safetensors``: layers 3-4, ``model.norm``, ``lm_head`` (sparse). Each
    sparse tensor is ``[lm_rows, hidden]`` float32. ``text_table=False`` leaves only the alias as the table.
    """
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "preprocessor_config.json"):
        (dest / name).write_bytes((source / name).read_bytes())
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    with safe_open(source / "model.safetensors", framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
            t = fh.get_tensor(key).contiguous()
            dtype = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}[str(t.dtype)]
            tensors[key] = (dtype, list(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes())
    table = tensors["model.embed_tokens.weight"]
    hidden = table[1][1]
    vision = sorted(k for k in tensors if k.startswith(VISION_PREFIX))
    half = len(vision) // 2

    def big(key: str) -> tuple[str, str, list[int], None]:
        return (key, "F32", [lm_rows, hidden], None)

    first: list[tuple[str, str, list[int], bytes | None]] = []
    if text_table:
        first.append(("model.embed_tokens.weight", *table))
    first += [big(f"model.layers.{i}.mlp.down_proj.weight") for i in range(3)]
    first += [(k, *tensors[k]) for k in vision[:half]]
    first.append(big("model.layers.2.mlp.up_proj.weight"))
    first += [(k, *tensors[k]) for k in vision[half:]]
    if alias:
        first.append((VISION_PREFIX + "wte.weight", *table))
    second: list[tuple[str, str, list[int], bytes | None]] = [
        big("model.layers.3.mlp.down_proj.weight"),
        big("model.layers.4.mlp.down_proj.weight"),
        ("model.norm.weight", "F32", [hidden], None),
        ("lm_head.weight", *tensors["lm_head.weight"]),
    ]
    weight_map: dict[str, str] = {}
    for name, entries in (("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)):
        for key in _write_safetensors(dest / name, entries):
            if key != "__metadata__":
                weight_map[key] = name
    total = sum(os.path.getsize(dest / n) for n in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return dest
