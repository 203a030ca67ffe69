"""Checkpoint discovery and loading: vision tensors only, strict checks, hub cache, no pickles."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_35, TINY_128K
from safetensors.torch import save_file

from phi3embed import CheckpointError, ConfigError, Phi3VisionEmbedder
from phi3embed.core.checkpoint import (
    VISION_PREFIX,
    checkpoint_to_module_key,
    module_to_checkpoint_key,
    read_safetensors_header,
    resolve,
)


@pytest.fixture
def ckpt_copy(golden: Path, tmp_path: Path):
    def make(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(golden / "checkpoints" / name, dst)
        return dst

    return make


def golden_embedding(golden: Path, checkpoint: str, num_crops: int, stem: str) -> np.ndarray:
    return np.load(golden / "expected" / checkpoint / str(num_crops) / f"{stem}.npz")["embeddings"]


def vision_bytes(root: Path, *, skip_layers_from: int | None = None) -> int:
    """Payload bytes of the vision tensors, optionally without encoder layers >= ``skip_layers_from``."""

    def counted(key: str) -> bool:
        if not key.startswith(VISION_PREFIX):
            return False
        if skip_layers_from is not None and ".encoder.layers." in key:
            return int(key.split(".encoder.layers.")[1].split(".")[0]) < skip_layers_from
        return True

    total = 0
    for weight_file in sorted(root.glob("*.safetensors")):
        total += sum(i.nbytes for k, i in read_safetensors_header(weight_file).items() if counted(k))
    return total


@pytest.mark.parametrize("name", [TINY_128K, TINY_35])
def test_language_model_tensors_are_never_read(golden: Path, ckpt_copy, name: str) -> None:
    """Overwrite every non-vision tensor's bytes with garbage (NaN), and cut the file right after the last vision
    tensor where possible: loading still works, the result is still the golden one, and exactly the vision bytes
    were read."""
    root = ckpt_copy(name)
    for weight_file in sorted(root.glob("*.safetensors")):
        header = read_safetensors_header(weight_file)
        vision_end = max((i.end for k, i in header.items() if k.startswith(VISION_PREFIX)), default=0)
        with open(weight_file, "r+b") as fh:
            for key, info in header.items():
                if not key.startswith(VISION_PREFIX):
                    fh.seek(info.start)
                    fh.write(b"\xff" * info.nbytes)
            if all(i.start >= vision_end for k, i in header.items() if not k.startswith(VISION_PREFIX)):
                fh.truncate(max(vision_end, 8))  # LM payload stored after the vision tensors: gone entirely
    expected = golden_embedding(golden, name, 4, "rgb_337x335")
    for plain in (False, True):
        emb = Phi3VisionEmbedder.from_pretrained(root, num_crops=4, plain=plain)
        assert emb.checkpoint is not None
        # the fast path stops at layer_idx = -2: of the 3 tiny layers, the last is not even read
        needed = emb.vision_config.clip.num_hidden_layers if plain else emb.vision_config.layers_needed
        assert needed == (3 if plain else 2)
        assert emb.checkpoint.bytes_read == vision_bytes(golden / "checkpoints" / name, skip_layers_from=needed)
        (out,) = emb.encode([golden / "images" / "rgb_337x335.png"])
        assert float(np.abs(out.numpy() - expected).max()) <= 1e-4


def test_weight_files_without_vision_tensors_are_not_even_opened(golden: Path, ckpt_copy) -> None:
    root = ckpt_copy(TINY_128K)  # all vision tensors live in the first weight file, like the real model
    index = json.loads((root / "model.safetensors.index.json").read_text())
    weight_files = {f for k, f in index["weight_map"].items() if k.startswith(VISION_PREFIX)}
    assert weight_files == {"model-00001-of-00002.safetensors"}
    (root / "model-00002-of-00002.safetensors").unlink()
    ckpt = resolve(root)
    assert [p.name for p in ckpt.weight_files] == ["model-00001-of-00002.safetensors"]
    Phi3VisionEmbedder.from_pretrained(root)


def test_stored_dtype_is_cast_to_compute_dtype(golden: Path) -> None:
    root = golden / "checkpoints" / TINY_35
    assert resolve(root).stored_dtypes == {"BF16"}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        emb = Phi3VisionEmbedder.from_pretrained(root, dtype=dtype)
        assert {p.dtype for p in emb.model.parameters()} == {dtype}


def _single_file_checkpoint(golden: Path, tmp_path: Path, edit) -> Path:
    """A single-file copy of the tiny 128k checkpoint's vision tensors, passed through ``edit(tensors)``."""
    src = golden / "checkpoints" / TINY_128K
    ckpt = resolve(src)
    tensors = ckpt.read(ckpt.vision_keys())
    edit(tensors)
    root = tmp_path / "single"
    root.mkdir()
    shutil.copy(src / "config.json", root)
    shutil.copy(src / "preprocessor_config.json", root)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / "model.safetensors"))
    return root


