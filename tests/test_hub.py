"""Hub ids against a real HTTP server on 127.0.0.1 (tests/hubserver.py): range reads of only the needed bytes, the
vision-only cache, offline reruns, the no-network failure, a broken download, --revision, the wte alias, info and
download. Nothing here contacts any other address: huggingface_hub's endpoint constants point at the server (or at
a closed port of 127.0.0.1) and its telemetry is off."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import typer
from factory import make_checkpoint
from hubserver import FakeHub, huggingface_hub_settings, write_sharded_checkpoint
from typer.testing import CliRunner

from phi3embed import CheckpointError, Phi3VisionEmbedder, load_text_embeddings
from phi3embed.cli.inspect_commands import register
from phi3embed.core import hub
from phi3embed.core.checkpoint import VISION_PREFIX, read_safetensors_header, resolve
from phi3embed.core.info import model_info

REPO = "acme/tiny-phi3v"
C1 = "1" * 40  # tag v1
C2 = "2" * 40  # main
LM_ROWS = 65536  # each sparse language-model tensor: 65536 x 40 float32 = 10.5 MB


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two commits of one repository in the real layout (different weights), and the same as local folders."""
    base = tmp_path_factory.mktemp("repos")
    src1 = make_checkpoint(base / "src1", seed=1)
    src2 = make_checkpoint(base / "src2", seed=2)
    return {
        C1: write_sharded_checkpoint(src1, base / "c1", lm_rows=LM_ROWS),
        C2: write_sharded_checkpoint(src2, base / "c2", lm_rows=LM_ROWS, alias=True),
    }


def _point_hf_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, tmp_path: Path, *, offline: bool = False) -> None:
    for module, name, value in huggingface_hub_settings(endpoint, hf_cache=str(tmp_path / "hf-hub"), offline=offline):
        monkeypatch.setattr(module, name, value)
    monkeypatch.setenv("PHI3EMBED_CACHE", str(tmp_path / "phi3embed-cache"))
    monkeypatch.delenv("PHI3EMBED_MODEL", raising=False)


