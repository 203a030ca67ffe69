"""Names the file system or a format cannot hold (issue 17 item 1): the storable output names and pack keys of
phi3embed.outputs.names, manifest lines that stay valid UTF-8 JSON, and a seeded property test from listing to
reading back: random byte strings as file names, tar member names and parquet keys, each written by both
writers, and every output read with the ordinary readers (json, numpy.load, safetensors) and phi3embed.open.
"""

from __future__ import annotations

import base64
import json
import os
import random
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from archivefiles import TINY, make_parquet
from namegen import has_image_extension, loose_names, member_names, parquet_keys
from safetensors import safe_open
from safetensors.torch import load_file

import phi3embed
from phi3embed.inputs.listing import Source, list_inputs, read_path_list, select_shard, shard_of
from phi3embed.outputs.combine import check_outputs, write_combined
from phi3embed.outputs.manifest import MANIFEST, iter_manifest
from phi3embed.outputs.names import (
    NAME_MAX,
    PATH_BUDGET,
    exact_bytes,
    from_bytes,
    is_text,
    output_path,
    pack_key,
    unstorable_reason,
)
from phi3embed.outputs.records import ImageFacts, OutputSettings, Record, error_record, exact_field
from phi3embed.outputs.store import OutputStore

LATIN1 = os.fsdecode(b"caf\xe9.png")  # what os.listdir gives for a Latin-1 file name


def settings(fmt: str = "npy") -> OutputSettings:
    return OutputSettings(
        model="tiny",
        fingerprint="f" * 32,
        num_crops=4,
        dtype=torch.float32,
        compute_dtype=torch.float32,
        format=fmt,  # type: ignore[arg-type]
        pack_bytes=2000 if fmt == "pack" else None,
    )


def nbytes(text: str) -> int:
    return len(exact_bytes(text))


# --------------------------------------------------------------------------- the rule


def test_ordinary_names_are_kept_as_they_are() -> None:
    for name in ["a.jpg", "sub/dir/b c.png", "日本/写真.jpg", "x" * 251 + ".png", "a~b.png", "emoji 😀.webp"]:
        assert output_path(name, ".npy") == name + ".npy" or nbytes(name) + 4 > NAME_MAX
        assert pack_key(name) == name
    assert output_path("x" * 251, ".npy") == "x" * 251 + ".npy"  # exactly 255 bytes: fits


def test_a_component_past_255_bytes_is_shortened_with_a_hash_and_keeps_its_extension() -> None:
    long = "x" * 250 + ".png"  # 254 bytes: fits alone, not with .npy
    out = output_path(f"d/{long}", ".npy")
    assert out.startswith("d/xxx") and out.endswith(".png.npy") and "~" in out
    assert nbytes(out.split("/")[-1]) <= NAME_MAX
    assert output_path(f"d/{long}", ".npy") == out  # deterministic
    assert output_path(f"d/{long}", ".safetensors") != out and unstorable_reason(f"d/{long}", ".npy")
    assert output_path(long, ".npy").split("~")[1] == out.split("~")[1]  # the hash is of the component
    # multi-byte characters are never cut in half
    accents = "é" * 200 + ".jpg"
    assert is_text(output_path(accents, ".safetensors")) and nbytes(output_path(accents, ".safetensors")) <= 255
    # long folders too; files in one long folder stay together
    a, b = output_path("F" * 300 + "/a.png", ".npy"), output_path("F" * 300 + "/b.png", ".npy")
    assert a.split("/")[0] == b.split("/")[0] != "F" * 300 and a.endswith("/a.png.npy")


def test_names_not_utf8_and_control_characters_get_clean_utf8_outputs() -> None:
    out = output_path(LATIN1, ".npy")
    assert out.startswith("caf_~") and out.endswith(".png.npy") and is_text(out)
    assert unstorable_reason(LATIN1, ".npy") == "not valid UTF-8"
    for name in ["new\nline.png", "tab\t.png", "nul\0.png", "esc\x1b[31m.png", "del\x7f.png"]:
        out = output_path(name, ".npy")
        assert out != name + ".npy" and not any(c < " " or c == "\x7f" for c in out), out
        assert unstorable_reason(name, ".npy") == "control characters"
    key = pack_key(LATIN1)
    assert key.startswith("caf\\xe9.png~") and is_text(key) and unstorable_reason(LATIN1, None) == "not valid UTF-8"
    assert pack_key("nul\0.png") == "nul\0.png"  # a pack key may hold any text


