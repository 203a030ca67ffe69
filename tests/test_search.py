"""search, neighbors and index over encode --vectors outputs: exact top-k, near-duplicate groups, the saved index.

The folder searched holds the golden images and copies of some of them: byte copies (duplicates at encode),
lossless re-saves (other bytes, same pixels) and 90 %-resized JPEG copies, encoded with the tiny checkpoint.
Expected results are computed here with plain numpy over ``phi3embed.open(DIR).vectors(kind)`` and the
library's ``embedder.vectors``, never written down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from conftest import GOLDEN, TINY_128K
from PIL import Image
from typer.testing import CliRunner

import phi3embed
from phi3embed import Phi3VisionEmbedder
from phi3embed.cli.search import register
from phi3embed.core.similarity import group_pairs, normalize, pairs_above, top_k
from phi3embed.core.vectors import VECTOR_KINDS
from phi3embed.errors import Phi3EmbedError
from phi3embed.inputs.listing import expand_inputs
from phi3embed.jobs.core import run_job
from phi3embed.jobs.local import LocalEngine
from phi3embed.jobs.search import (
    encoding_settings,
    load_query_embedder,
    neighbors,
    resolve_queries,
    search,
)
from phi3embed.outputs import vector_set
from phi3embed.outputs.manifest import MANIFEST
from phi3embed.outputs.store import OutputStore
from phi3embed.outputs.vector_set import VectorSet

CKPT = GOLDEN / "checkpoints" / TINY_128K
IMAGES = sorted((GOLDEN / "images").iterdir())
RESIZED = ["photo_1000x750.jpg", "rgb_1050x950.png", "portrait_600x1400.png", "webp_700x500.webp"]
BYTE_COPIES = ["rgb_336x336.png", "cmyk_800x600.jpg"]
RESAVED = ["palette_P_320x240.png"]


def base(name: str) -> str:
    """The golden image a name of the folder is a copy of."""
    return name.split("__")[0]


@pytest.fixture(scope="module")
def embedder() -> Iterator[Phi3VisionEmbedder]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Phi3VisionEmbedder.from_pretrained(CKPT, num_crops=4, batch_size=4)
    torch.set_num_threads(threads)


def make_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    for p in IMAGES:
        shutil.copy(p, folder / p.name)
    for name in RESIZED:
        img = Image.open(GOLDEN / "images" / name).convert("RGB")
        img.resize((img.width * 9 // 10, img.height * 9 // 10), Image.BICUBIC).save(
            folder / f"{name}__resized.jpg", quality=90
        )
    for name in BYTE_COPIES:
        shutil.copy(GOLDEN / "images" / name, folder / f"{name}__copy{Path(name).suffix}")
    for name in RESAVED:
        Image.open(GOLDEN / "images" / name).save(folder / f"{name}__resaved.png", compress_level=1)


def encode(embedder: Phi3VisionEmbedder, images: Path, out: Path, rows: int = 8) -> Any:
    engine = LocalEngine(embedder, workers=0, vectors=VECTOR_KINDS, store_tokens=False)
    settings = engine.info.output_settings(model=str(CKPT), format="npy", pack_bytes=None)
    store = OutputStore(out, settings, vector_rows=rows).open()
    try:
        return run_job(expand_inputs([str(images)]), store, engine)
    finally:
        store.close()


@pytest.fixture(scope="module")
def folder(embedder: Phi3VisionEmbedder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("search")
    make_images(root / "in")
    summary = encode(embedder, root / "in", root / "out")
    assert summary.failed == 0
    return root / "out"


@pytest.fixture()
def out(folder: Path, tmp_path: Path) -> Path:
    """A copy of the encoded folder that a test may change (an index, more runs)."""
    copy = tmp_path / "out"
    shutil.copytree(folder, copy)
    return copy


def reference_top(kind: str, folder: Path, query: np.ndarray) -> dict[str, float]:
    """Cosine of ``query`` with every stored vector, by plain numpy over phi3embed.open(...).vectors()."""
    names, x = phi3embed.open(folder).vectors(kind)
    x = np.asarray(x, dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    scores = x @ q / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
    return dict(zip(names, scores.tolist(), strict=True))


def assert_top_k(hits: list[Any], scores: dict[str, float], k: int, *, leave_out: str | None = None) -> None:
    """``hits`` are a correct top ``k`` of ``scores``: exact scores, in order, and nothing better left out."""
    if leave_out is not None:
        scores = {n: s for n, s in scores.items() if n != leave_out}
    assert len(hits) == min(k, len(scores))
    for hit in hits:
        assert hit.cosine == pytest.approx(scores[hit.name], abs=1e-5)
    got = [h.cosine for h in hits]
    assert got == sorted(got, reverse=True)
    kth = got[-1]
    better = {n for n, s in scores.items() if s > kth + 1e-5}
    assert better <= {h.name for h in hits}


def same_results(got: list[Any], want: list[Any]) -> None:
    """The same scores to float rounding, and the same names but where two scores tie to rounding (an image
    and its byte copy have the same vector; two positions in one matrix product may round differently)."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert [h.cosine for h in a] == pytest.approx([h.cosine for h in b], abs=1e-6)
        assert {h.name for h in a} ^ {h.name for h in b} <= {
            h.name for h in a + b if abs(h.cosine - a[-1].cosine) < 1e-6
        }
        for x, y in zip(a, b, strict=True):
            assert x.name == y.name or abs(x.cosine - y.cosine) < 1e-6


