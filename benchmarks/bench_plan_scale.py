"""``phi3embed plan`` at scale: peak memory and time per image, from the slope between two input sizes.

Builds folders of ``--sizes`` copies (hard links) of one tiny PNG (tests/data/golden/images/tiny_7x9.png), then
runs ``phi3embed plan FOLDER --num-crops 4 [--json]`` on each in a fresh process (the console script of the
interpreter running this, with this checkout first on PYTHONPATH) and reads its peak RSS and CPU time from
``os.wait4``. The fixed costs (interpreter, torch, Typer) cancel in the slope between the two sizes, which is
what a per-image cost is:

    PYTHONPATH=$PWD python benchmarks/bench_plan_scale.py --sizes 20000 60000 --tree /tmp/plan_trees

``--json`` plans with ``--json`` (the document) instead of the text table; ``--rows`` adds ``--rows``. The trees are kept under ``--tree``
for reruns (they are made once; only hard links: a few MB of directory entries). ``--code DIR`` runs another
version of phi3embed, e.g. ``git archive main | tar -x -C /tmp/before`` then ``--code /tmp/before``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
IMAGE = HERE.parent / "tests" / "data" / "golden" / "images" / "tiny_7x9.png"
LINKS = 10_000


def build_tree(root: Path, files: int) -> Path:
    folder = root / f"n{files}"
    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        source = root / f"tiny_7x9.{i // LINKS}.png"  # a file system allows so many links to one file
        if not source.exists():
            source.write_bytes(IMAGE.read_bytes())
        target = folder / f"img{i:08d}.png"
        if not target.exists():
            os.link(source, target)
    done.write_text("")
    return folder


def run_plan(folder: Path, *, flags: list[str], code: Path) -> tuple[float, float, float, int]:
    """``(peak RSS MiB, wall s, CPU s, exit code)`` of one plan run in a fresh process."""
    script = Path(sys.executable).with_name("phi3embed")
    args = [str(script), "plan", str(folder), "--num-crops", "4", *flags]
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=sink, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    rss_kib = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024
    return rss_kib / 1024, wall, usage.ru_utime + usage.ru_stime, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[20_000, 60_000])
    parser.add_argument("--tree", type=Path, default=Path("/tmp/plan_trees"))
    parser.add_argument("--json", action="store_true", help="plan --json instead of the table")
    parser.add_argument("--rows", action="store_true", help="plan --rows: every row printed (streamed)")
    parser.add_argument(
        "--code", type=Path, default=HERE.parent, help="the phi3embed tree to run (another version: its export)"
    )
    args = parser.parse_args()
    results = []
    for n in args.sizes:
        folder = build_tree(args.tree, n)
        rss, wall, cpu, code = run_plan(
            folder, flags=[*(["--json"] if args.json else []), *(["--rows"] if args.rows else [])], code=args.code
        )
        results.append((n, rss, wall, cpu))
        print(f"{n:>9,} images: peak RSS {rss:8.1f} MiB, wall {wall:7.1f} s, CPU {cpu:7.1f} s, exit {code}")
    (n0, rss0, _, cpu0), (n1, rss1, _, cpu1) = results
    per_image_kb = (rss1 - rss0) * 1024 * 1024 / (n1 - n0) / 1000
    per_100k = (cpu1 - cpu0) / (n1 - n0) * 100_000
    print(f"slope: {per_image_kb:.2f} kB peak RSS per image, {per_100k:.1f} CPU s per 100k images")


if __name__ == "__main__":
    main()
