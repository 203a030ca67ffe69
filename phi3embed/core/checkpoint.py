"""Find a checkpoint and read ONLY the tensors the image path needs.

A checkpoint is a directory in Hugging Face layout (``config.json``, optional ``preprocessor_config.json``,
``model.safetensors`` or the weight files listed in ``model.safetensors.index.json``), or a hub id found by
:mod:`phi3embed.core.hub` (the Hugging Face cache, the phi3embed cache of vision-only checkpoints, or a fetch
of only the needed tensors' bytes; ``HF_HUB_OFFLINE=1`` respected). :func:`resolve` indexes the vision
tensors; :func:`resolve_configs` stops at the config files (``plan``, ``preview``: no weights at all).

Which tensors are read is :mod:`phi3embed.core.layout`'s (the vision tensors, never the ``wte`` alias of the
text table). :func:`locate` is the one place a model source (folder, preset name, hub id) is turned into
where its checkpoint lies; ``resolve``, ``info`` and ``download`` all go through it.

safetensors headers are parsed by :mod:`phi3embed.core.safetensors_io` and tensors read by positioned reads:
language-model tensors are never read, mapped or materialised, so a 4.2B-parameter checkpoint costs only its
~0.3B vision parameters.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phi3embed.core import hub
from phi3embed.core.config import PreprocessConfig, VisionConfig, find_preset, parse_configs, read_json
from phi3embed.core.layout import INDEX_FILE, SINGLE_FILE, VISION_PREFIX, is_vision_key, select_keys
from phi3embed.core.safetensors_io import SafetensorsFormatError, TensorInfo, read_header
from phi3embed.errors import CheckpointError, ConfigError

CLIP_PREFIX = VISION_PREFIX + "img_processor.vision_model."


@dataclass
class Checkpoint:
    """A resolved checkpoint: where it lives, its configs, and where every tensor is."""

    source: str  # what the user asked for (path or hub id)
    root: Path
    config: dict[str, Any]
    preprocessor_config: dict[str, Any] | None
    weight_files: list[Path]
    tensors: dict[str, TensorInfo] = field(repr=False)
    from_hub: bool = False
    bytes_read: int = 0  # tensor payload bytes read so far (tests and `info` use it)
    commit: str | None = None  # of a hub id
    location: str = "local directory"  # or "hub cache" (Hugging Face's), "phi3embed cache", "hub" (not fetched)
    plan: hub.FetchPlan | None = field(default=None, repr=False)  # what was (or, "hub", would be) fetched

    def vision_keys(self) -> list[str]:
        return sorted(k for k in self.tensors if is_vision_key(k))

    @property
    def stored_dtypes(self) -> set[str]:
        return {self.tensors[k].dtype for k in self.vision_keys()}

    def read(
        self,
        keys: Iterable[str],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        hash_keys: set[str] | None = None,
        hasher: Any | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read exactly ``keys`` (positioned reads, one tensor at a time), cast to ``dtype`` on ``device``.

        Stored bytes of the keys in ``hash_keys`` are fed to ``hasher`` (in file order, key first).

        Memory: a tensor that needs no cast on the CPU is read straight into its final storage; otherwise
        its stored bytes go into one scratch buffer, reused for every tensor, and are cast from there into
        the final tensor. So loading costs the final weights plus one tensor's stored bytes, and no
        short-lived allocation per tensor is left behind for the allocator to hold on to.
        """
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            if key not in self.tensors:
                raise CheckpointError(f"tensor {key} is not in the checkpoint", path=self.root)
            by_file.setdefault(self.tensors[key].file, []).append(key)
        device = torch.device(device)
        scratch_size = max((self.tensors[k].nbytes for ks in by_file.values() for k in ks), default=0)
        scratch = torch.empty(scratch_size, dtype=torch.uint8)
        for path, file_keys in by_file.items():
            file_keys.sort(key=lambda k: self.tensors[k].start)
            try:
                fh = open(path, "rb", buffering=0)
            except OSError as exc:
                raise CheckpointError(f"cannot open weights: {exc.strerror or exc}", path=path) from None
            with fh:
                for key in file_keys:
                    info = self.tensors[key]
                    stored = info.torch_dtype  # the header parser checked that shape and dtype fill nbytes
                    target = dtype if dtype is not None and stored.is_floating_point else stored
                    # Read into the final tensor when nothing is to be done to it, else into the scratch.
                    dest = torch.empty(info.shape, dtype=stored) if device.type == "cpu" and target == stored else None
                    raw = dest.view(-1).view(torch.uint8) if dest is not None else scratch[: info.nbytes]
                    fh.seek(info.start)
                    view = raw.numpy().data  # writable buffer over the tensor's memory
                    got = fh.readinto(view)
                    if got != info.nbytes:
                        raise CheckpointError(
                            f"tensor {key} is truncated: expected {info.nbytes} bytes, read {got}", path=path
                        )
                    self.bytes_read += got
                    if hasher is not None and (hash_keys is None or key in hash_keys):
                        hasher.update(f"{key}|{info.dtype}|{list(info.shape)}".encode())
                        hasher.update(view)
                    if dest is None:
                        src = raw.view(stored).reshape(info.shape)
                        if device.type == "cpu":
                            dest = torch.empty(info.shape, dtype=target)
                            dest.copy_(src)  # cast straight into the final storage
                        else:  # copy the stored bytes (smaller) to the device, cast there
                            dest = src.to(device).to(target)
                    out[key] = dest
        return out


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a local weight file's safetensors header (never reads tensor data)."""
    try:
        return read_header(path).tensors
    except SafetensorsFormatError as exc:
        raise CheckpointError(exc.reason, path=path) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read weights: {exc.strerror or exc}", path=path) from None


