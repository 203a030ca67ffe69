"""Listing memory and time per image, as a rerun of a finished job pays them (issue 20: ten million images).

For two sizes of a tree of loose files (``--sizes``, default 100k and 300k; built once under ``--work`` by
:func:`bench_listing.build_tree`) and of a folder of tar files (``--archived``: 1000 images per tar), each
figure comes from a fresh process, so that peaks do not hide each other:

* ``list``: :func:`list_inputs` on the tree (or ``<folder>/*.tar``), then one pass over the sources with an
  ``os.stat`` of each loose source (what a rerun's resume check costs at least);
* ``finished``: the tar files again, with a ``finished_archive`` hook that says every archive is done (what a
  rerun of a finished archive job lists: nothing is opened).

The peak resident memory of each process comes from ``os.wait4``; bytes per image are the slope between the two
sizes (the interpreter, numpy and the imports cancel out). ``--against FILE`` measures another
``phi3embed/inputs/listing.py`` (e.g. the one before) the same way; it has no hook, so no ``finished`` row:

    git show main:phi3embed/inputs/listing.py > /tmp/listing_before.py
    python benchmarks/bench_listing_memory.py --work /tmp/listing-bench --against /tmp/listing_before.py
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_listing import build_tree  # noqa: E402
from report import save_json  # noqa: E402

CHILD = r"""
import importlib.util, json, os, sys, time
path, mode, target = sys.argv[1:4]
if path == "-":
    from phi3embed.inputs import listing
else:
    spec = importlib.util.spec_from_file_location("listing_against", path)
    listing = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = listing
    spec.loader.exec_module(listing)
kw = {"finished_archive": lambda p, name, st: 1000} if mode == "finished" else {}
start = time.perf_counter()
found = listing.list_inputs([target], **kw)
listed = time.perf_counter() - start
start = time.perf_counter()
count = 0
for source in found.sources:
    if source.member is None:
        os.stat(source.path)
    count += 1
passed = time.perf_counter() - start
print(json.dumps({"images": count + sum(getattr(found, "finished_archives", {}).values()), "list_s": listed,
                  "pass_s": passed}))
"""


def build_tars(folder: Path, images: int, per_tar: int = 1000) -> None:
    """``images`` one-byte ``.jpg`` members in tar files of ``per_tar`` each (the listing reads headers only)."""
    marker = folder / ".built"
    if marker.exists() and marker.read_text() == f"{images} {per_tar}":
        return
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(images // per_tar):
        with tarfile.open(folder / f"{t:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(per_tar):
                info = tarfile.TarInfo(f"s{t:05d}{i:05d}.jpg")
                info.size = 1
                tf.addfile(info, io.BytesIO(b"x"))
    marker.write_text(f"{images} {per_tar}")


def measure(module: str, mode: str, target: str) -> dict[str, Any]:
    """One fresh process: its figures and its peak RSS (bytes)."""
    import json

    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, module, mode, target], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the {mode} run on {target} failed ({proc.returncode})")
    return {**json.loads(out), "peak_bytes": usage.ru_maxrss * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/listing-bench"), help="where the trees are built")
    parser.add_argument("--sizes", type=int, nargs=2, default=[100_000, 300_000])
    parser.add_argument("--archived", type=int, nargs=2, default=[100_000, 300_000])
    parser.add_argument("--against", type=Path, help="another listing.py to measure the same way")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    versions = [("this", "-")] + ([("against", str(args.against))] if args.against else [])
    for kind, sizes in (("loose", args.sizes), ("archived", args.archived)):
        targets = []
        for size in sizes:
            if kind == "loose":
                root = args.work / f"tree{size}"
                root.mkdir(parents=True, exist_ok=True)
                build_tree(root, files=size, dirs=max(1, size // 100), noext=0.05)
                targets.append(str(root))
            else:
                build_tars(args.work / f"tars{size}", size)
                targets.append(str(args.work / f"tars{size}" / "*.tar"))
        modes = ["list"] + (["finished"] if kind == "archived" else [])
        for version, module in versions:
            for mode in modes:
                if mode == "finished" and version != "this":
                    continue
                small, large = (measure(module, mode, t) for t in targets)
                per_image = (large["peak_bytes"] - small["peak_bytes"]) / (large["images"] - small["images"])
                row = {
                    "kind": kind,
                    "version": version,
                    "mode": mode,
                    "sizes": [small["images"], large["images"]],
                    "peak_bytes": [small["peak_bytes"], large["peak_bytes"]],
                    "bytes_per_image": per_image,
                    "list_s_per_100k": [r["list_s"] / r["images"] * 1e5 for r in (small, large)],
                    "pass_s_per_100k": [r["pass_s"] / r["images"] * 1e5 for r in (small, large)],
                }
                rows.append(row)
                print(
                    f"{kind:8} {version:7} {mode:8} {small['images']:>8,} -> {large['images']:>8,} images: "
                    f"peak {small['peak_bytes'] / 2**20:6.1f} -> {large['peak_bytes'] / 2**20:6.1f} MiB, "
                    f"{per_image:6.0f} B/image; list {row['list_s_per_100k'][1]:.2f} s/100k, "
                    f"pass+stat {row['pass_s_per_100k'][1]:.2f} s/100k",
                    flush=True,
                )
    if args.json:
        save_json(args.json, {"rows": rows, "time": time.time()})


if __name__ == "__main__":
    main()
