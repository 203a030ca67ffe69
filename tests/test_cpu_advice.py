"""What info, plan and the encode summary tell about ``--dtype bfloat16`` on this CPU (issue 21, item 2).

Most tests fix the host: ``matrix_units`` (what /proc/cpuinfo says) and ``measure_speed`` (the timing) are
replaced, so the words do not depend on the machine running the tests; one test times the real layer of a tiny
golden checkpoint.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import typer
from conftest import GOLDEN, TINY_35, TINY_128K
from typer.testing import CliRunner

from phi3embed.cli import app as app_module
from phi3embed.core import cpu
from phi3embed.core.checkpoint import resolve_configs
from phi3embed.core.cpu import BF16_MIN_COSINE, Bf16Advice, DtypeSpeed, MatrixUnits, bf16_advice, parse_cpuinfo

MODEL = str(GOLDEN / "checkpoints" / TINY_35)
IMAGE = str(GOLDEN / "images" / "photo_1000x750.jpg")

AMX = MatrixUnits(model="Intel(R) Xeon(R) Platinum 8480+", amx_bf16=True, avx512_bf16=True, arm_bf16=False)
NONE = MatrixUnits(model="Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", amx_bf16=False, avx512_bf16=False, arm_bf16=False)
SPEED = DtypeSpeed(float32_ms=12.0, bfloat16_ms=4.0, seconds=0.75)  # a 3.0x host

# Excerpts of /proc/cpuinfo as the kernel writes it (tab before the colon, flags space-separated).
X86_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme de pse tsc msr avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme de pse tsc msr avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 avx512_fp16 amx_tile amx_int8
"""
X86_AVX512_BF16 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu vme de pse avx2 avx512f avx512dq avx512_bf16 avx512vl avx512_vnni
"""
X86_NONE = """processor\t: 0
model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz
flags\t\t: fpu vme de pse tsc msr sse4_2 avx avx2 fma
"""
ARM_BF16 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics asimddp sve svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


# --------------------------------------------------------------------------- what the CPU has


def test_parse_cpuinfo_x86(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    amx = parse_cpuinfo(X86_AMX)
    assert (amx.amx_bf16, amx.avx512_bf16, amx.arm_bf16, amx.any) == (True, True, False, True)
    assert amx.model == "Intel(R) Xeon(R) Platinum 8480+" and amx.label == "AMX-BF16 + AVX512-BF16"
    avx = parse_cpuinfo(X86_AVX512_BF16)
    assert (avx.amx_bf16, avx.avx512_bf16, avx.label) == (False, True, "AVX512-BF16")
    assert avx.model == "AMD EPYC 9654 96-Core Processor"
    none = parse_cpuinfo(X86_NONE)
    assert not none.any and none.label == "none" and none.to_dict()["label"] == "none"
    assert not parse_cpuinfo("").any and parse_cpuinfo("").model == ""
    assert not parse_cpuinfo(ARM_BF16).arm_bf16  # "bf16" is an Arm feature name: not on an x86 host


def test_parse_cpuinfo_arm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    arm = parse_cpuinfo(ARM_BF16)
    assert (arm.arm_bf16, arm.amx_bf16, arm.avx512_bf16, arm.label) == (True, False, False, "Arm BF16")
    # SVE's bf16 alone (svebf16) is another feature; a word inside another word is not a flag
    assert not parse_cpuinfo(ARM_BF16.replace(" bf16 ", " ")).arm_bf16
    monkeypatch.setattr(platform, "machine", lambda: "arm64")  # macOS' name for it
    assert parse_cpuinfo(ARM_BF16).arm_bf16


def test_matrix_units_reads_the_file_and_survives_its_absence(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(X86_AVX512_BF16)
    assert cpu.matrix_units(info).label == "AVX512-BF16"
    fallback = cpu.matrix_units(tmp_path / "absent")  # not Linux: what PyTorch detects
    assert isinstance(fallback.any, bool) and not fallback.arm_bf16


# --------------------------------------------------------------------------- the advice


def test_advice_words_follow_the_facts() -> None:
    measured = Bf16Advice(AMX, SPEED)
    line = measured.line()
    assert line.startswith("--dtype bfloat16: 3.0x faster per encoder layer on this CPU (measured now, 0.75 s)")
    assert f"per-token cosine {BF16_MIN_COSINE} of float32 (tested)" in line and line.endswith("stays float32")
    slower = Bf16Advice(AMX, DtypeSpeed(float32_ms=5.0, bfloat16_ms=5.5, seconds=0.05))
    assert "0.9x the float32 speed" in slower.line() and "not faster for this shape" in slower.line()
    assert "faster per encoder layer" not in slower.line()
    unmeasured = Bf16Advice(AMX, None, "--no-measure").line(measure_hint="--measure times it")
    assert unmeasured.startswith("--dtype bfloat16: not measured (--no-measure; --measure times it); usually faster")
    assert "not expected to be faster" in Bf16Advice(NONE, None, "no bf16 matrix units").line()
    assert Bf16Advice(AMX, SPEED, on_cpu=False).line().startswith("with --device cpu, --dtype bfloat16: 3.0x")
    doc = measured.to_dict()
    assert doc["label"] == "AMX-BF16 + AVX512-BF16" and doc["encode_device"] == "cpu"
    assert doc["bfloat16"]["factor"] == 3.0 and doc["not_measured"] is None and doc["advice"] == line
    assert doc["bfloat16_min_cosine"] == BF16_MIN_COSINE
    json.dumps(doc)


def test_bf16_advice_measures_only_where_it_can_matter(monkeypatch: pytest.MonkeyPatch) -> None:
    vision, _ = resolve_configs(MODEL)
    calls: list[Any] = []
    monkeypatch.setattr(cpu, "measure_speed", lambda v: calls.append(v) or SPEED)
    assert bf16_advice(vision, units=AMX).speed == SPEED and calls == [vision]
    assert bf16_advice(vision, units=NONE).not_measured == "no bf16 matrix units"
    assert bf16_advice(vision, units=AMX, on_cpu=False).not_measured == "encode runs on CUDA here"
    assert bf16_advice(vision, units=AMX, measure=False, not_asked="x").not_measured == "x"
    assert len(calls) == 1
    assert bf16_advice(vision, units=NONE, measure=True).speed == SPEED  # asked: measured anyway

    def fails(_: Any) -> DtypeSpeed:
        raise RuntimeError("mkldnn bf16 path is not supported\nmore lines")

    monkeypatch.setattr(cpu, "measure_speed", fails)
    failed = bf16_advice(vision, units=AMX)
    assert failed.speed is None and failed.not_measured == "timing failed: mkldnn bf16 path is not supported"


def test_measure_speed_on_a_tiny_checkpoint() -> None:
    """The real timing (no replacement): sane fields, the factor is the ratio of the two times."""
    vision, _ = resolve_configs(MODEL)
    speed = cpu.measure_speed(vision, repeat=1)
    assert speed.float32_ms > 0 and speed.bfloat16_ms > 0 and speed.seconds > 0
    assert math.isclose(speed.factor, speed.float32_ms / speed.bfloat16_ms)
    assert speed.seconds * 1e3 > speed.float32_ms + speed.bfloat16_ms  # building and warm-ups included
    assert speed.to_dict()["factor"] == round(speed.factor, 3)


# --------------------------------------------------------------------------- info and plan


@pytest.fixture()
def host(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A fixed host: ``host.units`` as the CPU's units, CUDA absent unless ``host.cuda``; every timing counted."""
    state = SimpleNamespace(units=AMX, cuda=False, timed=0)

    def timed(vision: Any) -> DtypeSpeed:
        state.timed += 1
        return SPEED

    monkeypatch.setattr(cpu, "matrix_units", lambda: state.units)
    monkeypatch.setattr(cpu, "measure_speed", timed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state.cuda)
    return state