def _weight_map(root: Path) -> dict[str, str] | None:
    """key -> weight file name from the index, or None for a single-file checkpoint."""
    index_path = root / INDEX_FILE
    if not index_path.exists():
        return None
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError("index has no weight_map", path=index_path)
    return {str(k): str(v) for k, v in weight_map.items()}


def _refuse_pickles(root: Path) -> None:
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"only pickle weights found ({', '.join(pickles[:3])}); phi3embed reads safetensors only, because "
            "loading pickles can run arbitrary code. Convert the checkpoint to safetensors first",
            path=root,
        )
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} found", path=root)


def _index_local(root: Path, select: Callable[[Iterable[str]], set[str]]) -> tuple[list[Path], dict[str, TensorInfo]]:
    """The weight files holding the selected keys, and where each selected tensor lies."""
    weight_map = _weight_map(root)
    if weight_map is None:
        single = root / SINGLE_FILE
        if not single.exists():
            _refuse_pickles(root)
        files = [single]
    else:
        chosen = select(weight_map)
        names = sorted({f for k, f in weight_map.items() if k in chosen})
        files = [root / n for n in names]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"weight file {f.name} listed in {INDEX_FILE} is missing", path=root)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for key, info in read_safetensors_header(f).items():
            if key in tensors:
                raise CheckpointError(f"tensor {key} is stored twice ({tensors[key].file.name}, {f.name})", path=f)
            tensors[key] = info
    if weight_map is not None:
        for key in chosen:
            fname = weight_map[key]
            if key not in tensors or tensors[key].file.name != fname:
                raise CheckpointError(f"tensor {key} is listed in {INDEX_FILE} but not stored in {fname}", path=root)
    chosen = select(tensors)
    return files, {k: v for k, v in tensors.items() if k in chosen}


def locate(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    vision: bool = True,
    text: bool = False,
    cache_dir: str | None = None,
    fetch: bool = True,
) -> Path | hub.HubModel:
    """Where the checkpoint ``source`` names lies: a local folder, or a hub model (a hub id, or a preset name
    standing for its hub id) at ``revision``, found by :func:`phi3embed.core.hub.locate` in the Hugging Face
    cache or the phi3embed cache, else fetched (only the wanted tensors' bytes) or, with ``fetch=False``, only
    planned. ``cache_dir`` is the Hugging Face cache to use (default: huggingface_hub's)."""
    found = _folder_or_hub_id(os.fspath(source))
    if isinstance(found, Path):
        return found
    return hub.locate(found, revision=revision, vision=vision, text=text, cache_dir=cache_dir, fetch=fetch)


def _folder_or_hub_id(text: str) -> Path | str:
    """A checkpoint directory, or the hub id to fetch (a preset name stands for its hub id)."""
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError("expected a checkpoint directory, got a file", path=path)
    preset = find_preset(text)
    repo_id = preset.hub_id if preset else text
    if repo_id.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError("no such checkpoint directory, and not a hub id (owner/name) or preset name", path=text)
    return repo_id


def resolve(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    with_text_embeddings: bool = False,
    with_vision: bool = True,
    cache_dir: str | None = None,
    fetch: bool = True,
) -> Checkpoint:
    """Find a checkpoint (:func:`locate`) and index its vision tensors (``with_vision``) and/or its
    token-embedding table (``with_text_embeddings``).

    With ``fetch=False`` a hub model that is in no cache is not fetched: its tensors are indexed from the
    weight files' headers (read by range requests), ``location`` is ``"hub"``, ``plan`` says what a fetch
    would read, and the tensors cannot be read (``info``).
    """

    def select(keys: Iterable[str]) -> set[str]:
        return select_keys(keys, vision=with_vision, text=with_text_embeddings)

    text = os.fspath(source)
    found = locate(
        text, revision=revision, vision=with_vision, text=with_text_embeddings, cache_dir=cache_dir, fetch=fetch
    )
    if isinstance(found, Path):
        return open_checkpoint(text, [found], select)
    if found.roots:
        return open_checkpoint(text, found.roots, select, commit=found.commit, location=found.location, plan=found.plan)
    plan = found.plan
    assert plan is not None  # not cached and not fetched: the plan is what is known
    config, preprocessor = _read_configs(found.config_dir)
    return Checkpoint(
        source=text,
        root=found.config_dir,
        config=config,
        preprocessor_config=preprocessor,
        weight_files=[Path(f.name) for f in plan.files],
        tensors={k: info for f in plan.files for k, info in f.tensors.items() if k in select(f.tensors)},
        from_hub=True,
        commit=found.commit,
        location=found.location,
        plan=plan,
    )


