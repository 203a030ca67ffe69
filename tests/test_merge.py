"""merge_image_embeddings and load_text_embeddings: golden merge cases, official rules, the by_id fix, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_35, TINY_128K, load_manifest
from safetensors import safe_open
from safetensors.torch import save_file

from phi3embed import Phi3VisionEmbedder, load_text_embeddings, merge_image_embeddings
from phi3embed.core.checkpoint import resolve
from phi3embed.core.layout import TEXT_EMBED_KEY
from phi3embed.core.prompt import PlaceholderRun, placeholder_runs, read_text_embeddings
from phi3embed.errors import CheckpointError, MergeError, Phi3EmbedError

MERGE_CASES = load_manifest()["merge_cases"]


@pytest.fixture(scope="module")
def golden_inputs(golden: Path) -> dict[str, dict[str, Any]]:
    """Per merge case: npz contents, the images' embeddings from our embedder, and the checkpoint's table."""
    out: dict[str, dict[str, Any]] = {}
    embedders: dict[tuple[str, int], Phi3VisionEmbedder] = {}
    for case in MERGE_CASES:
        ckpt = golden / "checkpoints" / case["checkpoint"]
        key = (case["checkpoint"], case["num_crops"])
        if key not in embedders:
            embedders[key] = Phi3VisionEmbedder.from_pretrained(ckpt, num_crops=case["num_crops"])
        embedder = embedders[key]
        data = dict(np.load(golden / case["file"]))
        items = [embedder.preprocess(golden / p) for p in case["images"]]
        out[case["name"]] = {
            "data": data,
            "items": items,
            "embeds": embedder.embed(items),
            "table": load_text_embeddings(ckpt),
        }
    return out


def test_merge_npz_files_hold_what_the_tests_read(golden: Path) -> None:
    assert MERGE_CASES, "MANIFEST.json lists no merge cases"
    for case in MERGE_CASES:
        keys = set(np.load(golden / case["file"]).files)
        assert {"input_ids", "image_sizes", "hidden_states"} <= keys, keys
        assert list(np.load(golden / case["file"])["input_ids"].shape) == case["input_ids_shape"]


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: c["name"])
@pytest.mark.parametrize("by_id", [False, True], ids=["official", "by_id"])
def test_golden_merge(case: dict[str, Any], by_id: bool, golden_inputs: dict[str, Any], manifest: dict) -> None:
    g = golden_inputs[case["name"]]
    data = g["data"]
    assert [tuple(it.image_sizes) for it in g["items"]] == [tuple(s) for s in data["image_sizes"].tolist()]
    ids = torch.from_numpy(data["input_ids"])
    out = merge_image_embeddings(ids, g["embeds"], g["table"], by_id=by_id)
    expected = torch.from_numpy(data["hidden_states"])
    assert out.shape == expected.shape == tuple(case["hidden_states_shape"])
    diff = (out - expected).abs().max().item()
    print(f"merge {case['name']} ({'by_id' if by_id else 'official'}): max|diff| = {diff:.3g}")
    assert diff <= manifest["tolerances"]["merge_hidden_states"]["atol"]


@pytest.mark.parametrize("case", MERGE_CASES, ids=lambda c: c["name"])
def test_placeholder_runs_match_the_manifest(case: dict[str, Any], golden: Path) -> None:
    ids = torch.from_numpy(np.load(golden / case["file"])["input_ids"])
    runs = placeholder_runs(ids)
    n_images = len(case["images"])
    assert len(runs) == n_images
    for expected in case.get("image_token_runs", []):
        assert (
            PlaceholderRun(row=0, start=expected["start"], length=expected["length"], image_id=-expected["id"]) in runs
        )
    assert sum(r.length for r in runs) == int((ids < 0).sum())


def test_merge_does_not_mutate_its_inputs(golden_inputs: dict[str, Any]) -> None:
    for g in golden_inputs.values():
        ids = torch.from_numpy(g["data"]["input_ids"].copy())
        embeds = [e.clone() for e in g["embeds"]]  # ordinary tensors (the embedder returns inference tensors)
        tensors = [ids, g["table"], *embeds]
        before = [(t.clone(), t._version) for t in tensors]
        for by_id in (False, True):
            merge_image_embeddings(ids, embeds, g["table"], by_id=by_id)
        for t, (copy, version) in zip(tensors, before, strict=True):
            assert torch.equal(t, copy)
            assert t._version == version  # no in-place operation touched it


# --------------------------------------------------------------------------- rules on small synthetic inputs

V, D = 40, 6


@pytest.fixture()
def table() -> torch.Tensor:
    return torch.randn(V, D, generator=torch.Generator().manual_seed(0))


def _img(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_official_rule_ignores_the_ids_and_by_id_fixes_it(table: torch.Tensor) -> None:
    """docs/pipeline.md §14.2 item 4: <|image_2|> written before <|image_1|> still gets image 1 first (official)."""
    img1, img2 = _img(2, 1), _img(3, 2)
    ids = torch.tensor([[5, -2, -2, -2, 7, -1, -1, 9]])
    official = merge_image_embeddings(ids, [img1, img2], table)
    rows = torch.cat([img1, img2])
    assert torch.equal(official[0, [1, 2, 3, 5, 6]], rows)  # position order, ids ignored
    fixed = merge_image_embeddings(ids, [img1, img2], table, by_id=True)
    assert torch.equal(fixed[0, 1:4], img2)
    assert torch.equal(fixed[0, 5:7], img1)
    for out in (official, fixed):
        assert torch.equal(out[0, [0, 4, 7]], table[[5, 7, 9]])


def test_text_ids_are_clamped_into_the_vocabulary(table: torch.Tensor) -> None:
    ids = torch.tensor([0, V - 1, V, V + 100, -(10**9), -(10**9) - 5, 3])
    out = merge_image_embeddings(ids, [], table)
    assert out.shape == (1, ids.numel(), D)  # [L] is treated as [1, L]
    assert torch.equal(out[0], table[[0, V - 1, V - 1, V - 1, 0, 0, 3]])
    small = merge_image_embeddings(torch.tensor([[30, 5]]), [], table, vocab_size=10)
    assert torch.equal(small[0], table[[9, 5]])


def test_placeholders_may_be_split_over_runs_and_rows(table: torch.Tensor) -> None:
    """docs/pipeline.md §16.10: positions are enumerated row-major, whatever the runs look like."""
    img1, img2 = _img(5, 3), _img(4, 4)
    ids = torch.tensor([[1, 2, -1, -1, 3, -1, -1], [-1, -1, 4, -1, -1, -1, 0]])
    out = merge_image_embeddings(ids, [img1, img2], table)
    rows = iter(torch.cat([img1, img2]))
    expected = table[ids.clamp(0, V - 1)]
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if ids[b, t] < 0:
                expected[b, t] = next(rows)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "n_rows, message",
    [(3, r"5 image placeholder tokens but the 1 image\(s\) have 3 = 3"), (7, r"5 image placeholder tokens .* have 7")],
)
def test_count_mismatch_is_a_typed_error(table: torch.Tensor, n_rows: int, message: str) -> None:
    ids = torch.tensor([[1, -1, -1, -1, -1, -1, 2]])
    with pytest.raises(MergeError, match=message) as info:
        merge_image_embeddings(ids, [_img(n_rows, 5)], table)
    assert isinstance(info.value, ValueError) and isinstance(info.value, Phi3EmbedError)


def test_images_without_placeholders_and_placeholders_without_images_are_errors(table: torch.Tensor) -> None:
    with pytest.raises(MergeError, match="0 image placeholder tokens"):
        merge_image_embeddings(torch.tensor([[1, 2]]), [_img(2, 6)], table)
    with pytest.raises(MergeError, match="2 image placeholder tokens"):
        merge_image_embeddings(torch.tensor([[1, -1, -1]]), [], table)


def test_by_id_numbers_images_per_prompt_and_allows_repeated_tags(table: torch.Tensor) -> None:
    a, b, c = _img(2, 7), _img(3, 8), _img(2, 9)
    ids = torch.tensor([[-2, -2, -2, 0, -1, -1, 0, -1, -1], [5, -1, -1, 6, 0, 0, 0, 0, 0]])
    out = merge_image_embeddings(ids, [a, b, c], table, by_id=True)
    assert torch.equal(out[0, 0:3], b)
    assert torch.equal(out[0, 4:6], a)
    assert torch.equal(out[0, 7:9], a)  # <|image_1|> used twice in one prompt
    assert torch.equal(out[1, 1:3], c)  # row 1's image 1 is the third image overall
    adjacent = merge_image_embeddings(torch.tensor([[-1, -1, -1, -1]]), [a], table, by_id=True)
    assert torch.equal(adjacent[0], torch.cat([a, a]))


@pytest.mark.parametrize(
    "ids, images, message",
    [
        ([[-2, -2, 0]], [2], r"row 0: image ids \[2\] are not 1..N"),
        ([[-1, -1, -1, 0]], [2], "has 3 tokens but image 1 has 2"),
        ([[-1, -1, 0]], [2, 2], "refer to 1 image"),
    ],
)
def test_by_id_errors(table: torch.Tensor, ids: list, images: list[int], message: str) -> None:
    with pytest.raises(MergeError, match=message):
        merge_image_embeddings(torch.tensor(ids), [_img(n, i) for i, n in enumerate(images)], table, by_id=True)


def test_embedding_module_dtype_and_gradients(table: torch.Tensor) -> None:
    ids = torch.tensor([[3, -1, -1, 4]])
    img = _img(2, 10).requires_grad_(True)
    as_tensor = merge_image_embeddings(ids, [img], table)
    as_module = merge_image_embeddings(ids, [img], torch.nn.Embedding.from_pretrained(table))
    assert torch.equal(as_tensor, as_module)
    as_tensor.sum().backward()
    assert img.grad is not None and torch.equal(img.grad, torch.ones_like(img))
    half = merge_image_embeddings(ids, [img.detach()], table.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert torch.equal(half[0, 1:3], img.detach().to(torch.bfloat16))


@pytest.mark.parametrize(
    "ids, images, kwargs, message",
    [
        (torch.tensor([[1.0, 2.0]]), [], {}, "integer ids"),
        (torch.zeros(1, 1, 2, dtype=torch.long), [], {}, r"\[L\] or \[B, L\]"),
        (torch.tensor([[1, -1]]), torch.zeros(1, D), {}, "not a single tensor"),
        (torch.tensor([[1, -1]]), [torch.zeros(1, D + 1)], {}, f"{D + 1} wide but the token embeddings are {D} wide"),
        (torch.tensor([[1, -1]]), [torch.zeros(D)], {}, "expected a float"),
        (torch.tensor([[1]]), [], {"vocab_size": V + 1}, "vocab_size"),
        (torch.tensor([[1]]), [], {"vocab_size": 0}, "vocab_size"),
    ],
)
def test_bad_inputs_are_typed_errors(table: torch.Tensor, ids: Any, images: Any, kwargs: dict, message: str) -> None:
    with pytest.raises(MergeError, match=message):
        merge_image_embeddings(ids, images, table, **kwargs)


# --------------------------------------------------------------------------- the text-embedding table


@pytest.mark.parametrize("name", [TINY_128K, TINY_35])
def test_load_text_embeddings_reads_exactly_that_tensor(golden: Path, name: str) -> None:
    root = golden / "checkpoints" / name
    ckpt = resolve(root, with_text_embeddings=True)
    stored = read_text_embeddings(ckpt, dtype=None)
    assert ckpt.bytes_read == ckpt.tensors[TEXT_EMBED_KEY].nbytes  # nothing else was read
    with safe_open(str(ckpt.tensors[TEXT_EMBED_KEY].file), framework="pt") as fh:
        reference = fh.get_tensor(TEXT_EMBED_KEY)
    assert stored.dtype == reference.dtype and torch.equal(stored, reference)
    as_f32 = load_text_embeddings(root)
    assert as_f32.dtype == torch.float32 and torch.equal(as_f32, reference.float())
    assert as_f32.shape == (ckpt.config["vocab_size"], ckpt.config["hidden_size"])


def test_load_text_embeddings_without_the_tensor(tmp_path: Path, golden: Path) -> None:
    (tmp_path / "config.json").write_text((golden / "checkpoints" / TINY_128K / "config.json").read_text())
    save_file({"model.vision_embed_tokens.glb_GN": torch.zeros(1, 1, 4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=TEXT_EMBED_KEY):
        load_text_embeddings(tmp_path)
    with pytest.raises(CheckpointError, match="with_text_embeddings=True"):
        read_text_embeddings(resolve(golden / "checkpoints" / TINY_128K))
