"""info (phi3embed.core.info) and its command; configs-only resolution (checkpoint.resolve_configs)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import typer
from conftest import TINY_35, TINY_128K
from safetensors import safe_open
from typer.testing import CliRunner

from phi3embed.core.checkpoint import Checkpoint, resolve, resolve_configs
from phi3embed.core.config import vision_config_from_dict
from phi3embed.core.info import model_info
from phi3embed.core.model import Phi3VisionModel
from phi3embed.errors import CheckpointError


def _fake_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    """A Hugging Face cache entry holding ``source``'s config files (no weights) at revision main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(source / name, snapshot / name)


def test_resolve_configs_reads_only_configs(golden: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    # a local directory: configs only (the weights are not even opened)
    vision, pre = resolve_configs(golden / "checkpoints" / TINY_35)
    assert (vision.lm_hidden_size, vision.clip.hidden_size, pre.num_crops) == (96, 64, 4)
    # presets need no network and no files
    vision, pre = resolve_configs("microsoft/Phi-3.5-vision-instruct")
    assert (vision.lm_hidden_size, vision.layers_needed, pre.num_crops) == (3072, 23, 4)
    assert resolve_configs("phi3v")[1].num_crops == 16
    # any other hub id: config files from the cache (offline here), nothing else
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    _fake_hub_cache(tmp_path, "acme/tiny-vision", golden / "checkpoints" / TINY_128K)
    vision, pre = resolve_configs("acme/tiny-vision")
    assert (vision.lm_hidden_size, pre.num_crops) == (96, 16)
    with pytest.raises(CheckpointError, match="not in the Hugging Face or phi3embed cache") as err:
        resolve_configs("acme/not-cached")
    assert str(err.value).startswith("acme/not-cached: offline mode")
    with pytest.raises(CheckpointError, match="not a hub id"):
        resolve_configs(tmp_path / "no" / "such" / "dir")


def _header_params(root: Path) -> tuple[int, set[str]]:
    """Vision parameter count and dtypes from safetensors headers, via the safetensors library."""
    index = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    total, dtypes = 0, set()
    for key, fname in index.items():
        if key.startswith("model.vision_embed_tokens."):
            with safe_open(root / fname, framework="pt") as fh:
                sl = fh.get_slice(key)
                total += math.prod(sl.get_shape())
                dtypes.add(sl.get_dtype())
    return total, dtypes


@pytest.mark.parametrize("name", [TINY_128K, TINY_35])
def test_info_on_golden_checkpoints(
    golden: Path, manifest: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_read(self: Checkpoint, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("info read tensor data")

    root = golden / "checkpoints" / name
    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "read", no_read)
        info = model_info(root)
    assert info.bytes_read == 0 and info.checkpoint.bytes_read == 0
    params, dtypes = _header_params(root)
    assert info.vision_params == params
    facts = manifest["checkpoints"][name]
    assert info.stored_dtypes == sorted(dtypes) == [{"float32": "F32", "bfloat16": "BF16"}[facts["dtype"]]]
    assert info.variant == {"128k": "phi-3-vision-128k-instruct", "3.5": "phi-3.5-vision-instruct"}[facts["style"]]
    assert info.num_crops == facts["preprocessor_num_crops"]
    assert info.num_crops_source == "preprocessor_config.json"
    assert info.lm_hidden_size == facts["lm_hidden_size"] and info.clip.hidden_size == facts["image_dim_out"]
    assert info.layers_run == info.clip.num_hidden_layers - 1 and info.layer_idx == facts["layer_idx"]
    assert info.location == "local directory" and Path(info.root) == root
    by_shard = {s: keys for s, keys in facts["vision_keys_by_shard"].items() if keys}
    assert {Path(w.path).name: w.vision_tensors for w in info.weight_files} == {s: len(k) for s, k in by_shard.items()}
    assert info.tensors_check == "ok"
    # what info says encode reads is what loading the fast model actually reads
    ckpt = resolve(root)
    model, _ = Phi3VisionModel.from_checkpoint(ckpt, vision_config_from_dict(ckpt.config))
    assert ckpt.bytes_read == info.bytes_to_read < info.vision_bytes
    assert sum(p.numel() for p in model.parameters()) == info.vision_params_run < info.vision_params
    json.dumps(info.to_dict())


def test_info_num_crops_override_and_mismatched_config(golden: Path, tmp_path: Path) -> None:
    info = model_info(golden / "checkpoints" / TINY_128K, num_crops=9)
    assert (info.num_crops, info.num_crops_source) == (9, "argument")
    copy = tmp_path / "ckpt"
    shutil.copytree(golden / "checkpoints" / TINY_128K, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["clip_vision_config"]["num_hidden_layers"] = 2
    (copy / "config.json").write_text(json.dumps(cfg))
    info = model_info(copy)
    assert info.tensors_check.startswith("vision tensors do not match config.json: unexpected")
    assert info.bytes_read == 0


def test_cli_info(app: typer.Typer, runner: CliRunner, golden: Path, tmp_path: Path) -> None:
    model = str(golden / "checkpoints" / TINY_35)
    result = runner.invoke(app, ["info", "--model", model, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["bytes_read"] == 0 and doc["variant"] == "phi-3.5-vision-instruct"
    assert doc["stored_dtypes"] == ["BF16"] and doc["vision_params"] == _header_params(Path(model))[0]
    result = runner.invoke(app, ["info"], env={"PHI3EMBED_MODEL": model})
    assert result.exit_code == 0, result.output
    assert "phi-3.5-vision-instruct" in result.stdout and "BF16" in result.stdout
    absent = str(tmp_path / "nothing")
    result = runner.invoke(app, ["info", "--model", absent])
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and absent in result.stderr
