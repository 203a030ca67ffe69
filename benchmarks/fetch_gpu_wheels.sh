#!/usr/bin/env bash
# Download, HERE (where PyPI is reachable), the wheels the GPU machine would need if it lacked a package,
# for its Python (3.12) on manylinux x86-64, into .whl/ (git-ignored). gpu_check.sh installs from there,
# with no network, only the wheels of packages that are missing on that machine (never torch).
#
#   benchmarks/fetch_gpu_wheels.sh                     # the versions this checkout's .venv is tested with
#   benchmarks/fetch_gpu_wheels.sh transformers==5.24.0 typer==0.29.2
#
# Then pass carry [".whl"] to the device tool (the wheels count towards its 64 MiB limit).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
PYVER=${GPU_PYTHON_VERSION:-3.12}

if [ $# -eq 0 ]; then
    # Pure-Python or small packages the project imports, pinned to what is installed here.
    mapfile -t specs < <("$PY" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
for name in ("transformers", "safetensors", "huggingface_hub", "tokenizers", "typer", "rich"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
EOF
    )
    set -- "${specs[@]}"
fi

mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
echo "fetching for CPython $PYVER manylinux x86-64: $*" >&2
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d .whl "$@"

# One version per package: two would stop the install there.
"$PY" - <<'EOF'
import collections, pathlib, re, sys
seen = collections.defaultdict(list)
for w in sorted(pathlib.Path(".whl").glob("*.whl")):
    seen[re.sub(r"[-_.]+", "_", w.name.split("-")[0]).lower()].append(w.name)
dups = {k: v for k, v in seen.items() if len(v) > 1}
for name, files in sorted(seen.items()):
    print(f"  {files[0]}", file=sys.stderr)
if dups:
    sys.exit(f"several versions of {sorted(dups)} in .whl/: keep one of each")
EOF
du -sh .whl >&2
