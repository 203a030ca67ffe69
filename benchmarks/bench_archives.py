"""Archives as INPUT (issue 12): listing and resume at scale, and reading from tar / parquet vs loose files.

``scale``: ``--archives`` WebDataset-style tar files of ``--per-archive`` tiny images (each with a ``.txt``
sibling member, as img2dataset writes them) in ``--work``. Times, each in a fresh process with its peak RSS:

* ``list``: :func:`phi3embed.inputs.listing.list_inputs` on ``<work>/*.tar`` (what encode does before the first
  image is read);
* ``rerun``: ``phi3embed encode <work>/*.tar`` over an output folder in which every image is finished (a
  manifest with one ok record per image, an output file each, written here from the record a real encode of one
  member gives, sparse, of the recorded size): listing, loading the manifest, the resume check of every image
  (one ``stat`` each, its size compared with the record), "nothing to do".

``reading``: ``--images`` distinct random JPEGs as loose files, one tar file and one parquet file (HF image
struct). Times the reading + preparation of every image in this process (thread CPU time, best of
``--repeat``), and ``encode`` end to end with the tiny golden checkpoint at ``--num-crops 4`` (wall time, best
of ``--repeat``), and checks that the three give byte-identical outputs.

    python benchmarks/bench_archives.py scale --archives 100 --per-archive 10000 --work /tmp/arch1m
    python benchmarks/bench_archives.py reading --images 64
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from report import save_json  # noqa: E402

MODEL = REPO / "tests" / "data" / "golden" / "checkpoints" / "tiny-phi3v-128k-f32"
CLI = [str(Path(sys.executable).with_name("phi3embed"))]
TINY_PNG = (REPO / "tests" / "data" / "golden" / "images" / "tiny_7x9.png").read_bytes()


def run_measured(cmd: list[str], cwd: Path) -> tuple[float, float, float, subprocess.CompletedProcess[bytes]]:
    """Wall seconds, peak RSS (MiB) and CPU seconds (user + system: what other tenants of a shared host change
    least) of one child process (its own rusage, from ``wait4``)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return wall, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime, done


# --------------------------------------------------------------------------- scale