# --------------------------------------------------------------------------- core.similarity


def test_top_k_equals_a_full_sort_across_blocks() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((103, 16)).astype(np.float32)
    x[7] = 0.0  # a zero vector scores 0, not NaN
    q = rng.standard_normal((4, 16)).astype(np.float32)
    q[1] = x[3]
    exclude = np.array([-1, 3, 50, -1])
    full = normalize(q).astype(np.float64) @ normalize(x).astype(np.float64).T  # (4, 103)
    for block in (1, 10, 103, 500):
        found = top_k(q, ((i, x[i : i + block]) for i in range(0, len(x), block)), 5, exclude=exclude)
        for row, (scores, ids) in enumerate(found):
            want = [i for i in np.argsort(-full[row], kind="stable") if i != exclude[row]][:5]
            assert ids.tolist() == want  # random data: no two scores within float32 rounding here
            np.testing.assert_allclose(scores, full[row, want], atol=1e-6)
            assert exclude[row] not in ids.tolist()


def test_top_k_ties_go_to_the_lower_id_and_fewer_vectors_than_k() -> None:
    x = np.array([[1, 0], [0, 1], [1, 0], [2, 0]], dtype=np.float16)  # ids 0, 2, 3: the same direction
    found = top_k(np.array([[1.0, 0.0]], dtype=np.float32), [(0, x[:2]), (2, x[2:])], 2)
    assert found[0][1].tolist() == [0, 2] and found[0][0].tolist() == [1.0, 1.0]
    found = top_k(np.eye(2, dtype=np.float32), [(0, x)], 10, exclude=np.array([0, -1]))
    assert [ids.tolist() for _, ids in found] == [[2, 3, 1], [1, 0, 2, 3]]


def test_pairs_and_groups_equal_a_full_matrix() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 8)).astype(np.float32)
    for a, b in ((0, 59), (59, 30), (5, 6), (20, 21), (21, 22)):  # chains join transitively
        x[b] = x[a] + 0.01 * rng.standard_normal(8).astype(np.float32)
    full = normalize(x) @ normalize(x).T
    want = {(i, j) for i in range(60) for j in range(i + 1, 60) if full[i, j] >= 0.99}
    for block in (1, 7, 60):

        def blocks(start: int, block: int = block) -> Iterator[tuple[int, np.ndarray]]:
            for first in range(0, len(x), block):
                if first >= start:
                    yield first, x[first : first + block]

        got = [(int(i), int(j)) for a, b, _ in pairs_above(blocks, 0.99) for i, j in zip(a, b, strict=True)]
        assert sorted(got) == sorted(want)
    groups = group_pairs(60, pairs_above(blocks, 0.99))
    components: dict[int, set[int]] = {}
    for i, j in want:  # connected components, the slow way
        merged = components.get(i, {i}) | components.get(j, {j})
        for m in merged:
            components[m] = merged
    expected = sorted({tuple(sorted(c)) for c in components.values()})
    assert [tuple(g) for g, _ in groups] == expected
    for ids, weakest in groups:
        assert weakest == pytest.approx(min(full[i, j] for i, j in want if i in ids), abs=1e-6)


