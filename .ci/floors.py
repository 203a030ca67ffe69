"""Print the floor environment's requirements: every declared lower bound of pyproject.toml, installed exactly.

    python3 .ci/floors.py [EXTRA ...] > floors.txt && pip install -r floors.txt

Each requirement of ``[project].dependencies`` (and of the extras named) with a ``>=X`` bound becomes ``name==X``
(its markers kept), as a "lowest direct" resolution would choose; transitive dependencies are left to the resolver.
torch is the one exception: it becomes ``torch==TORCH`` (default 2.13.0, the CPU build this project's machines carry
on local disk), because older torch releases are not reachable without downloading gigabytes.
A requirement without a lower bound is an error: a floor nobody states cannot be tested.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCAL_TORCH = "2.13.0"

# name[extras] spec ; marker
_REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?P<extras>\[[^\]]*\])?\s*(?P<spec>[^;]*?)\s*(?:;(?P<marker>.*))?$"
)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def floor_pins(requirements: list[str], *, project: str, torch: str) -> list[str]:
    """``["numpy>=1.24", "pyarrow>=16,<26; python_version < '3.13'"]`` -> ``["numpy==1.24", "pyarrow==16; ..."]``.

    A reference to the project's own extras (``phi3embed[test]``) is skipped: the caller names those extras."""
    pins = []
    for line in requirements:
        match = _REQUIREMENT.match(line)
        if not match:
            raise ValueError(f"cannot read the requirement {line!r}")
        name, extras, spec, marker = match["name"], match["extras"] or "", match["spec"], match["marker"]
        if _normal(name) == _normal(project):
            continue
        lower = [part.strip()[2:].strip() for part in spec.split(",") if part.strip().startswith(">=")]
        if len(lower) != 1:
            raise ValueError(f"{line!r}: one '>=' lower bound is needed to test the floor")
        version = torch if _normal(name) == "torch" else lower[0]
        pins.append(f"{name}{extras}=={version}" + (f"; {marker.strip()}" if marker else ""))
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("extras", nargs="*", help="optional-dependency groups to pin as well (e.g. test parquet)")
    parser.add_argument("--torch", default=LOCAL_TORCH, help=f"torch version to install (default {LOCAL_TORCH})")
    args = parser.parse_args()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in args.extras:
        requirements += project["optional-dependencies"][extra]
    print("\n".join(floor_pins(requirements, project=project["name"], torch=args.torch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