def test_paths_past_the_budget_keep_their_leading_folders_and_fold_the_rest() -> None:
    name = "/".join(f"{i:02d}" + "d" * 240 for i in range(14)) + "/leaf.png"  # ~3400 bytes, every part fits
    out = output_path(name, ".npy")
    assert nbytes(out) <= PATH_BUDGET and all(nbytes(p) <= NAME_MAX for p in out.split("/"))
    kept = out.split("/")[:-1]
    assert kept == name.split("/")[: len(kept)] and len(kept) >= 10
    assert unstorable_reason(name, ".npy") == f"longer than {PATH_BUDGET} bytes"
    other = name.replace("leaf", "leaf2")
    assert output_path(other, ".npy") != out


def test_a_real_name_never_takes_a_shortened_name() -> None:
    long = "p" * 300 + ".png"
    taken = output_path(long, ".npy").removesuffix(".npy")  # a real file named like the shortened one
    assert output_path(taken, ".npy") != taken + ".npy" and output_path(taken, ".npy") != output_path(long, ".npy")
    assert unstorable_reason(taken, ".npy") == "ends like a hash"
    key = pack_key(LATIN1)
    assert pack_key(key) != key


def test_mapping_is_collision_free_on_random_names() -> None:
    rng = random.Random(17)
    names = {from_bytes(n) for n in loose_names(3, 300)} | {from_bytes(n) for n in member_names(4, 300)}
    names = {n for n in names if not n.startswith("../")}  # refused, not renamed (test_writers)
    names |= {"p" * 300 + f"{i}.png" for i in range(20)}  # same long prefix
    names |= {output_path(n, ".npy").removesuffix(".npy") for n in list(names)[:50]}  # outputs as real names
    rng.shuffle(names_list := sorted(names))
    for suffix in (".npy", ".safetensors"):
        outs = [output_path(n, suffix) for n in names_list]
        assert len(set(outs)) == len(outs)
        for out in outs:
            assert is_text(out) and nbytes(out) <= PATH_BUDGET
            assert all(0 < nbytes(p) <= NAME_MAX and p not in (".", "..") for p in out.split("/"))
    keys = [pack_key(n) for n in names_list]
    assert len(set(keys)) == len(keys) and all(is_text(k) for k in keys)


# --------------------------------------------------------------------------- records and JSON


def _record(name: str, **over: Any) -> Record:
    rec = error_record(settings(), Source(name, f"in/{name}", "in"), f"in/{name}: broken")
    return Record(**{**rec.to_json(), **over}) if over else rec


def test_manifest_lines_are_valid_utf8_and_keep_the_exact_bytes() -> None:
    rec = _record(LATIN1)
    data = rec.to_json()
    assert data["name"] == "caf\\xe9.png" and data["source"] == "in/caf\\xe9.png"
    assert base64.b64decode(data["raw"]["name"]) == b"caf\xe9.png"
    line = json.dumps(data, ensure_ascii=False).encode("utf-8")  # strict: a lone surrogate would raise here
    back = Record.from_json(json.loads(line.decode("utf-8")))
    assert back == rec and back is not None and back.name == LATIN1
    assert "raw" not in _record("ok.png").to_json()  # ordinary names: the same bytes as before


def test_a_manifest_an_older_version_wrote_with_lone_surrogates_still_opens(tmp_path: Path) -> None:
    out = tmp_path / "old"
    out.mkdir()
    np.save(os.path.join(out, LATIN1 + ".npy"), np.ones((2, 3), np.float32))
    line = {"name": LATIN1, "status": "ok", "output": LATIN1 + ".npy", "key": None}
    (out / MANIFEST).write_text(json.dumps(line) + "\n")  # json.dumps writes the surrogate as \udce9
    store = phi3embed.open(out)
    assert list(store) == [LATIN1] and store[LATIN1].shape == (2, 3) and store[b"caf\xe9.png"].shape == (2, 3)


def test_stdin_lists_paths_that_are_not_utf8(tmp_path: Path) -> None:
    import io

    (tmp_path / os.fsdecode(b"\xe9t\xe9.png")).write_bytes(TINY)
    assert read_path_list(io.BytesIO(b"\xe9t\xe9.png\n\n")) == [os.fsdecode(b"\xe9t\xe9.png")]
    sources = list_inputs(["-"], stdin=io.BytesIO(b"\xe9t\xe9.png\n"), cwd=str(tmp_path)).sources  # type: ignore[arg-type]
    assert [s.name for s in sources] == [os.fsdecode(b"\xe9t\xe9.png")]


# --------------------------------------------------------------------------- the property test


def _tree(root: Path, names: list[bytes]) -> None:
    for raw in names:
        path = os.path.join(os.fsencode(root), raw)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(TINY)