def build_archives(work: Path, archives: int, per_archive: int) -> None:
    marker = work / ".built"
    if marker.exists() and marker.read_text() == f"{archives} {per_archive}":
        return
    work.mkdir(parents=True, exist_ok=True)
    caption = b"a caption"
    for a in range(archives):
        with tarfile.open(work / f"{a:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(per_archive):
                for name, data in ((f"{i:08d}.png", TINY_PNG), (f"{i:08d}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    marker.write_text(f"{archives} {per_archive}")


def finished_output(work: Path, out: Path) -> int:
    """``out`` as a finished encode of ``work/*.tar`` leaves it (see the module docstring); returns the images."""
    with tempfile.TemporaryDirectory() as tmp:
        one = Path(tmp) / "one.tar"
        with tarfile.open(one, "w") as tf:
            info = tarfile.TarInfo("x.png")
            info.size = len(TINY_PNG)
            tf.addfile(info, io.BytesIO(TINY_PNG))
        run = subprocess.run(
            [*CLI, "encode", "one.tar", "-o", "o", "--model", str(MODEL), "--num-crops", "4", "-q"], cwd=tmp, check=True
        )
        assert run.returncode == 0
        template = json.loads((Path(tmp) / "o" / "manifest.jsonl").read_text().splitlines()[0])
        manifest_name = "manifest.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(out / manifest_name, "w") as fh:  # noqa: PTH123
        for tar in sorted(work.glob("*.tar")):
            st = tar.stat()
            folder = out / tar.name
            folder.mkdir(exist_ok=True)
            with tarfile.open(tar) as tf:
                names = [m.name for m in tf if m.name.endswith(".png")]
            lines = []
            for name in names:
                record = dict(template, name=f"{tar.name}/{name}", source=str(tar), output=f"{tar.name}/{name}.npy")
                record.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
                lines.append(json.dumps(record) + "\n")
                with open(folder / f"{name}.npy", "wb") as out_file:  # noqa: PTH123
                    out_file.truncate(template["output_size"])  # sparse, of the size resume checks
            fh.writelines(lines)
            count += len(names)
    return count


LIST_SNIPPET = """
import resource, sys, time
from phi3embed.inputs.listing import list_inputs
start = time.perf_counter()
listing = list_inputs([sys.argv[1]])
print(len(listing.sources), time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def scale(args: argparse.Namespace) -> dict[str, Any]:
    work: Path = args.work
    t0 = time.perf_counter()
    build_archives(work, args.archives, args.per_archive)
    print(f"archives ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    images = args.archives * args.per_archive
    pattern = str(work / "*.tar")
    report: dict[str, Any] = {"archives": args.archives, "per_archive": args.per_archive, "images": images}
    for r in range(args.repeat):
        run = subprocess.run(
            [sys.executable, "-c", LIST_SNIPPET, pattern], capture_output=True, text=True, check=True, cwd=REPO
        )
        count, seconds, rss = run.stdout.split()
        assert int(count) == images, (count, images)
        report.setdefault("list_s", []).append(float(seconds))
        report["list_peak_rss_mib"] = float(rss)
        print(f"list {r}: {float(seconds):.2f} s, peak RSS {float(rss):.0f} MiB", file=sys.stderr)
    out = work.parent / (work.name + "-out")
    if not (out / "manifest.jsonl").exists():
        t0 = time.perf_counter()
        finished_output(work, out)
        print(f"finished output ready ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    for r in range(args.repeat):
        cmd = [*CLI, "encode", pattern, "-o", str(out), "--model", str(MODEL), "--num-crops", "4"]
        wall, rss, _, done = run_measured(cmd, REPO)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert b"skipped" in done.stderr or b"nothing" in done.stderr or b"done" in done.stderr, done.stderr[-500:]
        report.setdefault("rerun_s", []).append(wall)
        report["rerun_peak_rss_mib"] = rss
        print(f"rerun {r}: {wall:.2f} s, peak RSS {rss:.0f} MiB", file=sys.stderr)
    per = 100_000 / images
    report["list_s_per_100k"] = min(report["list_s"]) * per
    report["rerun_s_per_100k"] = min(report["rerun_s"]) * per
    return report


# --------------------------------------------------------------------------- reading


def build_reading(work: Path, n: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    loose = work / "loose"
    loose.mkdir(parents=True, exist_ok=True)
    blobs = []
    for i in range(n):
        pixels = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
        (loose / f"{i:05d}.jpg").write_bytes(blobs[-1])
    with tarfile.open(work / "images.tar", "w") as tf:
        for i, blob in enumerate(blobs):
            info = tarfile.TarInfo(f"{i:05d}.jpg")
            info.size = len(blob)
            tf.addfile(info, io.BytesIO(blob))
    keys = [f"{i:05d}.jpg" for i in range(n)]
    table = pa.table({"__key__": keys, "image": [{"bytes": b, "path": k} for b, k in zip(blobs, keys, strict=True)]})
    pq.write_table(table, work / "images.parquet", row_group_size=16)


def reading(args: argparse.Namespace) -> dict[str, Any]:
    from phi3embed.core.config import PreprocessConfig
    from phi3embed.inputs.listing import list_inputs
    from phi3embed.jobs.prepare import Preparer

    work = Path(tempfile.mkdtemp(prefix="bench-archives-"))
    build_reading(work, args.images)
    inputs = {"loose": "loose", "tar": "images.tar", "parquet": "images.parquet"}
    preparer = Preparer(PreprocessConfig(num_crops=4))
    report: dict[str, Any] = {
        "images": args.images,
        "prepare_cpu_ms_per_image": {},
        "encode_wall_s": {},
        "encode_cpu_s": {},
    }
    os.chdir(work)
    for kind, arg in inputs.items():
        sources = list_inputs([arg]).sources
        assert len(sources) == args.images
        best = float("inf")
        for _ in range(args.repeat):
            start = time.thread_time()
            for s in sources:
                assert preparer(s).item is not None
            best = min(best, time.thread_time() - start)
        report["prepare_cpu_ms_per_image"][kind] = 1000 * best / args.images
    for _ in range(args.repeat):
        for kind, arg in inputs.items():
            out = work / f"out-{kind}"
            cmd = [*CLI, "encode", arg, "-o", str(out), "--model", str(MODEL), "--num-crops", "4", "-q", "--overwrite"]
            wall, _, cpu, done = run_measured(cmd, work)
            assert done.returncode == 0, done.stderr.decode()[-2000:]
            report["encode_wall_s"][kind] = min(wall, report["encode_wall_s"].get(kind, float("inf")))
            report["encode_cpu_s"][kind] = min(cpu, report["encode_cpu_s"].get(kind, float("inf")))
            print(f"{kind}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr)
    for i in range(args.images):
        loose = (work / "out-loose" / f"{i:05d}.jpg.npy").read_bytes()
        assert loose == (work / "out-tar" / "images.tar" / f"{i:05d}.jpg.npy").read_bytes()
        assert loose == (work / "out-parquet" / "images.parquet" / f"{i:05d}.jpg.npy").read_bytes()
    report["outputs_identical"] = True
    for key in ("prepare_cpu_ms_per_image", "encode_wall_s", "encode_cpu_s"):
        base = report[key]["loose"]
        report[key + "_ratio_vs_loose"] = {k: v / base for k, v in report[key].items()}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("scale")
    s.add_argument("--archives", type=int, default=100)
    s.add_argument("--per-archive", type=int, default=10_000)
    s.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "phi3embed-archives")
    s.add_argument("--repeat", type=int, default=2)
    r = sub.add_parser("reading")
    r.add_argument("--images", type=int, default=64)
    r.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.json = args.json.resolve() if args.json else None  # "reading" works in a temporary folder
    report = scale(args) if args.what == "scale" else reading(args)
    print(json.dumps(report, indent=2))
    save_json(args.json, report)


if __name__ == "__main__":
    main()
