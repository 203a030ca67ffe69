"""Listing speed: ``expand_inputs`` over a large tree (what ``encode`` and ``plan`` do before any image is read).

Builds a tree of ``--files`` tiny files in a temporary folder (``--dirs`` subfolders; a ``--noext`` share of
them without an image extension, so the listing has to sniff their first bytes, half of those real PNG
signatures), then times ``expand_inputs`` on it ``--repeat`` times and reports the best and the median.
``--against FILE`` times another version of ``phi3embed/inputs/listing.py`` on the same tree, alternating runs
(the host's load then weighs on both alike), and prints this checkout's time over that one's:

    git show 1ef1de3:phi3embed/inputs/listing.py > /tmp/listing_before.py
    python benchmarks/bench_listing.py --tree /tmp/tree100k --against /tmp/listing_before.py

The page cache is warm after the first repeat: the figures are the CPU cost of the listing rules (system
calls and Python), which is what a rule change can make worse; a cold cache adds the same disk reads to both.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report import save_json  # noqa: E402

from phi3embed.inputs import listing  # noqa: E402

PNG_HEAD = b"\x89PNG\r\n\x1a\n" + b"\0" * 8


def build_tree(root: Path, *, files: int, dirs: int, noext: float) -> None:
    """``files`` files spread over ``dirs`` folders two levels deep; empty files with image extensions and
    16-byte files without one (every other a PNG signature)."""
    marker = root / ".built"
    if marker.exists() and marker.read_text() == f"{files} {dirs} {noext}":
        return
    every = int(1 / noext) if noext > 0 else 0
    for i in range(files):
        d = root / f"d{i % dirs // 10:03d}" / f"e{i % dirs:04d}"
        if i < dirs:
            d.mkdir(parents=True, exist_ok=True)
        if every and i % every == 0:
            (d / f"f{i:06d}").write_bytes(PNG_HEAD if (i // every) % 2 == 0 else b"x" * 16)
        else:
            (d / f"f{i:06d}.jpg").write_bytes(b"")
    marker.write_text(f"{files} {dirs} {noext}")


def load_listing(path: Path) -> ModuleType:
    """Another version of the listing module, loaded from a file (it imports only phi3embed.errors)."""
    spec = importlib.util.spec_from_file_location("listing_against", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def time_once(module: ModuleType, root: Path) -> tuple[float, int]:
    start = time.perf_counter()
    count = len(module.expand_inputs([str(root)]))
    return time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--dirs", type=int, default=1000)
    parser.add_argument("--noext", type=float, default=0.05, help="share of files without an image extension")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tree", type=Path, help="where to build (and reuse) the tree (default: a temp folder)")
    parser.add_argument(
        "--against", type=Path, help="another listing.py to time on the same tree (e.g. the one before)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp:
        root = args.tree or Path(tmp) / "tree"
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        build_tree(root, files=args.files, dirs=args.dirs, noext=args.noext)
        built = time.perf_counter() - start
        other = load_listing(args.against) if args.against else None
        times: list[float] = []
        other_times: list[float] = []
        for _ in range(args.repeat):
            seconds, count = time_once(listing, root)
            times.append(seconds)
            if other is not None:
                seconds, other_count = time_once(other, root)
                other_times.append(seconds)
    report: dict[str, Any] = {
        "files": args.files,
        "dirs": args.dirs,
        "noext": args.noext,
        "listed": count,
        "best_s": min(times),
        "median_s": statistics.median(times),
        "times_s": times,
        "build_s": built,
        "checkout": subprocess.run(
            ["git", "-C", str(HERE), "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip(),
    }
    line = (
        f"{args.files:,} files in {args.dirs} folders: {count:,} listed; "
        f"best {min(times):.3f} s, median {statistics.median(times):.3f} s over {args.repeat} runs"
    )
    if other is not None:
        report.update(against=str(args.against), against_listed=other_count, against_best_s=min(other_times))
        report["against_times_s"] = other_times
        report["ratio"] = min(times) / min(other_times)
        line += (
            f"\n{args.against}: {other_count:,} listed; best {min(other_times):.3f} s, "
            f"median {statistics.median(other_times):.3f} s\nthis / that: {report['ratio']:.2f}x (best times)"
        )
    print(line)
    save_json(args.json, report)


if __name__ == "__main__":
    main()
