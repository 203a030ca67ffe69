"""The Ray Data engine: the actor class alone (no Ray needed), then through a local 2-CPU Ray instance.

Results must be bit-identical to ``Phi3VisionEmbedder.encode`` and the manifest facts must match the
reference's (golden MANIFEST.json); bad images become error rows, never exceptions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import GOLDEN, TINY_35, TINY_128K
from filewrites import FileWriteProbe
from PIL import Image
from typer.testing import CliRunner

import phi3embed
from phi3embed import CheckpointError, Phi3VisionEmbedder
from phi3embed.cli.app import app
from phi3embed.inputs.listing import Source
from phi3embed.jobs.core import JobSummary, run_job
from phi3embed.jobs.ray_engine import (
    BYTES,
    PATH,
    EncodedImage,
    EncoderSpec,
    RayEncoder,
    RayEngine,
    build_pipeline,
    checkpoint_facts,
    decode_rows,
    embedding_bytes,
    embedding_from_bytes,
    ray_session,
    spec_info,
)
from phi3embed.outputs.manifest import MANIFEST
from phi3embed.outputs.records import OutputSettings
from phi3embed.outputs.store import OutputStore

NUM_CROPS = 4  # small grids keep the tiny model quick
IMAGES = sorted((GOLDEN / "images").iterdir()) if (GOLDEN / "images").is_dir() else []


def ckpt(name: str = TINY_128K) -> str:
    return str(GOLDEN / "checkpoints" / name)


@cache
def reference(name: str = TINY_128K) -> Phi3VisionEmbedder:
    return Phi3VisionEmbedder.from_pretrained(ckpt(name), num_crops=NUM_CROPS)


@cache
def expected(path: Path, name: str = TINY_128K) -> torch.Tensor:
    (emb,) = reference(name).encode([path])
    return emb


def run_ray(spec: EncoderSpec, sources: list[Source], store: OutputStore, **engine: Any) -> JobSummary:
    """One job on the Ray engine (Ray already initialised), as the command runs it."""
    return run_job(sources, store, RayEngine(spec, spec_info(spec, actors=engine["actors"]), **engine))


def batch_of(paths: list[Any], **columns: list[Any]) -> dict[str, np.ndarray]:
    """A numpy batch as Ray Data hands it to map_batches (object arrays for strings and bytes)."""
    out = {PATH: np.array([str(p) for p in paths], dtype=object)}
    for name, values in columns.items():
        col = np.empty(len(values), dtype=object)
        col[:] = values
        out[name] = col
    return out


def golden_facts(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """What the reference says about one golden image at NUM_CROPS (image facts + processor case)."""
    img = manifest["images"][path.name]
    (case,) = [
        c for c in manifest["processor_cases"] if c["image"] == f"images/{path.name}" and c["num_crops"] == NUM_CROPS
    ]
    return {
        "width": img["width"],
        "height": img["height"],
        "image_sizes": tuple(case["image_sizes"]),
        "crops": tuple(case["crops_hw"]),
        "num_tokens": case["num_img_tokens"],
        "sha256": img["file_sha256"],
        "size": (GOLDEN / "images" / path.name).stat().st_size,
    }


def check_ok(result: EncodedImage, path: Path, manifest: dict[str, Any]) -> None:
    assert result.ok, result.error
    assert result.error is None
    facts = result.facts()
    assert {k: facts[k] for k in golden_facts(manifest, path)} == golden_facts(manifest, path)
    assert result.embedding is not None
    want = expected(path)
    assert result.embedding.dtype == want.dtype and result.embedding.shape == want.shape
    assert (result.embedding - want).abs().max().item() == 0.0
    assert torch.equal(result.embedding, want)


@pytest.fixture(scope="module")
def encoder(golden: Path) -> RayEncoder:
    return RayEncoder(EncoderSpec(model=ckpt(), device="cpu", num_crops=NUM_CROPS, batch_size=8))


@pytest.fixture()
def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = (GOLDEN / "images" / "photo_1000x750.jpg").read_bytes()
    files = {
        "corrupt": tmp_path / "truncated.jpg",
        "empty": tmp_path / "empty.png",
        "directory": tmp_path / "folder.jpg",
        "missing": tmp_path / "missing.png",
        "broken_link": tmp_path / "dangling.png",
        "not_image": tmp_path / "notes.png",
        "untileable": tmp_path / "strip.png",
    }
    files["corrupt"].write_bytes(good[: len(good) // 3])
    files["empty"].write_bytes(b"")
    files["directory"].mkdir()
    files["broken_link"].symlink_to(tmp_path / "nowhere.png")
    files["not_image"].write_text("just text\n")
    Image.new("RGB", (5000, 1), (10, 200, 30)).save(files["untileable"])
    return files


# --------------------------------------------------------------------------- the actor class, no Ray


def test_actor_class_matches_encode_and_reference_facts(encoder: RayEncoder, manifest: dict[str, Any]) -> None:
    assert IMAGES, "golden images missing"
    out = encoder(batch_of(IMAGES, index=list(range(len(IMAGES)))))
    assert BYTES not in out
    results = list(decode_rows(out))
    assert [r.path for r in results] == [str(p) for p in IMAGES]
    assert [r.extra for r in results] == [{"index": i} for i in range(len(IMAGES))]
    for path, result in zip(IMAGES, results, strict=True):
        check_ok(result, path, manifest)


def test_bad_images_become_error_rows_and_good_ones_survive(
    encoder: RayEncoder, bad_files: dict[str, Path], manifest: dict[str, Any]
) -> None:
    good = GOLDEN / "images" / "rgb_337x335.png"
    paths = [good, *bad_files.values(), good]
    results = list(decode_rows(encoder(batch_of(paths))))
    check_ok(results[0], good, manifest)
    check_ok(results[-1], good, manifest)
    reasons = {
        "corrupt": "truncated image data",
        "empty": "empty file (0 bytes)",
        "directory": "is a directory",
        "missing": "file not found",
        "broken_link": "broken symbolic link",
        "not_image": "not an image Pillow can identify",
        "untileable": f"too extreme for num_crops={NUM_CROPS}",
    }
    for (kind, path), result in zip(bad_files.items(), results[1:-1], strict=True):
        assert result.status == "error" and result.embedding is None, kind
        assert result.error is not None and "\n" not in result.error
        assert result.error.startswith(f"{path}: "), result.error
        assert reasons[kind] in result.error, (kind, result.error)
        assert result.num_tokens is None and result.image_sizes is None and result.crops is None
    by_kind = dict(zip(bad_files, results[1:-1], strict=True))
    # Bytes that were read are hashed even when they do not decode.
    corrupt = bad_files["corrupt"].read_bytes()
    assert by_kind["corrupt"].sha256 == hashlib.sha256(corrupt).hexdigest()
    assert by_kind["corrupt"].size == len(corrupt)
    assert by_kind["corrupt"].mtime_ns == bad_files["corrupt"].stat().st_mtime_ns
    assert by_kind["missing"].sha256 is None and by_kind["missing"].size is None
    # An image that decodes but cannot be tiled still reports its size, which explains the failure.
    assert (by_kind["untileable"].width, by_kind["untileable"].height) == (5000, 1)


def test_unexpected_decoder_exception_is_an_error_row(
    encoder: RayEncoder, monkeypatch: pytest.MonkeyPatch, manifest: dict[str, Any]
) -> None:
    import phi3embed.jobs.prepare as prepare

    real = prepare.preprocess_image
    victim = IMAGES[1]

    def flaky(image: Any, config: Any, *, name: str | None = None, **options: Any) -> Any:
        if name == str(victim):
            raise RuntimeError("decoder bug\nsecond line")
        return real(image, config, name=name, **options)

    monkeypatch.setattr(prepare, "preprocess_image", flaky)
    first, second = decode_rows(encoder(batch_of(IMAGES[:2])))
    check_ok(first, IMAGES[0], manifest)
    assert second.status == "error"
    assert second.error == f"{victim}: unexpected RuntimeError while reading: decoder bug second line"


def test_bytes_input_equals_path_input(encoder: RayEncoder, manifest: dict[str, Any]) -> None:
    paths = IMAGES[:3]
    blobs = [p.read_bytes() for p in paths[:2]] + [None]  # None: read the path
    results = list(decode_rows(encoder(batch_of(paths, bytes=blobs))))
    for path, result in zip(paths, results, strict=True):
        check_ok(result, path, manifest)


def test_unreadable_file_is_an_error_row(encoder: RayEncoder, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files regardless of permissions")
    path = tmp_path / "locked.png"
    path.write_bytes((GOLDEN / "images" / "tiny_7x9.png").read_bytes())
    path.chmod(0)
    (result,) = decode_rows(encoder(batch_of([path])))
    assert result.status == "error" and result.error == f"{path}: permission denied"


def test_bfloat16_travels_bit_exact(golden: Path) -> None:
    """numpy has no bfloat16: the stored bytes must still be exactly the local engine's bf16 tensor."""
    enc = RayEncoder(EncoderSpec(model=ckpt(TINY_35), device="cpu", num_crops=NUM_CROPS, out_dtype="bfloat16"))
    paths = IMAGES[:4]
    results = list(decode_rows(enc(batch_of(paths))))
    for path, result in zip(paths, results, strict=True):
        assert result.ok and result.embedding is not None
        want = expected(path, TINY_35).to(torch.bfloat16)
        assert result.embedding.dtype == torch.bfloat16
        assert torch.equal(result.embedding.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_embedding_bytes_round_trip(dtype: torch.dtype) -> None:
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    data = embedding_bytes(x)
    assert len(data) == x.numel() * x.element_size()
    name = str(dtype).removeprefix("torch.")
    y = embedding_from_bytes(data, dtype=name, shape=(7, 5))
    assert y.dtype == dtype and torch.equal(y.view(torch.uint8), x.view(torch.uint8))


def test_decode_threads_give_the_same_rows(golden: Path, encoder: RayEncoder) -> None:
    threaded = RayEncoder(EncoderSpec(model=ckpt(), device="cpu", num_crops=NUM_CROPS, decode_threads=2))
    paths = [*IMAGES[:5], GOLDEN / "images" / "missing.png", *IMAGES[5:8]]
    a, b = encoder(batch_of(paths)), threaded(batch_of(paths))
    assert a.keys() == b.keys()
    for key in a.keys() - {"seconds"}:  # timings differ, everything else must not
        assert list(a[key]) == list(b[key]), key


@pytest.mark.parametrize("name", [TINY_128K, TINY_35])
def test_driver_knows_the_actors_fingerprint_without_loading(name: str) -> None:
    fingerprint, num_crops = checkpoint_facts(EncoderSpec(model=ckpt(name), num_crops=NUM_CROPS))
    assert (fingerprint, num_crops) == (reference(name).fingerprint, NUM_CROPS)
    default = Phi3VisionEmbedder.from_pretrained(ckpt(name))
    assert checkpoint_facts(EncoderSpec(model=ckpt(name))) == (default.fingerprint, default.num_crops)


def test_the_revision_reaches_every_actor_spec() -> None:
    """``encode --engine ray --revision R``: the driver plans with R and each actor resolves the same R."""
    from phi3embed.jobs.ray_engine import plan
    from phi3embed.jobs.runtime import EngineOptions

    engine = plan(EngineOptions(model=ckpt(TINY_128K), revision="v1.0", device="cpu", actors=1, engine="ray"))
    try:
        assert engine.spec.revision == "v1.0"
    finally:
        engine.close()


def test_actor_refuses_other_weights(golden: Path) -> None:
    with pytest.raises(CheckpointError, match="fingerprint"):
        RayEncoder(EncoderSpec(model=ckpt(), device="cpu", num_crops=NUM_CROPS, expect_fingerprint="0" * 32))
    fp = reference().fingerprint
    assert RayEncoder(EncoderSpec(model=ckpt(), device="cpu", expect_fingerprint=fp)).embedder.fingerprint == fp


# --------------------------------------------------------------------------- through a local Ray instance


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[None]:
    """One private local Ray instance for every test of this module that needs Ray (starting one costs ~25 s).

    The ``encode --engine ray`` runs below find it already initialised and use it as it is, as they would a
    Ray their caller started; :func:`ray_session` starting (and at the end stopping) Ray is checked here.
    """
    pytest.importorskip("ray")
    import ray

    # as many CPUs as `encode --engine ray` gives the local instance it starts: it sizes its actor pool by them
    with ray_session(num_cpus=os.cpu_count() or 1, object_store_memory=128 * 1024**2) as started:
        assert started and ray.is_initialized()
        yield
    assert not ray.is_initialized()


@pytest.mark.e2e  # starts Ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # Ray's own, on pickling its context
def test_ray_pipeline_matches_local_encode_and_refuses_other_weights(
    tmp_path: Path, manifest: dict[str, Any], ray_instance: None
) -> None:
    import ray.data

    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes((GOLDEN / "images" / "photo_1000x750.jpg").read_bytes()[:500])
    paths = [*IMAGES, corrupt]
    rows = [{PATH: str(p), BYTES: None, "index": i} for i, p in enumerate(paths)]
    rows[1][BYTES] = paths[1].read_bytes()  # one image travels as bytes
    fingerprint = reference().fingerprint
    spec = EncoderSpec(model=ckpt(), device="cpu", num_crops=NUM_CROPS, expect_fingerprint=fingerprint)
    results: dict[int, EncodedImage] = {}
    with ray_session() as started:
        assert not started  # the module's instance is used as it is
        ds = build_pipeline(ray.data.from_items(rows), spec, actors=2, images_per_batch=4)
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            for result in decode_rows(batch):
                index = result.extra["index"]
                assert index not in results
                results[index] = result
        # An actor that finds other weights than the driver's (a node with another checkpoint) stops the
        # job with one line, before anything is written.
        settings = OutputSettings(
            model=ckpt(), fingerprint=fingerprint, num_crops=NUM_CROPS, dtype=torch.float32, compute_dtype=torch.float32
        )
        other = replace(spec, expect_fingerprint="0" * 32)
        with OutputStore(tmp_path / "out", settings) as store:
            summary = run_ray(other, [Source("a.png", str(IMAGES[0]), "")], store, actors=1, restart_actors=False)
    assert summary.fatal == (
        f"the Ray job failed: {ckpt()}: vision weights here have fingerprint {fingerprint}, the driver's have "
        f"{'0' * 32}: every node must see the same checkpoint"
    )
    assert summary.ok == summary.failed == 0 and (tmp_path / "out" / MANIFEST).read_text() == ""
    assert sorted(results) == list(range(len(paths)))
    for i, path in enumerate(IMAGES):
        assert results[i].path == str(path)
        check_ok(results[i], path, manifest)
    bad = results[len(IMAGES)]
    assert bad.status == "error" and bad.error is not None
    assert bad.error.startswith(f"{corrupt}: ") and "truncated" in bad.error
    assert bad.embedding is None


@pytest.mark.e2e  # starts Ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # Ray's own, on pickling its context
def test_ray_driver_writes_through_the_writer_and_a_failing_output_ends_the_job(
    tmp_path: Path, ray_instance: None
) -> None:
    """The driver hands results to the local engine's writer: several files at once, records in input order;
    a disk failure on one output ends the job with that one line and keeps the records before it."""
    from phi3embed.outputs.publish import OutputError

    sources = [Source(f"{i}-{p.name}", str(p), "") for i, p in enumerate(IMAGES[:4])]
    fingerprint = reference().fingerprint
    spec = EncoderSpec(model=ckpt(), device="cpu", num_crops=NUM_CROPS, expect_fingerprint=fingerprint)
    settings = OutputSettings(
        model=ckpt(), fingerprint=fingerprint, num_crops=NUM_CROPS, dtype=torch.float32, compute_dtype=torch.float32
    )

    def slow_first_fail_last(source: Source) -> None:
        if source.name.startswith("0-"):
            time.sleep(0.5)  # the others are written meanwhile, and recorded after it
        if source.name.startswith("3-"):
            raise OutputError("cannot write 3-...: No space left on device", path=tmp_path / "out")

    with OutputStore(tmp_path / "out", settings) as store:
        probe = FileWriteProbe(store, slow_first_fail_last)
        summary = run_ray(spec, sources, store, actors=1, images_per_batch=4, restart_actors=False)
    assert summary.fatal == f"{tmp_path / 'out'}: cannot write 3-...: No space left on device"
    names = [json.loads(line)["name"] for line in (tmp_path / "out" / MANIFEST).read_text().splitlines()]
    assert names == [s.name for s in sources[:3]] and summary.ok == 3 and probe.peak >= 2


def test_null_bytes_cells_mean_read_the_path(encoder: RayEncoder, manifest: dict[str, Any]) -> None:
    """Ray hands an all-null binary column over as float NaN: that must not be taken for image bytes."""
    paths = IMAGES[:2]
    batch = batch_of(paths)
    batch[BYTES] = np.full(len(paths), np.nan, dtype=np.float32)
    for path, result in zip(paths, decode_rows(encoder(batch)), strict=True):
        check_ok(result, path, manifest)


# --------------------------------------------------------------------------- the command, --engine ray

ENV = {"PHI3EMBED_MODEL": None, "RAY_ADDRESS": None, "HF_HUB_OFFLINE": "1"}  # CliRunner's env: None unsets
VOLATILE = {"time", "device"}  # manifest fields that may differ between two runs of the same job


@dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float


def encode_here(cwd: Path, *args: str) -> Run:
    """``phi3embed encode ARGS`` in this process (no start-up cost), run from ``cwd``."""
    start = time.perf_counter()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, ["encode", *args], env=ENV, catch_exceptions=False)
    finally:
        os.chdir(here)
    return Run(result.exit_code, result.stdout, result.stderr, time.perf_counter() - start)


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def tree(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` except the manifest: relative path -> content."""
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".idx")
    }


@dataclass
class Jobs:
    root: Path
    runs: dict[str, Run]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory, golden: Path, ray_instance: None) -> Jobs:
    """The same jobs through both engines, one after the other (Ray wants both cores), in this process: the
    ``--engine ray`` runs use the module's Ray instance (the console script itself is tested in
    test_cli_encode.py)."""
    root = tmp_path_factory.mktemp("engines")
    imgs = root / "imgs"
    imgs.mkdir()
    for path in IMAGES:
        (imgs / path.name).symlink_to(path)
    (imgs / "corrupt.jpg").write_bytes((GOLDEN / "images" / "photo_1000x750.jpg").read_bytes()[:2000])
    npy = ["imgs", "--model", ckpt(), "--num-crops", str(NUM_CROPS)]
    pack = ["imgs", "--model", ckpt(TINY_35), "--num-crops", str(NUM_CROPS), "--pack", "600kB"]
    pack += ["--out-dtype", "bfloat16"]
    runs = {
        "local": encode_here(root, *npy, "-o", "local", "--workers", "0"),
        "ray": encode_here(root, *npy, "-o", "ray", "--engine", "ray"),
        "local-pack": encode_here(root, *pack, "-o", "local-pack", "--workers", "0", "--quiet"),
        "ray-pack": encode_here(root, *pack, "-o", "ray-pack", "--engine", "ray", "--actors", "2", "--quiet"),
    }
    (imgs / "corrupt.jpg").unlink()  # the user removes the bad file and runs the same command again
    runs["ray-again"] = encode_here(root, *npy, "-o", "ray", "--engine", "ray", "--jsonl")
    for name, run in runs.items():
        print(f"{name}: exit {run.code} in {run.seconds:.1f} s")
    return Jobs(root, runs)


@pytest.mark.e2e  # starts Ray
def test_ray_engine_writes_what_the_local_engine_writes(jobs: Jobs) -> None:
    local, ray = jobs.runs["local"], jobs.runs["ray"]
    assert local.code == 1 and ray.code == 1, ray.err  # 1: some image failed, as the local engine says
    assert "Traceback" not in ray.err
    assert ray.out == ""  # stdout stays clean for pipelines
    files = tree(jobs.root / "ray")
    assert len(files) == len(IMAGES)
    assert files == tree(jobs.root / "local")  # byte-identical outputs
    first_run = len(IMAGES) + 1
    ray_records, local_records = records(jobs.root / "ray")[:first_run], records(jobs.root / "local")

    def by_name(recs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:  # the local engine writes errors early
        return {r["name"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in recs}

    assert len(local_records) == first_run
    assert by_name(ray_records) == by_name(local_records)
    (bad,) = [r for r in ray_records if r["status"] == "error"]
    assert bad["name"] == "corrupt.jpg" and bad["error"].startswith("imgs/corrupt.jpg: ")
    assert "truncated" in bad["error"] and bad["output"] is None
    assert f"error: {bad['error']}" in ray.err
    for path in IMAGES:  # and they are the embeddings of the library
        assert torch.equal(torch.from_numpy(np.load(jobs.root / "ray" / f"{path.name}.npy")), expected(path))


@pytest.mark.e2e  # starts Ray
def test_ray_engine_rerun_skips_finished_images(jobs: Jobs) -> None:
    again = jobs.runs["ray-again"]
    assert again.code == 0, again.err
    assert len(records(jobs.root / "ray")) == len(IMAGES) + 1  # nothing new was recorded
    assert again.out == ""  # --jsonl: no record written, none printed
    assert f"{len(IMAGES)} listed, {len(IMAGES)} already done, 0 written, 0 failed" in again.err
    assert "Ray actor" not in again.err  # nothing to do: no Ray instance was started
    assert tree(jobs.root / "ray") == tree(jobs.root / "local")


@pytest.mark.e2e  # starts Ray
def test_ray_engine_writes_the_same_packs_in_bfloat16(jobs: Jobs) -> None:
    local, ray = jobs.runs["local-pack"], jobs.runs["ray-pack"]
    assert local.code == 1 and ray.code == 1, ray.err
    assert ray.err.strip().startswith("error: imgs/corrupt.jpg")  # --quiet: only the failure line
    packs = tree(jobs.root / "ray-pack")
    assert len(packs) > 2 and all(name.startswith("emb-") for name in packs)
    assert packs == tree(jobs.root / "local-pack")
    tensors = dict((r["name"], t) for r, t in phi3embed.read(jobs.root / "ray-pack"))
    for path in IMAGES:
        assert tensors[path.name].dtype == torch.bfloat16
        assert torch.equal(
            tensors[path.name].view(torch.int16), expected(path, TINY_35).to(torch.bfloat16).view(torch.int16)
        )


@pytest.fixture(scope="module")
def vector_jobs(tmp_path_factory: pytest.TempPathFactory, golden: Path, ray_instance: None) -> Jobs:
    """``encode --vectors cls,mean,tokens``, with token matrices and with ``--stage none``, through both engines
    (in this process, on the module's Ray instance), over the golden images, a copy of one (a duplicate) and a
    truncated file."""
    pytest.importorskip("pyarrow")
    root = tmp_path_factory.mktemp("vectors")
    imgs = root / "imgs"
    imgs.mkdir()
    for path in IMAGES:
        (imgs / path.name).symlink_to(path)
    (imgs / "zz_copy.png").write_bytes(IMAGES[0].read_bytes())
    (imgs / "corrupt.jpg").write_bytes((GOLDEN / "images" / "photo_1000x750.jpg").read_bytes()[:2000])
    args = ["imgs", "--model", ckpt(), "--num-crops", str(NUM_CROPS), "--vectors", "cls,mean,tokens", "--quiet"]
    runs = {}
    for stage in ("projected", "none"):
        runs[f"local-{stage}"] = encode_here(root, *args, "--stage", stage, "-o", f"local-{stage}", "--workers", "0")
        runs[f"ray-{stage}"] = encode_here(root, *args, "--stage", stage, "-o", f"ray-{stage}", "--engine", "ray")
    runs["ray-none-again"] = encode_here(root, *args, "--stage", "none", "-o", "ray-none", "--engine", "ray")
    for name, run in runs.items():
        print(f"{name}: exit {run.code} in {run.seconds:.1f} s")
    return Jobs(root, runs)


@pytest.mark.e2e  # starts Ray
@pytest.mark.parametrize("stage", ["projected", "none"])
def test_ray_engine_writes_the_local_engines_vectors(vector_jobs: Jobs, stage: str) -> None:
    """Vector shards, their metadata and the manifest (time fields aside) as the local engine writes them;
    --stage none: no token matrices; the duplicate's row repeats its first's vectors."""
    local, ray = vector_jobs.runs[f"local-{stage}"], vector_jobs.runs[f"ray-{stage}"]
    assert local.code == 1 and ray.code == 1, ray.err  # the truncated file
    assert ray.err.strip().startswith("error: imgs/corrupt.jpg"), ray.err
    out_local, out_ray = vector_jobs.root / f"local-{stage}", vector_jobs.root / f"ray-{stage}"
    files = tree(out_ray)
    assert files == tree(out_local)  # byte-identical shards, metadata and token matrices
    shards = {name for name in files if name.startswith("vectors/")}
    assert {name.split("/")[1] for name in shards} == {"cls", "mean", "tokens"}
    assert {name.split("/")[2] for name in shards} == {"img_emb", "metadata"}
    matrices = set(files) - shards
    assert matrices == (set() if stage == "none" else {f"{p.name}.npy" for p in IMAGES} | {"zz_copy.png.npy"})

    def by_name(recs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {r["name"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in recs}

    local_records = records(out_local)
    ray_records = records(out_ray)[: len(local_records)]  # the first run (ray-none is run again afterwards)
    assert len(local_records) == len(IMAGES) + 2
    assert by_name(ray_records) == by_name(local_records)
    assert by_name(ray_records)["zz_copy.png"]["duplicate_of"] == IMAGES[0].name
    for kind in ("cls", "mean", "tokens"):
        names, vectors = phi3embed.open(out_ray).vectors(kind)
        assert sorted(names) == sorted([p.name for p in IMAGES] + ["zz_copy.png"])
        rows = dict(zip(names, vectors, strict=True))
        assert np.array_equal(rows["zz_copy.png"], rows[IMAGES[0].name])
        assert vectors.dtype == np.float32


@pytest.mark.e2e  # starts Ray
def test_ray_engine_vectors_rerun_writes_nothing(vector_jobs: Jobs) -> None:
    again = vector_jobs.runs["ray-none-again"]
    assert again.code == 1, again.err  # the truncated file fails again; the rest is done
    assert tree(vector_jobs.root / "ray-none") == tree(vector_jobs.root / "local-none")
    recs = records(vector_jobs.root / "ray-none")
    assert sum(r["status"] == "ok" for r in recs) == len(IMAGES) + 1  # no image recorded twice


def test_ray_engine_usage_errors_come_before_any_work(tmp_path: Path, golden: Path) -> None:
    pytest.importorskip("ray")
    run = encode_here(tmp_path, str(IMAGES[0]), "-o", "out", "--model", str(tmp_path / "nowhere"), "--engine", "ray")
    assert run.code == 2 and run.err.startswith("error: ") and str(tmp_path / "nowhere") in run.err
    run = encode_here(tmp_path, str(IMAGES[0]), "-o", "out", "--model", ckpt(), "--engine", "ray", "--device", "cuda:1")
    assert run.code == 2 and "--device auto, cuda or cpu" in run.err
    if not torch.cuda.is_available():
        run = encode_here(
            tmp_path, str(IMAGES[0]), "-o", "out", "--model", ckpt(), "--engine", "ray", "--device", "cuda"
        )
        assert run.code == 2 and "--device cuda: this machine has no GPU" in run.err
    assert not (tmp_path / "out").exists()


def test_a_wrapped_error_is_told_in_one_line() -> None:
    from phi3embed.jobs.ray_engine import _one_line

    class Wrapped(Exception):
        pass

    try:
        try:
            raise ValueError("inner detail\nlast line says it")
        except ValueError as inner:
            raise Wrapped("Wrapped") from inner
    except Wrapped as exc:
        assert _one_line(exc) == "ValueError: last line says it"
    text = "The actor died\nTraceback...\n    raise CheckpointError(\nphi3embed.errors.CheckpointError: a: b c\n"
    assert _one_line(RuntimeError(text)) == "a: b c"
    assert _one_line(CheckpointError("no weights", path="x")) == "x: no weights"


def test_actors_return_the_stage_they_are_asked_for(golden: Path) -> None:
    """EncoderSpec.stage: the rows carry the stored shape, so the driver rebuilds 3-D ``clip`` tensors."""
    clip = RayEncoder(EncoderSpec(model=ckpt(), device="cpu", num_crops=NUM_CROPS, stage="clip"))
    (row,) = decode_rows(clip(batch_of(IMAGES[:1])))
    assert row.ok and row.embedding is not None and row.crops is not None
    rows, cols = row.crops
    assert tuple(row.embedding.shape) == (1 + rows * cols, 576, 64)
    (want,) = clip.embedder.encode([IMAGES[0]])
    assert torch.equal(row.embedding, want)


def test_actor_rows_carry_the_embedders_vectors(golden: Path, bad_files: dict[str, Path]) -> None:
    """EncoderSpec.vectors: each ok row carries the float32 vectors the embedder computes (the local engine's
    call), bit for bit, beside the usual embedding; store_tokens off: the vectors alone; error rows none."""
    kinds = ("cls", "mean", "tokens")
    spec = EncoderSpec(model=ckpt(), device="cpu", num_crops=NUM_CROPS, batch_size=8, vectors=("tokens", "cls", "mean"))
    actor = RayEncoder(spec)
    bad = next(iter(bad_files.values()))
    paths = [*IMAGES[:3], bad, IMAGES[0]]
    good = [p for p in paths if p != bad]
    want = actor.embedder.vectors(good, kinds=kinds)  # the library's call on the same embedder
    embeddings = actor.embedder.encode(good)
    for store_tokens, encoder in ((True, actor), (False, RayEncoder(replace(spec, store_tokens=False)))):
        out = encoder(batch_of(paths))
        rows = list(decode_rows(out))
        assert [r.ok for r in rows] == [p != bad for p in paths]
        assert rows[3].vectors is None and rows[3].embedding is None and str(out["vector_kinds"][3]) == ""
        for j, row in enumerate(r for r in rows if r.ok):
            assert row.vectors is not None and list(row.vectors) == list(kinds)  # canonical order
            for kind in kinds:
                assert row.vectors[kind].dtype == torch.float32
                assert torch.equal(row.vectors[kind], want[kind][j]), (kind, j)
            if store_tokens:
                assert row.embedding is not None and torch.equal(row.embedding, embeddings[j])
            else:
                assert row.embedding is None
        if not store_tokens:
            assert all(bytes(cell) == b"" for cell in out["embedding"])  # no token matrices travel


def test_vector_cells_round_trip_and_refuse_a_torn_row() -> None:
    from phi3embed.jobs.ray_rows import vectors_cells, vectors_from_cells

    vectors = {"cls": torch.randn(5), "tokens": torch.randn(7)}
    kinds, data = vectors_cells(vectors)
    assert kinds == "cls:5,tokens:7" and len(data) == 4 * 12
    back = vectors_from_cells(kinds, data)
    assert list(back) == ["cls", "tokens"] and all(torch.equal(back[k], vectors[k]) for k in vectors)
    assert vectors_from_cells("", b"") == {}
    with pytest.raises(ValueError, match="disagree"):
        vectors_from_cells(kinds, data[:-4])


def test_archive_members_travel_as_their_own_type_and_are_read_on_the_actor(
    encoder: RayEncoder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tar members, parquet rows and unreadable members cross to the actor as cells and come back as the type
    they were listed as; each image is read where the actor runs and encodes as the loose file does."""
    pytest.importorskip("pyarrow")
    from archivefiles import make_parquet, make_tar

    from phi3embed.inputs.archives import Member, ParquetRow, TarMember
    from phi3embed.inputs.listing import list_inputs
    from phi3embed.jobs.ray_rows import LABEL, MEMBER, member_cell, member_from_cell, source_rows

    square, photo = GOLDEN / "images" / "rgb_336x336.png", GOLDEN / "images" / "photo_1000x750.jpg"
    make_tar(tmp_path / "a.tar", [("x.png", square.read_bytes()), ("../up.png", square.read_bytes())])
    make_parquet(tmp_path / "b.parquet", {"key": ["p"], "image": [photo.read_bytes()]})
    monkeypatch.chdir(tmp_path)
    sources = list_inputs(["a.tar", "b.parquet"]).sources
    kinds = {s.name: type(s.member) for s in sources}
    assert kinds == {"a.tar/x.png": TarMember, "a.tar/../up.png": Member, "b.parquet/p": ParquetRow}
    for s in sources:
        assert member_from_cell(member_cell(s.member)) == s.member
    rows = source_rows(sources)
    out = encoder(
        batch_of([r[PATH] for r in rows], **{LABEL: [r[LABEL] for r in rows], MEMBER: [r[MEMBER] for r in rows]})
    )
    results = {s.name: r for s, r in zip(sources, decode_rows(out), strict=True)}
    assert results["a.tar/../up.png"].error is not None and "unsafe member name" in results["a.tar/../up.png"].error
    for name, loose in (("a.tar/x.png", square), ("b.parquet/p", photo)):
        embedding = results[name].embedding
        assert results[name].ok and embedding is not None and torch.equal(embedding, expected(loose))


# --------------------------------------------------------------------------- the driver's input, a block at a time


def _sources(n: int) -> list[Source]:
    from phi3embed.inputs.archives import TarMember

    made = []
    for i in range(n):
        if i % 3 == 0:
            member = TarMember("pack.tar", i, f"m{i}.png", offset=512 * i, size=9)
            made.append(Source(f"pack.tar/m{i}.png", "pack.tar", "", member=member))
        elif i % 3 == 1:
            made.append(Source(f"caf\udce9{i}.png", f"dir/caf\udce9{i}.png", ""))  # not UTF-8: a pickled cell
        else:
            made.append(Source(f"{i}.png", f"/abs/{i}.png", ""))
    return made


def test_input_rows_come_in_blocks_as_the_sources_are_read() -> None:
    from phi3embed.jobs.ray_engine import INPUT_BLOCKS, MAX_BLOCK_ROWS, rows_per_block
    from phi3embed.jobs.ray_rows import source_row_blocks, source_rows

    sources = _sources(11)
    read: list[str] = []

    def lazily() -> Iterator[Source]:
        for s in sources:
            read.append(s.name)
            yield s

    blocks = source_row_blocks(lazily(), 4)
    first = next(blocks)
    assert len(first) == 4 and len(read) == 4  # nothing read ahead of the block being made
    rest = list(blocks)
    assert [len(b) for b in rest] == [4, 3] and [first, *rest] == [source_rows(sources)[i : i + 4] for i in (0, 4, 8)]
    assert [r["index"] for r in first] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        next(source_row_blocks(sources, 0))
    # a short job: one block per actor call; a long one: blocks of at most MAX_BLOCK_ROWS, about INPUT_BLOCKS
    assert rows_per_block(10, 3) == 3 and rows_per_block(INPUT_BLOCKS * 50, 16) == 50
    assert rows_per_block(10**7, 16) == MAX_BLOCK_ROWS


@pytest.mark.e2e  # starts Ray
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # Ray's own, on pickling its context
def test_input_dataset_holds_the_rows_from_items_would(ray_instance: None) -> None:
    import ray.data

    from phi3embed.jobs.ray_engine import input_dataset
    from phi3embed.jobs.ray_rows import source_rows

    sources = _sources(23)
    ds = input_dataset(iter(sources), rows_per_block=5)
    assert ds.num_blocks() == 5
    rows = ds.take_all()
    assert rows == ray.data.from_items(source_rows(sources)).take_all() == source_rows(sources)