def _oneline(text: str) -> str:
    return " ".join(text.split())  # tables wrap long rows


def test_info_with_units_measures_and_says_so(app: typer.Typer, runner: CliRunner, host: SimpleNamespace) -> None:
    result = runner.invoke(app, ["info", "--model", MODEL, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)["cpu"]
    assert doc["label"] == "AMX-BF16 + AVX512-BF16" and doc["model"] == AMX.model and doc["amx_bf16"] is True
    assert doc["bfloat16"] == SPEED.to_dict() and doc["encode_device"] == "cpu" and host.timed == 1
    assert doc["advice"].startswith("--dtype bfloat16: 3.0x faster per encoder layer on this CPU (measured now")
    table = runner.invoke(app, ["info", "--model", MODEL])
    assert table.exit_code == 0 and table.stderr == ""
    text = _oneline(table.stdout)
    assert f"CPU {AMX.model}; bf16 matrix units: AMX-BF16 + AVX512-BF16" in text
    assert "--dtype bfloat16: 3.0x faster per encoder layer on this CPU (measured now, 0.75 s)" in text
    assert "the default stays float32" in text and host.timed == 2
    skipped = runner.invoke(app, ["info", "--model", MODEL, "--json", "--no-measure"])
    doc = json.loads(skipped.stdout)["cpu"]
    assert doc["bfloat16"] is None and doc["not_measured"] == "--no-measure" and host.timed == 2


def test_info_without_units_or_with_cuda_does_not_measure_unless_asked(
    app: typer.Typer, runner: CliRunner, host: SimpleNamespace
) -> None:
    host.units = NONE
    doc = json.loads(runner.invoke(app, ["info", "--model", MODEL, "--json"]).stdout)["cpu"]
    assert doc["label"] == "none" and doc["bfloat16"] is None and host.timed == 0
    assert "not expected to be faster without bf16 matrix units" in doc["advice"]
    table = _oneline(runner.invoke(app, ["info", "--model", MODEL]).stdout)
    assert "bf16 matrix units: none" in table and "(not measured; --measure times it)" in table
    doc = json.loads(runner.invoke(app, ["info", "--model", MODEL, "--json", "--measure"]).stdout)["cpu"]
    assert doc["bfloat16"]["factor"] == 3.0 and host.timed == 1  # asked: timed even without units
    host.units, host.cuda = AMX, True  # encode would run on CUDA: the advice is for --device cpu
    doc = json.loads(runner.invoke(app, ["info", "--model", MODEL, "--json"]).stdout)["cpu"]
    assert doc["encode_device"] == "cuda" and doc["bfloat16"] is None and host.timed == 1
    assert doc["advice"].startswith("with --device cpu, --dtype bfloat16: not measured (encode runs on CUDA here)")


def test_plan_reports_units_and_times_only_with_measure(
    app: typer.Typer, runner: CliRunner, host: SimpleNamespace
) -> None:
    args = ["plan", IMAGE, "--model", MODEL]
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and host.timed == 0
    notes = [line for line in table.stderr.splitlines() if "bf16" in line]
    assert notes == [
        "note: this CPU has bf16 matrix units (AMX-BF16 + AVX512-BF16): --dtype bfloat16: not measured (plan "
        "--measure or phi3embed info times it); usually faster on these units, outputs within per-token cosine "
        f"{BF16_MIN_COSINE} of float32 (tested); the default stays float32"
    ]
    as_json = runner.invoke(app, [*args, "--json"])
    doc = json.loads(as_json.stdout)
    assert as_json.stderr == "" and list(doc) == ["settings", "images", "totals", "cpu"]  # people read the JSON
    assert doc["cpu"]["label"] == "AMX-BF16 + AVX512-BF16" and doc["cpu"]["bfloat16"] is None and host.timed == 0
    measured = runner.invoke(app, [*args, "--measure"])
    assert "note: this CPU has bf16 matrix units (AMX-BF16 + AVX512-BF16): --dtype bfloat16: 3.0x faster" in (
        measured.stderr
    )
    whole = runner.invoke(app, [*args, "--json", "--measure"])
    streamed = runner.invoke(app, [*args, "--json", "--measure", "--rows"])
    assert streamed.stdout == whole.stdout and json.loads(whole.stdout)["cpu"]["bfloat16"]["factor"] == 3.0
    assert host.timed == 3
    host.units = NONE  # nothing to tell in the table's notes; the JSON still says what the CPU has
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "bf16" not in table.stderr
    assert json.loads(runner.invoke(app, [*args, "--json"]).stdout)["cpu"]["label"] == "none"
    host.units, host.cuda = AMX, True
    assert "bf16" not in runner.invoke(app, args).stderr  # encode would run on CUDA


# --------------------------------------------------------------------------- the encode summary


def _encode(tmp_path: Path, name: str, *args: str, model: str = MODEL) -> Any:
    env = {"PHI3EMBED_MODEL": None, "HF_HUB_OFFLINE": "1", "COLUMNS": "1000"}  # rows not folded inside words
    result = CliRunner().invoke(
        app_module.app, ["encode", IMAGE, "-o", str(tmp_path / name), "--model", model, *args], env=env
    )
    assert result.exit_code == 0, result.output
    return result


def _bf16_notes(result: Any) -> list[str]:
    """The summary's note rows about bfloat16, joined across the table's wrapping."""
    text = _oneline(result.stderr)
    return [part.split(" time ")[0] for part in text.split(" note ")[1:] if "bf16" in part]


def test_encode_summary_notes_bf16_units_after_a_default_float32_cpu_run(
    tmp_path: Path, host: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = _encode(tmp_path, "a")
    assert "setup cpu float32" in _oneline(short.stderr) and host.timed == 0  # a short job: not timed
    assert _bf16_notes(short) == [
        "this CPU has bf16 matrix units (AMX-BF16 + AVX512-BF16): --dtype bfloat16: not measured (the job took "
        f"under 60 s; phi3embed info --model {MODEL} measures it); usually faster on these units, outputs within "
        f"per-token cosine {BF16_MIN_COSINE} of float32 (tested); the default stays float32"
    ]
    monkeypatch.setattr(app_module, "MEASURE_AFTER_S", 0.0)  # every job is long enough to time
    long = _encode(tmp_path, "b")
    assert host.timed == 1
    assert _bf16_notes(long) == [
        "this CPU has bf16 matrix units (AMX-BF16 + AVX512-BF16): --dtype bfloat16: 3.0x faster per encoder layer "
        f"on this CPU (measured now, 0.75 s), outputs within per-token cosine {BF16_MIN_COSINE} of float32 "
        "(tested); the default stays float32"
    ]


def test_encode_summary_has_no_bf16_note_otherwise(
    tmp_path: Path, host: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "MEASURE_AFTER_S", 0.0)
    chosen = _encode(tmp_path, "bf16", "--dtype", "bfloat16")  # already asked for
    assert "setup cpu bfloat16" in _oneline(chosen.stderr) and _bf16_notes(chosen) == []
    f32 = _encode(tmp_path, "f32", "--dtype", "float32")  # float32 chosen knowingly
    assert "setup cpu float32" in _oneline(f32.stderr) and _bf16_notes(f32) == []
    quiet = _encode(tmp_path, "q", "-q")  # no summary, no note
    assert quiet.stderr == ""
    host.units = NONE
    plain = _encode(tmp_path, "none")
    assert "setup cpu float32" in _oneline(plain.stderr) and _bf16_notes(plain) == []
    assert host.timed == 0


def test_bf16_note_only_for_this_process_on_the_cpu(host: SimpleNamespace) -> None:
    from phi3embed.jobs.core import JobSummary
    from phi3embed.jobs.local import LocalEngine

    opts = SimpleNamespace(dtype="auto", model=MODEL)
    summary = JobSummary(listed=1, ok=1, wall_s=1.0)
    info = SimpleNamespace(device="cpu", compute_dtype=torch.float32)
    vision, _ = resolve_configs(str(GOLDEN / "checkpoints" / TINY_128K))
    local = object.__new__(LocalEngine)  # the checks read only its info and its embedder's config
    local.info = info
    local.embedder = SimpleNamespace(vision_config=vision)
    assert app_module._bf16_note(local, opts, summary) is not None
    ray = SimpleNamespace(info=info)  # Ray's actors may run on other CPUs
    assert app_module._bf16_note(ray, opts, summary) is None
    local.info = SimpleNamespace(device="cuda:0", compute_dtype=torch.float32)
    assert app_module._bf16_note(local, opts, summary) is None
    local.info = info
    stopped = JobSummary(listed=1, ok=0, wall_s=1.0, interrupted="SIGINT")
    assert app_module._bf16_note(local, opts, stopped) is None
    nothing = JobSummary(listed=1, skipped=1, wall_s=0.1)  # everything was already done
    assert app_module._bf16_note(local, opts, nothing) is None
    assert host.timed == 0
