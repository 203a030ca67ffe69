"""The CPU allocator setting (phi3embed/core/allocator.py): what OUR code decides about it.

Off for library users unless asked for, on when asked, vetoed by the environment variable. The decisions
are checked in this process with the setting itself replaced by a recorder (it is process-wide and cannot
be undone); one end-to-end check applies it for real in a fresh interpreter. How many page faults it saves
is a property of the machine: benchmarks/page_faults.py measures it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
from conftest import GOLDEN, TINY_128K

import phi3embed.core.allocator as allocator
import phi3embed.core.embedder as embedder_module
from phi3embed import Phi3VisionEmbedder

CKPT = str(GOLDEN / "checkpoints" / TINY_128K)
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def test_the_library_leaves_the_allocator_alone_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(embedder_module, "keep_freed_memory", lambda: calls.append("on") or "on")
    Phi3VisionEmbedder.from_pretrained(CKPT)
    Phi3VisionEmbedder.from_pretrained(CKPT, plain=True)
    assert calls == []
    Phi3VisionEmbedder.from_pretrained(CKPT, tune_allocator=True)
    assert calls == ["on"]


def test_environment_variable_vetoes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the veto the setting is never applied (so this process is left as it was) and says why."""
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setenv("PHI3EMBED_MALLOC_TUNING", "0")
    assert allocator.keep_freed_memory() == "off (PHI3EMBED_MALLOC_TUNING=0)"
    assert allocator.state() == "off (PHI3EMBED_MALLOC_TUNING=0)"


@pytest.mark.e2e
@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_asking_for_it_applies_it_once_per_process() -> None:
    code = f"""
from phi3embed import Phi3VisionEmbedder
from phi3embed.core.allocator import keep_freed_memory, state
Phi3VisionEmbedder.from_pretrained({CKPT!r})
print(state())
Phi3VisionEmbedder.from_pretrained({CKPT!r}, tune_allocator=True)
print(state())
print(keep_freed_memory())
"""
    env = {k: v for k, v in os.environ.items() if k != "PHI3EMBED_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    before, asked, again = out.stdout.strip().splitlines()
    assert before == "default" and asked.startswith("on") and again == asked  # "on (32 MiB)" on glibc < 2.35