# --------------------------------------------------------------------------- VectorSet


def test_vector_set_blocks_and_take_follow_the_manifest(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names, x = phi3embed.open(out).vectors("mean")
    latest = vector_set.latest_of(out / MANIFEST)
    dropped = names[3]
    del latest[dropped]  # its shard now has a row that is not live: read by row, not sliced
    monkeypatch.setattr(vector_set, "BLOCK_BYTES", 4 * 64 * 3)  # 3 rows of width 64 per block
    vset = VectorSet(out, "mean", latest)
    assert sorted(vset.names) == sorted(n for n in names if n != dropped)
    assert any(not s.whole for s in vset.shards) and len(vset.shards) > 1
    by_name = dict(zip(names, x, strict=True))
    seen = []
    for first, block in vset.blocks():
        assert len(block) <= 3
        for i, row in enumerate(block):
            assert np.array_equal(row, by_name[vset.names[first + i]])
            seen.append(first + i)
    assert seen == list(range(len(vset)))
    ids = np.array([5, 0, len(vset) - 1, 5])
    assert np.array_equal(vset.take(ids), np.stack([by_name[vset.names[i]] for i in ids]))
    assert [f for f, _ in vset.blocks(7)] == [f for f, b in vset.blocks() if f + len(b) > 7]


def test_a_missing_kind_names_the_written_ones(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(Phi3EmbedError, match="no 'cls' vectors here"):
        VectorSet(folder, "cls", {})
    with pytest.raises(Phi3EmbedError, match="not a phi3embed output directory"):
        VectorSet.open(tmp_path, "cls")


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize("kind", VECTOR_KINDS)
def test_search_equals_exact_numpy_on_the_golden_images(kind: str, folder: Path, embedder: Phi3VisionEmbedder) -> None:
    """Every golden image as an image query (encoded on the fly), and by name: the top k are exact."""
    vset = VectorSet.open(folder, kind)
    files = [str(p) for p in IMAGES]
    queries = resolve_queries(vset, files, embedder=lambda: embedder)
    library = embedder.vectors(IMAGES, kinds=(kind,))[kind].numpy()  # the independent encoding
    for k in (1, 5, 30):
        for q, hits, vec in zip(queries, search(vset, queries, k), library, strict=True):
            assert hits is not None and q.error is None
            assert_top_k(hits, reference_top(kind, folder, vec), k)
    by_name = resolve_queries(vset, [p.name for p in IMAGES], embedder=lambda: pytest.fail("no file query"))
    for q, hits in zip(by_name, search(vset, by_name, 5), strict=True):
        assert hits is not None and q.own_id >= 0
        assert_top_k(hits, reference_top(kind, folder, q.vector), 5, leave_out=q.text)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", VECTOR_KINDS)
def test_an_exact_copy_is_found_first(kind: str, folder: Path, embedder: Phi3VisionEmbedder, tmp_path: Path) -> None:
    """A copy of a folder's image, elsewhere under another name, finds that image first with cosine >= 0.999;
    a resized copy finds its original first too."""
    vset = VectorSet.open(folder, kind)
    copies = []
    for p in IMAGES:
        copy = tmp_path / f"query-{p.name}"
        shutil.copy(p, copy)
        copies.append(str(copy))
    resized = [str(folder.parent / "in" / f"{name}__resized.jpg") for name in RESIZED]
    queries = resolve_queries(vset, copies + resized, embedder=lambda: embedder)
    results = search(vset, queries, 3)
    for p, hits in zip(IMAGES, results[: len(copies)], strict=True):
        assert hits is not None
        assert base(hits[0].name) == p.name and hits[0].cosine >= 0.999
    for name, hits in zip(RESIZED, results[len(copies) :], strict=True):
        assert hits is not None
        assert hits[0].name == f"{name}__resized.jpg" and hits[0].cosine >= 0.999  # itself, stored
        assert base(hits[1].name) == name  # then its original, before any other image


def test_queries_that_are_neither_a_name_nor_an_image(
    folder: Path, embedder: Phi3VisionEmbedder, tmp_path: Path
) -> None:
    vset = VectorSet.open(folder, "mean")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    queries = resolve_queries(vset, ["no/such.png", str(broken), str(IMAGES[0])], embedder=lambda: embedder)
    assert "no/such.png: not a name in" in (queries[0].error or "")
    assert str(broken) in (queries[1].error or "") and queries[1].vector is None
    assert queries[2].error is None
    results = search(vset, queries, 2)
    assert results[0] is None and results[1] is None and results[2] is not None


def test_query_encoder_is_rebuilt_from_the_manifest(folder: Path, out: Path, tmp_path: Path) -> None:
    vset = VectorSet.open(folder, "cls")
    settings = encoding_settings(vset)
    assert (settings.model, settings.num_crops, settings.compute_dtype) == (str(CKPT), 4, "float32")
    built = load_query_embedder(settings, device="cpu")
    assert built.fingerprint == settings.fingerprint and built.num_crops == 4
    # a model that cannot be found here, other weights, mixed settings: one line each
    lines = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    moved = [dict(line, model=str(tmp_path / "gone")) for line in lines]
    (out / MANIFEST).write_text("".join(json.dumps(line) + "\n" for line in moved))
    gone = encoding_settings(VectorSet.open(out, "cls"))
    with pytest.raises(Phi3EmbedError, match="cannot be loaded here .* give it with --model"):
        load_query_embedder(gone, device="cpu")
    assert load_query_embedder(gone, model=str(CKPT), device="cpu").fingerprint == settings.fingerprint
    other = GOLDEN / "checkpoints" / "tiny-phi35v-bf16"
    with pytest.raises(Phi3EmbedError, match="other weights"):
        load_query_embedder(gone, model=str(other), device="cpu")
    mixed = [dict(line, num_crops=8) if i == 2 else line for i, line in enumerate(lines)]
    (out / MANIFEST).write_text("".join(json.dumps(line) + "\n" for line in mixed))
    with pytest.raises(Phi3EmbedError, match="different settings \\(num_crops"):
        encoding_settings(VectorSet.open(out, "cls"))


# --------------------------------------------------------------------------- neighbors


def copy_groups(names: list[str]) -> list[list[str]]:
    by_base: dict[str, list[str]] = {}
    for name in names:
        by_base.setdefault(base(name), []).append(name)
    return sorted(sorted(g) for g in by_base.values() if len(g) > 1)


def separating_threshold(folder: Path, kind: str) -> float:
    """Halfway between the most similar two different golden images and the least similar two copies (the
    vectors must separate them for the grouping to be right)."""
    names, x = phi3embed.open(folder).vectors(kind)
    u = normalize(x)
    full = u @ u.T
    same = [full[i, j] for i in range(len(names)) for j in range(i) if base(names[i]) == base(names[j])]
    other = [full[i, j] for i in range(len(names)) for j in range(i) if base(names[i]) != base(names[j])]
    assert min(same) > max(other), f"{kind}: copies are not separated from other images"
    return float(min(same) + max(other)) / 2


@pytest.mark.parametrize("kind", VECTOR_KINDS)
def test_neighbors_groups_the_copies_of_each_image(kind: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vector_set, "BLOCK_BYTES", 4 * 64 * 5)  # several blocks against several blocks
    vset = VectorSet.open(folder, kind)
    groups = neighbors(vset, separating_threshold(folder, kind))
    assert sorted(sorted(g.names) for g in groups) == copy_groups(vset.names)
    threshold = separating_threshold(folder, kind)
    for g in groups:
        assert threshold <= g.weakest <= 1.0 + 1e-6


# --------------------------------------------------------------------------- the commands


@pytest.fixture()
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_search_command_json_lines_and_table(cli: typer.Typer, runner: CliRunner, folder: Path) -> None:
    query = str(IMAGES[0])
    result = runner.invoke(cli, ["search", str(folder), query, IMAGES[1].name, "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(line["query"], line["rank"]) for line in lines] == [(query, r) for r in (1, 2, 3)] + [
        (IMAGES[1].name, r) for r in (1, 2, 3)
    ]
    assert base(lines[0]["name"]) == IMAGES[0].name and lines[0]["cosine"] >= 0.999
    assert all(line["name"] != IMAGES[1].name for line in lines[3:])  # a name query is left out of its results
    table = runner.invoke(cli, ["search", str(folder), IMAGES[1].name, "-k", "2", "--vectors", "cls"])
    assert table.exit_code == 0 and table.stderr == ""
    assert f"query {IMAGES[1].name}" in table.stdout and "cosine" in table.stdout


def test_search_command_errors(cli: typer.Typer, runner: CliRunner, folder: Path, tmp_path: Path) -> None:
    result = runner.invoke(cli, ["search", str(folder), "nope.png", IMAGES[2].name, "--json"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: nope.png: not a name in {folder} and no such file"]
    assert len(result.stdout.splitlines()) == 10  # the other query was searched
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(cli, ["search", str(empty), "x.png"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == f"error: {empty}: no manifest.jsonl here: not a phi3embed output directory"
    result = runner.invoke(cli, ["neighbors", str(folder), "-t", "0.5", "--vectors", "nope"])
    assert result.exit_code == 2 and "no 'nope' vectors here (written: cls, mean, tokens" in result.stderr


def test_neighbors_command(cli: typer.Typer, runner: CliRunner, folder: Path) -> None:
    threshold = separating_threshold(folder, "mean")
    result = runner.invoke(cli, ["neighbors", str(folder), "-t", str(threshold), "--json"])
    assert result.exit_code == 0, result.output
    groups = [json.loads(line) for line in result.stdout.splitlines()]
    names = phi3embed.open(folder).vectors("mean")[0]
    assert sorted(g["names"] for g in groups) == copy_groups(names)
    assert [g["group"] for g in groups] == list(range(1, len(groups) + 1))
    assert all(g["size"] == len(g["names"]) for g in groups)
    grouped = sum(len(g["names"]) for g in groups)
    assert (
        result.stderr.strip()
        == f"{len(groups)} groups holding {grouped} of {len(names)} images (cosine >= {threshold})"
    )


def test_index_needs_the_library(
    cli: typer.Typer, runner: CliRunner, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)
    result = runner.invoke(cli, ["index", str(out)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == "error: an approximate index needs faiss: pip install 'phi3embed[index]'"


# --------------------------------------------------------------------------- the index


@pytest.fixture()
def faiss() -> Any:
    """The index library, an optional extra (pip install 'phi3embed[index]')."""
    return pytest.importorskip("faiss")


def test_index_search_and_neighbors_equal_exact(
    faiss: Any, out: Path, embedder: Phi3VisionEmbedder, cli: typer.Typer, runner: CliRunner
) -> None:
    from phi3embed.outputs.vector_index import build_index, open_index

    for kind in VECTOR_KINDS:
        vset = VectorSet.open(out, kind)
        assert open_index(vset) == (None, None)
        report = build_index(vset)
        assert (report.action, report.count, report.added) == ("built", len(vset), len(vset))
        assert build_index(vset).action == "unchanged"
        index, why = open_index(vset)
        assert index is not None and why is None
        queries = resolve_queries(vset, [str(p) for p in IMAGES] + [IMAGES[4].name], embedder=lambda: embedder)
        same_results(search(vset, queries, 5, index=index), search(vset, queries, 5))  # a small index finds all
        threshold = separating_threshold(out, kind)
        by_index, exact = neighbors(vset, threshold, index=index), neighbors(vset, threshold)
        assert [g.names for g in by_index] == [g.names for g in exact]
        assert [g.weakest for g in by_index] == pytest.approx([g.weakest for g in exact], abs=1e-6)
    result = runner.invoke(cli, ["search", str(out), IMAGES[0].name, "--json", "-k", "4"])
    assert result.exit_code == 0 and result.stderr == ""


def test_index_is_extended_after_another_run(
    faiss: Any, folder: Path, tmp_path: Path, embedder: Phi3VisionEmbedder, cli: typer.Typer, runner: CliRunner
) -> None:
    from phi3embed.outputs.vector_index import build_index, open_index, read_index

    images, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(folder.parent / "in", images)
    shutil.copytree(folder, out)
    vset = VectorSet.open(out, "mean")
    build_index(vset)
    keys_before = dict(zip(read_index(vset).names, read_index(vset).keys.tolist(), strict=True))  # type: ignore[union-attr]
    # two new images, one changed
    for name in ("gray_L_640x480.png", "tiny_7x9.png"):
        Image.open(GOLDEN / "images" / name).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
            images / f"{name}__flipped.png"
        )
    changed = images / "rgb_337x335.png"
    Image.open(changed).convert("RGB").rotate(90).save(changed, format="PNG")
    assert encode(embedder, images, out).ok == 3
    vset = VectorSet.open(out, "mean")
    index, why = open_index(vset)
    assert index is None and why is not None and "out of date: 3 vectors new and 1 gone or changed" in why
    result = runner.invoke(cli, ["search", str(out), IMAGES[0].name, "--json", "-k", "3"])
    assert result.exit_code == 0 and "note: not using the mean index (it is out of date" in result.stderr
    result = runner.invoke(cli, ["index", str(out)])  # mean is the default among several kinds
    assert result.exit_code == 0, result.output
    assert "extended the mean index: 3 vectors added, 1 removed" in result.stderr and result.stdout == ""
    vset = VectorSet.open(out, "mean")
    index, why = open_index(vset)
    assert index is not None and why is None
    saved = read_index(vset)
    assert saved is not None
    keys_after = dict(zip(saved.names, saved.keys.tolist(), strict=True))
    kept = {n for n in keys_before if n != "rgb_337x335.png"}
    assert {n: keys_after[n] for n in kept} == {n: keys_before[n] for n in kept}  # unchanged rows keep their keys
    assert keys_after["rgb_337x335.png"] != keys_before["rgb_337x335.png"]
    queries = resolve_queries(vset, [n for n in vset.names], embedder=lambda: embedder)
    same_results(search(vset, queries, 4, index=index), search(vset, queries, 4))
    # only the current build's files remain; a broken index.json is rebuilt, and meanwhile not used
    files = sorted(p.name for p in saved.folder.iterdir())
    assert files == sorted([".lock", "index.json", saved.graph_path.name, f"{saved.meta['build']}.keys.parquet"])
    (saved.folder / ".leftover.faiss.tmp").write_bytes(b"killed build")
    (saved.folder / "index.json").write_text("{not json")
    assert "it cannot be read" in (open_index(vset)[1] or "")
    assert build_index(vset).action == "built"
    assert not (saved.folder / ".leftover.faiss.tmp").exists()
    assert open_index(vset)[0] is not None
    assert build_index(vset, rebuild=True).action == "built"


# --------------------------------------------------------------------------- the console script


@pytest.mark.e2e
def test_console_script_search_index_neighbors(faiss: Any, out: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), *sys.path])))
    query = str(IMAGES[5])

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "phi3embed", *args], capture_output=True, text=True, env=env, timeout=600
        )

    exact = run("search", str(out), query, "--json", "-k", "5")
    assert exact.returncode == 0 and exact.stderr == "", exact.stderr
    built = run("index", str(out), "--vectors", "mean")
    assert built.returncode == 0 and "built the mean index of" in built.stderr
    indexed = run("search", str(out), query, "--json", "-k", "5")
    assert indexed.returncode == 0 and indexed.stdout == exact.stdout
    groups = run("neighbors", str(out), "-t", "0.9999", "--json")
    assert groups.returncode == 0
    assert all(len({base(n) for n in json.loads(line)["names"]}) == 1 for line in groups.stdout.splitlines())