def _read_configs(root: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    pre_path = root / "preprocessor_config.json"
    return read_json(root / "config.json"), read_json(pre_path) if pre_path.exists() else None


def open_checkpoint(
    source: str,
    roots: list[Path],
    select: Callable[[Iterable[str]], set[str]],
    *,
    commit: str | None = None,
    location: str = "local directory",
    plan: hub.FetchPlan | None = None,
) -> Checkpoint:
    """Index the selected tensors of checkpoint folders (one, or a vision and a text cache entry)."""
    root = roots[0]
    config, preprocessor = _read_configs(root)
    files: list[Path] = []
    tensors: dict[str, TensorInfo] = {}
    for part_root in roots:
        part_files, part_tensors = _index_local(part_root, select)
        files += [f for f in part_files if f not in files]
        tensors.update(part_tensors)
    return Checkpoint(
        source=source,
        root=root,
        config=config,
        preprocessor_config=preprocessor,
        weight_files=files,
        tensors=tensors,
        from_hub=commit is not None,
        commit=commit,
        location=location,
        plan=plan,
    )


def resolve_configs(
    source: str | os.PathLike[str], *, revision: str | None = None, cache_dir: str | None = None
) -> tuple[VisionConfig, PreprocessConfig]:
    """The vision and preprocessor configs of a checkpoint, from its config files only (never its weights).

    Found as :func:`resolve` finds the checkpoint, except that a preset name or a preset's hub id (at the
    default revision) uses the configs shipped with the preset, which are copies of the hub's: no network.
    """
    text = os.fspath(source)
    found = _folder_or_hub_id(text)
    preset = find_preset(text) if isinstance(found, str) and revision is None else None
    if preset is not None:
        return parse_configs(preset.config, preset.preprocessor_config, where=f"preset {preset.name}")
    root = found if isinstance(found, Path) else hub.locate_configs(found, revision=revision, cache_dir=cache_dir)
    config, preprocessor = _read_configs(root)
    return parse_configs(config, preprocessor, where=str(root / "config.json"))


# --------------------------------------------------------------------------- key mapping


def checkpoint_to_module_key(key: str, *, clip_prefix: str) -> str | None:
    """Map a checkpoint key to our module's state-dict key, or None when it is not a vision tensor.

    ``clip_prefix`` is where the installed transformers' CLIPVisionModel keeps its layers relative to our
    ``clip`` attribute: ``"clip.vision_model."`` (transformers 4.x) or ``"clip."`` (5.x, no extra level).
    """
    if key.startswith(CLIP_PREFIX):
        return clip_prefix + key[len(CLIP_PREFIX) :]
    if key.startswith(VISION_PREFIX):
        rest = key[len(VISION_PREFIX) :]
        if rest.startswith("img_processor."):
            return None  # a CLIP key outside vision_model: reported as unexpected by the caller
        return rest
    return None


def module_to_checkpoint_key(name: str, *, clip_prefix: str) -> str:
    """Inverse of :func:`checkpoint_to_module_key`."""
    if name.startswith(clip_prefix):
        return CLIP_PREFIX + name[len(clip_prefix) :]
    return VISION_PREFIX + name


def check_vision_tensors(ckpt: Checkpoint, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Strict check of checkpoint vision tensors against ``expected`` (checkpoint key -> shape)."""
    present = {k: ckpt.tensors[k].shape for k in ckpt.vision_keys()}
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    misshaped = sorted(
        f"{k} (checkpoint {list(present[k])}, model {list(expected[k])})"
        for k in set(expected) & set(present)
        if tuple(present[k]) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(
            f"unexpected {len(unexpected)}: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
        )
    if misshaped:
        problems.append(f"wrong shape: {'; '.join(misshaped[:5])}{' ...' if len(misshaped) > 5 else ''}")
    if problems:
        raise CheckpointError("vision tensors do not match config.json: " + " | ".join(problems), path=ckpt.root)


def new_hasher() -> Any:
    return hashlib.blake2b(digest_size=16)


def ensure_config(ckpt: Checkpoint) -> None:
    if "embd_layer" not in ckpt.config and "img_processor" not in ckpt.config:
        raise ConfigError("config.json describes no vision embedding (no embd_layer / img_processor)", path=ckpt.root)