def _tar(path: Path, names: list[bytes], *, fmt: int) -> None:
    with tarfile.open(path, "w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        for raw in names:
            import io

            info = tarfile.TarInfo(os.fsdecode(raw))
            info.size = len(TINY)
            tf.addfile(info, io.BytesIO(TINY))


def _inputs(root: Path, seed: int, n: int) -> tuple[list[str], dict[str, str]]:
    """A folder, two tar files (pax and GNU headers) and two parquet files (string and binary keys) of random
    names; returns the INPUTs and the name -> "ok"/"error" every listed image must end with."""
    expected: dict[str, str] = {}
    files = loose_names(seed, n)
    _tree(root / "imgs", files)
    expected |= {os.fsdecode(f): "ok" for f in files}
    for tar_name, fmt in (("pax.tar", tarfile.PAX_FORMAT), ("gnu.tar", tarfile.GNU_FORMAT)):
        members = member_names(seed + fmt, n)
        _tar(root / tar_name, members, fmt=fmt)
        for raw in members:
            if has_image_extension(raw):
                text = os.fsdecode(raw)
                expected[f"{tar_name}/{text}"] = "error" if text.startswith("../") else "ok"
    keys = parquet_keys(seed, n)
    text_keys = [from_bytes(k) for k in keys if is_text(from_bytes(k))]
    make_parquet(root / "text.parquet", {"key": text_keys, "image": [TINY] * len(text_keys)}, row_group_size=7)
    make_parquet(root / "binary.parquet", {"__key__": keys, "image": [TINY] * len(keys)}, row_group_size=5)
    from phi3embed.inputs.archives import safe_inner

    expected |= {f"text.parquet/{safe_inner(k)}": "ok" for k in text_keys}
    expected |= {f"binary.parquet/{safe_inner(from_bytes(k))}": "ok" for k in keys}
    return ["imgs", "pax.tar", "gnu.tar", "text.parquet", "binary.parquet"], expected


def _tensor(name: str) -> torch.Tensor:
    seed = int.from_bytes(exact_bytes(name)[:8].ljust(8, b"\0"), "little") % (2**31)
    return torch.randn((3, 4), generator=torch.Generator().manual_seed(seed))


def assert_readable(out: Path, expected: dict[str, str], tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Every manifest line strict UTF-8 JSON; one latest record per expected name with the expected status; every
    ok output read by numpy / safetensors and by phi3embed.open, equal to ``tensors`` when given."""
    raw = (out / MANIFEST).read_bytes()
    latest: dict[str, Record] = {}
    for line in raw.decode("utf-8").splitlines():  # strict UTF-8
        data = json.loads(line)
        for value in [data, *data.values()]:
            assert not isinstance(value, str) or is_text(value), value  # no lone surrogate escape
        record = Record.from_json(data)
        assert record is not None
        latest[record.name] = record
    assert {n: r.status for n, r in latest.items()} == expected
    store = phi3embed.open(out)
    assert sorted(store, key=exact_bytes) == sorted((n for n, s in expected.items() if s == "ok"), key=exact_bytes)
    packs: dict[str, dict[str, torch.Tensor]] = {}
    for name, record in latest.items():
        if not record.ok:
            continue
        assert record.output is not None and is_text(record.output) and is_text(record.key or "")
        assert all(len(p.encode()) <= NAME_MAX for p in record.output.split("/"))
        path = out / record.output
        if record.output.endswith(".npy"):
            plain = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            if record.output not in packs:
                packs[record.output] = load_file(path)
                with safe_open(str(path), framework="pt") as fh:
                    assert set(fh.keys()) == set(packs[record.output])
                    meta = fh.metadata() or {}
                    if "records" in meta:
                        names = {Record.from_json(d).name for d in json.loads(meta["records"])}  # type: ignore[union-attr]
                        assert name in names or record.duplicate_of is not None
            plain = packs[record.output][record.key or ""]
        torch.testing.assert_close(store[name], plain, rtol=0, atol=0)
        torch.testing.assert_close(store[exact_bytes(name)], plain, rtol=0, atol=0)
        assert store.record(name).name == name
        if tensors is not None:
            torch.testing.assert_close(plain, tensors[name], rtol=0, atol=0)


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("fmt", ["npy", "safetensors", "pack"])
def test_random_byte_names_from_listing_to_reading_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, fmt: str
) -> None:
    """Random names as file names, tar member names and parquet keys: listed, written (a few as duplicates of
    another), read back with the ordinary readers; reopened, every image is done (resume); two --shard parts
    combine to the whole."""
    monkeypatch.chdir(tmp_path)  # resume compares each source's stat, by the path as listed
    inputs, expected = _inputs(tmp_path, seed, 14)
    sources = list_inputs(inputs).sources
    assert sorted((s.name for s in sources), key=exact_bytes) == sorted(expected, key=exact_bytes)
    tensors: dict[str, torch.Tensor] = {}
    sha256: dict[str, str] = {}
    for part in range(2):  # two --shard parts in one DIR, as a job array writes them
        part_sources = select_shard(sources, part, 2)
        assert all(shard_of(s.group, 2) == part for s in part_sources)
        with OutputStore(tmp_path / "out", settings(fmt), shard=(part, 2)) as store:
            firsts: list[Source] = []
            for i, src in enumerate(part_sources):
                st = os.stat(src.path)
                facts = ImageFacts(f"{part}{i:063x}", st.st_size, st.st_mtime_ns, 7, 9, (336, 336), (1, 1), 3)
                if src.member is not None and src.member.error:
                    store.write_error(src, f"{src.label}: {src.member.error}", facts)
                elif firsts and i % 5 == 0:  # a duplicate: shares an earlier image's output under its own name
                    first = firsts[-1]
                    store.write_duplicate(src, replace(facts, sha256=sha256[first.name]), first.name)
                    tensors[src.name] = tensors[first.name]
                else:
                    sha256[src.name] = str(facts.sha256)
                    tensors[src.name] = _tensor(src.name)
                    store.write(src, facts, tensors[src.name])
                    firsts.append(src)
    assert_readable(tmp_path / "out", expected, tensors)
    if fmt != "pack":  # outputs follow from the names: no path kept per image, renamed or not
        assert len(phi3embed.open(tmp_path / "out")._files) == 2
    for part in range(2):
        with OutputStore(tmp_path / "out", settings(fmt), shard=(part, 2)) as store:
            for src in select_shard(sources, part, 2):
                assert store.is_done(src) == (expected[src.name] == "ok"), src.name
    report = check_outputs([tmp_path / "out"], sources)
    assert not report.missing and sorted(report.failed) == sorted(n for n, s in expected.items() if s == "error")
    write_combined(report, tmp_path / "all.jsonl")
    assert all(line.decode("utf-8") for line in (tmp_path / "all.jsonl").read_bytes().splitlines())
    combined = phi3embed.open(tmp_path / "all.jsonl")
    assert len(combined) == sum(s == "ok" for s in expected.values())
    for name in combined:
        torch.testing.assert_close(combined[name], tensors[name], rtol=0, atol=0)
    assert {r.name for r in iter_manifest(tmp_path / "all.jsonl")} == set(expected)


def test_a_file_system_that_refuses_a_name_costs_one_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name the file system still refuses (a smaller name limit, a DIR path past 1023 bytes): an error record
    for that image, the others written."""
    import errno

    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if "refused" in os.fsdecode(dst):
            raise OSError(errno.ENAMETOOLONG, "File name too long", src, None, dst)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with OutputStore(tmp_path / "out", settings()) as store:
        for i, name in enumerate(["a.png", "refused.png", "b.png"]):
            rec = store.write(Source(name, name, ""), ImageFacts(), _tensor(name) + i)
            assert rec.ok == (name != "refused.png")
            if not rec.ok:
                assert rec.error == "refused.png.npy: the file system cannot hold this output name: File name too long"
    assert sorted(phi3embed.open(tmp_path / "out")) == ["a.png", "b.png"]


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "pack"])
def test_plan_names_each_output_and_notes_the_renamed(app: Any, runner: Any, tmp_path: Path, fmt: str) -> None:
    names = [b"ok.png", b"caf\xe9.png", b"y" * 251 + b".png", b"tab\t.png"]
    _tree(tmp_path / "imgs", names)
    args = ["plan", str(tmp_path / "imgs"), "--num-crops", "4", "--format", fmt]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout_bytes.decode("utf-8"))  # strict UTF-8
    rows = {exact_field(r, "name"): r for r in doc["images"]}  # exact bytes from raw, as in the manifest
    suffix = None if fmt == "pack" else f".{fmt}"
    for raw in names:
        name, row = os.fsdecode(raw), rows[os.fsdecode(raw)]
        assert row["renamed"] == unstorable_reason(name, suffix)
        if suffix is None:
            assert row["key"] == pack_key(name) and row["output"] is None
        else:
            assert row["output"] == output_path(name, suffix) and row["key"] is None
    renamed = [n for n in names if unstorable_reason(os.fsdecode(n), suffix)]
    assert doc["totals"]["renamed"] == len(renamed) == (1 if fmt == "pack" else 3)
    table = runner.invoke(app, args)
    assert table.exit_code == 0 and "caf\\xe9.png" in table.stdout and "tab\\x09.png" in table.stdout
    note = [line for line in table.stderr.splitlines() if not line.startswith("note: this CPU")]  # bf16 advice
    assert note[0].startswith(f"note: {len(renamed)} image") and len(note) == 1 + len(renamed)
    assert (
        "caf\\xe9.png (not valid UTF-8) -> "
        + ("pack key caf\\xe9.png~" if fmt == "pack" else output_path(LATIN1, str(suffix)))
        in table.stderr
    )