@pytest.fixture()
def server(repos: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub({REPO: dict(repos)}, {REPO: {"main": C2, "v1": C1}}) as fake:
        _point_hf_at(monkeypatch, fake.url, tmp_path)
        yield fake


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens here once the socket is closed


def _vision_bytes(folder: Path) -> int:
    header = read_safetensors_header(folder / "model-00001-of-00002.safetensors")
    return sum(i.nbytes for k, i in header.items() if k.startswith(VISION_PREFIX) and not k.endswith(".wte.weight"))


def _header_bytes(folder: Path) -> int:
    with open(folder / "model-00001-of-00002.safetensors", "rb") as fh:
        return 8 + int.from_bytes(fh.read(8), "little")


def _image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "img.png"
    Image.frombytes("RGB", (53, 37), bytes(range(256)) * (53 * 37 * 3 // 256) + bytes(53 * 37 * 3 % 256)).save(path)
    return path


def test_plan_ranges_coalesces_within_budget() -> None:
    assert hub.plan_ranges([(10, 20), (20, 30), (0, 5)]) == [(0, 5), (10, 30)]  # 5-byte gap > 2% of 25 bytes
    spans = [(i * 1000, i * 1000 + 990) for i in range(100)]  # 99 gaps of 10 bytes = 1% of the payload
    assert hub.plan_ranges(spans) == [(0, 99_990)]
    assert hub.plan_ranges([(0, 1000), (1000 + hub.MAX_GAP + 1, 2 * hub.MAX_GAP)], budget=10.0) == [
        (0, 1000),
        (1000 + hub.MAX_GAP + 1, 2 * hub.MAX_GAP),
    ]
    pieces = hub.plan_ranges([(0, 150)], max_request=64)
    assert pieces == [(0, 64), (64, 128), (128, 150)]


def test_first_run_fetches_only_the_vision_bytes_and_matches_a_local_run(
    server: FakeHub, repos: dict[str, Path], tmp_path: Path
) -> None:
    folder = repos[C2]
    whole = (folder / "model-00001-of-00002.safetensors").stat().st_size
    emb = Phi3VisionEmbedder.from_pretrained(REPO, num_crops=4)
    ckpt = emb.checkpoint
    assert ckpt is not None and ckpt.location == "phi3embed cache" and ckpt.commit == C2
    entry = Path(os.environ["PHI3EMBED_CACHE"]) / "models--acme--tiny-phi3v" / C2 / "vision"
    assert ckpt.root == entry and sorted(p.name for p in entry.iterdir()) == [
        "config.json",
        "model.safetensors",
        "phi3embed-origin.json",
        "preprocessor_config.json",
    ]
    # bytes: the vision tensors (plus at most 5% from merged gaps) and the header; no language-model tensor
    vision = _vision_bytes(folder)
    served = server.served
    assert set(served) == {
        "config.json",
        "preprocessor_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
    }
    header = max(hub.HEADER_PROBE, _header_bytes(folder))
    assert served["model-00001-of-00002.safetensors"] <= 1.05 * vision + header
    assert served["model-00001-of-00002.safetensors"] < whole / 50
    origin = json.loads((entry / "phi3embed-origin.json").read_text())
    assert origin["commit"] == C2 and origin["repo_id"] == REPO and origin["tensor_bytes"] == vision
    assert origin["weight_files"][0]["name"] == "model-00001-of-00002.safetensors"
    assert origin["weight_files"][0]["etag"] and origin["weight_files"][0]["size"] == whole
    # the entry holds the stored bytes: same fingerprint and outputs as the local folder
    local = Phi3VisionEmbedder.from_pretrained(folder, num_crops=4)
    assert emb.fingerprint == local.fingerprint
    image = _image(tmp_path)
    assert torch.equal(emb.encode([image])[0], local.encode([image])[0])
    # a second run fetches no weight bytes (one HEAD tells the commit)
    server.reset_counts()
    again = resolve(REPO)
    assert again.root == entry and server.weight_bytes_served == 0


def test_offline_rerun_needs_no_server(repos: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub({REPO: dict(repos)}, {REPO: {"main": C2, "v1": C1}}) as fake:
        _point_hf_at(monkeypatch, fake.url, tmp_path)
        online = resolve(REPO, revision="v1")
        fingerprint = Phi3VisionEmbedder.from_pretrained(online.root).fingerprint
    # server gone: HF_HUB_OFFLINE=1 and a plain unreachable hub both use the cache, through refs/v1
    for offline in (True, False):
        _point_hf_at(monkeypatch, _closed_port(), tmp_path, offline=offline)
        start = time.monotonic()
        emb = Phi3VisionEmbedder.from_pretrained(REPO, revision="v1")
        assert time.monotonic() - start < 5
        assert emb.fingerprint == fingerprint and emb.checkpoint is not None and emb.checkpoint.commit == C1
    with pytest.raises(CheckpointError, match="not cached"):  # main was never fetched
        resolve(REPO)


def test_no_network_and_nothing_cached_fails_fast_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    _point_hf_at(monkeypatch, _closed_port(), tmp_path)
    start = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        resolve(REPO)
    assert time.monotonic() - start < 3
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{REPO}: the hub cannot be reached (")
    assert f"phi3embed download {REPO}" in message and "HF_HUB_OFFLINE=1" in message and "local checkpoint" in message
    assert capfd.readouterr().err == ""  # no retry noise
    app = typer.Typer()
    register(app)
    for args in (["info", "--model", REPO], ["download", REPO]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and result.stdout == ""
        assert result.stderr.strip().splitlines() == [f"error: {message}"]


def test_broken_download_leaves_no_entry_and_the_next_run_completes(
    server: FakeHub, repos: dict[str, Path], tmp_path: Path
) -> None:
    server.break_after = hub.HEADER_PROBE + 50_000  # the header, then a part of the tensors
    with pytest.raises(CheckpointError, match="run again to start over|short of the range"):
        resolve(REPO)
    repo_dir = Path(os.environ["PHI3EMBED_CACHE"]) / "models--acme--tiny-phi3v"
    assert not (repo_dir / C2 / "vision").exists()
    assert list((repo_dir / C2).glob(".tmp-*")) == []
    # a killed process leaves its temporary folder: the next fetch removes it and starts over
    (repo_dir / C2 / ".tmp-vision-999999-deadbeef").mkdir()
    (repo_dir / C2 / ".tmp-vision-999999-deadbeef" / "model.safetensors").write_bytes(b"half")
    server.break_after = None
    ckpt = resolve(REPO)
    assert ckpt.root == repo_dir / C2 / "vision" and list((repo_dir / C2).glob(".tmp-*")) == []
    assert (
        Phi3VisionEmbedder.from_pretrained(REPO).fingerprint
        == Phi3VisionEmbedder.from_pretrained(repos[C2]).fingerprint
    )


def test_a_server_that_ignores_ranges_is_refused(server: FakeHub) -> None:
    server.ignore_range = True
    with pytest.raises(CheckpointError, match="ignored the byte range"):
        resolve(REPO)
    assert server.weight_bytes_served < 10 * 1024 * 1024  # stopped early: not the 53 MB file


def test_revision_pins_branch_tag_or_commit(server: FakeHub, repos: dict[str, Path]) -> None:
    fp = {c: Phi3VisionEmbedder.from_pretrained(repos[c]).fingerprint for c in (C1, C2)}
    assert fp[C1] != fp[C2]
    assert Phi3VisionEmbedder.from_pretrained(REPO, revision="v1").fingerprint == fp[C1]
    assert Phi3VisionEmbedder.from_pretrained(REPO, revision=C1).fingerprint == fp[C1]
    assert Phi3VisionEmbedder.from_pretrained(REPO).fingerprint == fp[C2]
    with pytest.raises(CheckpointError, match="no such revision"):
        resolve(REPO, revision="v9")
    with pytest.raises(CheckpointError, match="no such repository"):
        resolve("acme/absent")


def test_text_table_and_wte_alias(server: FakeHub, repos: dict[str, Path], tmp_path: Path) -> None:
    """main carries the wte alias after the vision tensors: encode never fetches it; the text table is fetched
    alone into its own entry; a repo whose only table is the alias serves it to load_text_embeddings."""
    emb = Phi3VisionEmbedder.from_pretrained(REPO)
    assert emb.checkpoint is not None and VISION_PREFIX + "wte.weight" not in emb.checkpoint.tensors
    header = read_safetensors_header(repos[C2] / "model-00001-of-00002.safetensors")
    alias = header[VISION_PREFIX + "wte.weight"]
    asked = [r for _, p, r in server.requests if r and p.endswith("00002.safetensors") is False and "00001" in p]
    for r in asked:
        start, end = (int(x) for x in r.removeprefix("bytes=").split("-"))
        assert end < alias.start or start >= alias.end, r
    server.reset_counts()
    table = load_text_embeddings(REPO)
    assert torch.equal(table, load_text_embeddings(repos[C2]))
    assert server.weight_bytes_served <= table.numel() * 4 + hub.HEADER_PROBE
    entry = Path(os.environ["PHI3EMBED_CACHE"]) / "models--acme--tiny-phi3v" / C2 / "text"
    assert list(read_safetensors_header(entry / "model.safetensors")) == ["model.embed_tokens.weight"]
    # only the alias holds the table
    base = tmp_path / "alias-only"
    only_alias = write_sharded_checkpoint(
        make_checkpoint(base / "src", seed=3), base / "repo", alias=True, text_table=False
    )
    server.repos["acme/alias-only"] = {C1: only_alias}
    assert torch.equal(load_text_embeddings("acme/alias-only", revision=C1), load_text_embeddings(only_alias))
    Phi3VisionEmbedder.from_pretrained("acme/alias-only", revision=C1)


def test_info_reads_headers_only_and_predicts_the_fetch(server: FakeHub, repos: dict[str, Path]) -> None:
    info = model_info(REPO)
    assert info.location == "hub" and info.commit == C2 and info.bytes_read == 0
    assert info.tensors_check == "ok" and info.vision_bytes == _vision_bytes(repos[C2])
    (wf,) = info.weight_files
    assert wf.path == "model-00001-of-00002.safetensors" and wf.size == info.whole_files_bytes
    assert server.weight_bytes_served == max(hub.HEADER_PROBE, _header_bytes(repos[C2]))  # the header only
    server.reset_counts()
    resolve(REPO)
    assert server.weight_bytes_served == info.bytes_to_fetch  # what info said encode would fetch
    cached = model_info(REPO)
    assert cached.location == "phi3embed cache" and cached.bytes_to_fetch == 0


def test_download_command(server: FakeHub) -> None:
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["download", REPO, "--revision", "v1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["commit"] == C1 and doc["location"] == "phi3embed cache" and doc["bytes_fetched"] > 0
    assert doc["bytes_fetched"] == server.weight_bytes_served
    assert Path(doc["paths"][0]).is_dir()
    result = runner.invoke(app, ["download", REPO, "--revision", "v1"])
    assert result.exit_code == 0 and "already in the phi3embed cache, nothing fetched" in result.stdout
    result = runner.invoke(app, ["download", REPO])
    assert result.exit_code == 0 and "fetched" in result.stdout and "bytes" in result.stdout
    result = runner.invoke(app, ["info", "--model", REPO, "--revision", "v1"])
    assert result.exit_code == 0 and "phi3embed cache" in result.stdout and C1 in result.stdout


def test_a_complete_hugging_face_cache_is_used_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import hf_hub_download

    folder = write_sharded_checkpoint(make_checkpoint(tmp_path / "src"), tmp_path / "repo", lm_rows=64)
    with FakeHub({REPO: {C1: folder}}, {REPO: {"main": C1}}) as fake:
        _point_hf_at(monkeypatch, fake.url, tmp_path)
        for name in ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors"):
            hf_hub_download(REPO, name)
        fake.reset_counts()
        ckpt = resolve(REPO)
        assert ckpt.location == "hub cache" and fake.weight_bytes_served == 0
        assert str(ckpt.root).startswith(str(tmp_path / "hf-hub"))
        assert not (tmp_path / "phi3embed-cache" / "models--acme--tiny-phi3v" / C1).exists()


def test_single_file_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_checkpoint(tmp_path / "single")
    with FakeHub({REPO: {C1: folder}}, {REPO: {"main": C1}}) as fake:
        _point_hf_at(monkeypatch, fake.url, tmp_path)
        emb = Phi3VisionEmbedder.from_pretrained(REPO)
        assert emb.fingerprint == Phi3VisionEmbedder.from_pretrained(folder).fingerprint
        assert "lm_head.weight" not in read_safetensors_header(emb.checkpoint.root / "model.safetensors")  # type: ignore[union-attr]


@pytest.mark.e2e
def test_cli_through_the_environment(repos: dict[str, Path], tmp_path: Path) -> None:
    """The console script with HF_ENDPOINT / HF_HUB_OFFLINE as a user sets them (read at import): download, then
    encode offline with the server gone; and a fresh machine with no network: one line, exit 2, fast."""
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "PHI3EMBED_CACHE": str(tmp_path / "cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    env.pop("PHI3EMBED_MODEL", None)
    cli = [sys.executable, "-m", "phi3embed"]
    with FakeHub({REPO: dict(repos)}, {REPO: {"main": C2, "v1": C1}}) as fake:
        env["HF_ENDPOINT"] = fake.url
        done = subprocess.run([*cli, "download", REPO], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"{REPO} @ {C2}: fetched" in done.stdout
    image = _image(tmp_path)
    run = subprocess.run(
        [*cli, "encode", image.name, "--out", str(tmp_path / "hub-out"), "--model", REPO, "--quiet"],
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    local = subprocess.run(
        [*cli, "encode", image.name, "--out", str(tmp_path / "local-out"), "--model", str(repos[C2]), "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert local.returncode == 0, local.stderr
    hub_out = (tmp_path / "hub-out" / "img.png.npy").read_bytes()
    assert hub_out == (tmp_path / "local-out" / "img.png.npy").read_bytes()
    fingerprints = {
        json.loads((tmp_path / d / "manifest.jsonl").read_text().splitlines()[0])["fingerprint"]
        for d in ("hub-out", "local-out")
    }
    assert len(fingerprints) == 1
    env["HF_ENDPOINT"] = _closed_port()
    env["HF_HOME"] = str(tmp_path / "fresh-hf")
    env["PHI3EMBED_CACHE"] = str(tmp_path / "fresh-cache")
    start = time.monotonic()
    failed = subprocess.run([*cli, "info", "--model", REPO], env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and time.monotonic() - start < 20  # most of it is importing torch
    assert len(failed.stderr.strip().splitlines()) == 1 and "the hub cannot be reached" in failed.stderr
