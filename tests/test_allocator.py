"""The CPU allocator setting (phi3embed/core/allocator.py): what OUR code decides about it.

Off for library users unless asked for, on when asked (CPU only), vetoed by the environment variable. Each
check runs in a fresh interpreter: the setting is process-wide and cannot be undone. How many page faults
it saves is a property of the machine: benchmarks/page_faults.py measures it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
from conftest import GOLDEN, TINY_128K

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

CKPT = str(GOLDEN / "checkpoints" / TINY_128K)


def _run(code: str, env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, **(env or {})}
    )
    return out.stdout.strip().splitlines()


def test_the_library_leaves_the_allocator_alone_unless_asked() -> None:
    code = f"""
from phi3embed import Phi3VisionEmbedder
from phi3embed.core.allocator import state
Phi3VisionEmbedder.from_pretrained({CKPT!r})
Phi3VisionEmbedder.from_pretrained({CKPT!r}, plain=True)
print(state())
Phi3VisionEmbedder.from_pretrained({CKPT!r}, tune_allocator=True)
print(state())
"""
    assert _run(code) == ["default", "on"]


def test_environment_variable_vetoes_it() -> None:
    code = f"""
from phi3embed import Phi3VisionEmbedder
from phi3embed.core.allocator import keep_freed_memory, state
Phi3VisionEmbedder.from_pretrained({CKPT!r}, tune_allocator=True)
print(state())
print(keep_freed_memory())
"""
    off = "off (PHI3EMBED_MALLOC_TUNING=0)"
    assert _run(code, env={"PHI3EMBED_MALLOC_TUNING": "0"}) == [off, off]