def test_single_file_checkpoint_loads(golden: Path, tmp_path: Path) -> None:
    root = _single_file_checkpoint(golden, tmp_path, lambda t: None)
    (out,) = Phi3VisionEmbedder.from_pretrained(root, num_crops=4).encode([golden / "images" / "tiny_7x9.png"])
    assert float(np.abs(out.numpy() - golden_embedding(golden, TINY_128K, 4, "tiny_7x9")).max()) <= 1e-4


def test_missing_vision_tensor_is_named(golden: Path, tmp_path: Path) -> None:
    key = VISION_PREFIX + "img_processor.vision_model.encoder.layers.1.mlp.fc2.bias"
    root = _single_file_checkpoint(golden, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"missing 1: .*layers\.1\.mlp\.fc2\.bias"):
        Phi3VisionEmbedder.from_pretrained(root)


def test_unexpected_vision_tensor_is_named(golden: Path, tmp_path: Path) -> None:
    key = VISION_PREFIX + "extra.weight"
    root = _single_file_checkpoint(golden, tmp_path, lambda t: t.__setitem__(key, torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"unexpected 1: model\.vision_embed_tokens\.extra\.weight"):
        Phi3VisionEmbedder.from_pretrained(root)


def test_tied_wte_alias_is_accepted_and_never_read_for_encoding(golden: Path, tmp_path: Path) -> None:
    """A fine-tune re-saved from the official class carries the text table again as ...vision_embed_tokens.wte:
    the strict loader accepts it without reading it, and the text table falls back to it."""
    table = torch.randn(64, 96)
    alias = VISION_PREFIX + "wte.weight"
    root = _single_file_checkpoint(golden, tmp_path, lambda t: t.__setitem__(alias, table))
    plain = Phi3VisionEmbedder.from_pretrained(golden / "checkpoints" / TINY_128K, num_crops=4)
    emb = Phi3VisionEmbedder.from_pretrained(root, num_crops=4)
    assert emb.checkpoint is not None and alias not in emb.checkpoint.tensors
    assert emb.checkpoint.bytes_read == sum(emb.checkpoint.tensors[k].nbytes for k in emb.checkpoint.tensors) - sum(
        i.nbytes for k, i in emb.checkpoint.tensors.items() if ".layers.2." in k
    )
    assert emb.fingerprint == plain.fingerprint
    from phi3embed import load_text_embeddings

    assert torch.equal(load_text_embeddings(root), table)  # no model.embed_tokens.weight here: the alias


def test_misshaped_vision_tensor_is_named(golden: Path, tmp_path: Path) -> None:
    key = VISION_PREFIX + "sub_GN"
    root = _single_file_checkpoint(golden, tmp_path, lambda t: t.__setitem__(key, torch.zeros(1, 1, 1, 7)))
    with pytest.raises(
        CheckpointError, match=r"wrong shape: .*sub_GN \(checkpoint \[1, 1, 1, 7\], model \[1, 1, 1, 256\]\)"
    ):
        Phi3VisionEmbedder.from_pretrained(root)


def test_truncated_vision_tensor_is_an_error(golden: Path, ckpt_copy) -> None:
    root = ckpt_copy(TINY_128K)
    weight_file = root / "model-00001-of-00002.safetensors"
    header = read_safetensors_header(weight_file)
    last = max(i.end for k, i in header.items() if k.startswith(VISION_PREFIX))
    with open(weight_file, "r+b") as fh:
        fh.truncate(last - 3)
    with pytest.raises(CheckpointError, match="truncated"):
        Phi3VisionEmbedder.from_pretrained(root)


def test_pickle_checkpoints_are_refused(golden: Path, tmp_path: Path) -> None:
    root = tmp_path / "pickled"
    root.mkdir()
    shutil.copy(golden / "checkpoints" / TINY_128K / "config.json", root)
    (root / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        Phi3VisionEmbedder.from_pretrained(root)


def test_garbage_safetensors_header(golden: Path, ckpt_copy) -> None:
    root = ckpt_copy(TINY_128K)
    weight_file = root / "model-00001-of-00002.safetensors"
    weight_file.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Phi3VisionEmbedder.from_pretrained(root)


def test_config_errors_are_typed(golden: Path, ckpt_copy) -> None:
    root = ckpt_copy(TINY_128K)
    cfg = json.loads((root / "config.json").read_text())
    cfg["embd_layer"]["projection_cls"] = "conv"
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="projection_cls 'conv'"):
        Phi3VisionEmbedder.from_pretrained(root)
    (root / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: cannot parse JSON"):
        Phi3VisionEmbedder.from_pretrained(root)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        Phi3VisionEmbedder.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="expected a checkpoint directory"):
        Phi3VisionEmbedder.from_pretrained(tmp_path / "file")


def test_key_mapping_is_a_pure_round_trip() -> None:
    ck = VISION_PREFIX + "img_processor.vision_model.encoder.layers.3.self_attn.q_proj.weight"
    assert checkpoint_to_module_key(ck, clip_prefix="clip.") == "clip.encoder.layers.3.self_attn.q_proj.weight"
    assert (
        checkpoint_to_module_key(ck, clip_prefix="clip.vision_model.")
        == "clip.vision_model.encoder.layers.3.self_attn.q_proj.weight"
    )
    for prefix in ("clip.", "clip.vision_model."):
        assert (
            module_to_checkpoint_key(checkpoint_to_module_key(ck, clip_prefix=prefix) or "", clip_prefix=prefix) == ck
        )
    assert (
        checkpoint_to_module_key(VISION_PREFIX + "img_projection.2.bias", clip_prefix="clip.")
        == "img_projection.2.bias"
    )
    assert checkpoint_to_module_key("model.embed_tokens.weight", clip_prefix="clip.") is None
    assert checkpoint_to_module_key("lm_head.weight", clip_prefix="clip.") is None


def _fake_hub_cache(golden: Path, cache: Path, repo_id: str, *, drop: tuple[str, ...] = ()) -> None:
    """The Hugging Face cache layout: models--owner--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in (golden / "checkpoints" / TINY_128K).iterdir():
        if f.name not in drop:
            shutil.copy(f, snap / f.name)


def _run_offline(cache: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def offline(golden: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], list]:
    """One fresh offline process (HF_HUB_OFFLINE is read at import) for both hub-cache tests: a cache that
    holds someone/tiny-phi3v (without its language-model-only weight file, which must not be needed) and nothing
    else. Its stdout: one JSON line for the sources missing from the cache, then one for the encode."""
    cache = tmp_path_factory.mktemp("offline") / "hub"
    _fake_hub_cache(golden, cache, "someone/tiny-phi3v", drop=("model-00002-of-00002.safetensors",))
    code = (
        "import json, numpy as np, phi3embed\n"
        "errors = []\n"
        "for source in ('microsoft/Phi-3.5-vision-instruct', 'phi-3-vision-128k-instruct'):\n"
        "    try:\n"
        "        phi3embed.Phi3VisionEmbedder.from_pretrained(source)\n"
        "    except phi3embed.CheckpointError as e:\n"
        "        errors.append(str(e))\n"
        "print(json.dumps(errors), flush=True)\n"
        "e = phi3embed.Phi3VisionEmbedder.from_pretrained('someone/tiny-phi3v', num_crops=4)\n"
        "assert e.checkpoint.from_hub\n"
        f"(o,) = e.encode([{str(golden / 'images' / 'tiny_7x9.png')!r}])\n"
        f"ref = np.load({str(golden / 'expected' / TINY_128K / '4' / 'tiny_7x9.npz')!r})['embeddings']\n"
        "print(json.dumps(float(abs(o.numpy() - ref).max())))\n"
    )
    proc = _run_offline(cache, code)
    return proc, [json.loads(line) for line in proc.stdout.splitlines()]


def test_hub_id_resolves_from_local_cache_offline(offline: tuple[subprocess.CompletedProcess[str], list]) -> None:
    proc, printed = offline
    assert proc.returncode == 0, proc.stderr
    assert len(printed) == 2 and printed[1] <= 1e-4


def test_hub_id_or_preset_missing_from_cache_offline_is_a_clear_error(
    offline: tuple[subprocess.CompletedProcess[str], list],
) -> None:
    proc, printed = offline
    assert printed, proc.stderr
    lines = printed[0]
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        "microsoft/Phi-3.5-vision-instruct: offline mode (HF_HUB_OFFLINE=1) and the model is not in the Hugging Face"
    )
    assert "phi3embed download microsoft/Phi-3.5-vision-instruct" in lines[0]
    # a preset name resolves to its hub id
    assert lines[1].startswith("microsoft/Phi-3-vision-128k-instruct: offline mode (HF_HUB_OFFLINE=1)")
