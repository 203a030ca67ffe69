"""The ``phi3embed`` command: Typer commands, thin over the library.

stdout carries only machine output (``--jsonl`` records); people read stderr. Heavy modules (torch,
transformers) are imported inside the commands, so ``--help`` and usage errors are instant.

Exit codes of ``encode``: 0 every image done; 1 some images failed (each has an error record and a line on
stderr); 2 usage, input, model, checkpoint or output-directory errors (reported before any work starts),
or the job stopped on out of memory / a failing output directory (finished outputs are kept);
130 stopped by Ctrl-C (SIGINT), 143 stopped by SIGTERM (finished outputs are kept; rerun to resume).
"""

# No ``from __future__ import annotations``: Typer reads the annotations at runtime.

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from phi3embed.cli.combine import register as register_shard_commands
from phi3embed.cli.inspect_commands import DEFAULT_MODEL, MODEL_ENV, Alpha
from phi3embed.cli.inspect_commands import register as register_inspect_commands
from phi3embed.core.config import DEFAULT_BATCH_SIZE, default_workers, usable_cpus

app = typer.Typer(
    name="phi3embed",
    help="Images -> the exact image-token embeddings Phi-3-vision / Phi-3.5-vision feed their language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# the inspection commands (plan, preview, info) and merge-manifests live in their own modules
register_inspect_commands(app)
register_shard_commands(app)


@app.callback()
def _root() -> None:
    """Images -> the exact image-token embeddings Phi-3-vision / Phi-3.5-vision feed their language model."""


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Format(str, Enum):
    npy = "npy"
    safetensors = "safetensors"


class Engine(str, Enum):
    local = "local"
    ray = "ray"


class _Usage(Exception):
    """A problem found before any work starts: one line on stderr, exit code 2."""


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip


def parse_size(text: str) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 2**29, ``"123"`` -> 123 bytes (for ``--pack``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise _Usage(f"--pack SIZE must look like 500MB, 1GB or 2GiB, got {text!r}")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value < 1:
        raise _Usage(f"--pack SIZE must be at least 1 byte, got {text!r}")
    return value


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


ENCODE_HELP = """Encode images into Phi-3-vision image-token embeddings.

INPUT: image files, directories (recursed; images found by extension or content), glob patterns (quote them: 'imgs/**/*.jpg'), or - to read newline-separated paths from stdin.

Output: DIR/<path relative to its input root>.<format>, e.g. imgs/a/b.jpg -> DIR/a/b.jpg.npy, holding one num_tokens x hidden array (safetensors: key image_embeds). With --pack: numbered shards DIR/emb-00000.safetensors, one tensor per image. DIR/manifest.jsonl gets one JSON record per image and attempt. Rerunning the same command skips finished images (--overwrite redoes them).

Exit codes: 0 all images done; 1 some images failed (see the error records); 2 usage, model, checkpoint or output-directory problems, or out of memory; 130 Ctrl-C; 143 SIGTERM. Finished outputs are always kept.
"""


@app.command("encode", help=ENCODE_HELP, no_args_is_help=True)
def encode_command(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT...", help="Files, directories, globs or - for stdin.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Output directory (created).")],
    model: Annotated[
        str,
        typer.Option(envvar=MODEL_ENV, help="Checkpoint: local directory, hub id or preset name.", show_envvar=True),
    ] = DEFAULT_MODEL,
    num_crops: Annotated[
        int | None, typer.Option(min=1, help="Max 336 px crops per image (default: the checkpoint's).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[DType, typer.Option(help="Compute dtype (auto: float32 on CPU, bfloat16 on CUDA).")] = DType.auto,
    out_dtype: Annotated[
        DType,
        typer.Option(
            help="Stored dtype (auto: float32 on CPU, the compute dtype on CUDA; npy cannot hold bfloat16, "
            "so auto stores float32 there)."
        ),
    ] = DType.auto,
    format: Annotated[
        Format | None, typer.Option("--format", help="One file per image: npy (default) or safetensors.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, help="Crops per forward pass (default 4 on CPU, 32 on CUDA).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Processes that read and tile images (default 0 = inline on CPU; on CUDA all cores but one, up to 32).",
        ),
    ] = None,
    exif_transpose: Annotated[
        bool, typer.Option("--exif-transpose", help="Apply EXIF orientation first (the reference ignores it).")
    ] = False,
    alpha: Annotated[
        Alpha, typer.Option(help="Transparency: drop (reference, transformers 4) or white (composite on white).")
    ] = Alpha.drop,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Encode again images already done.")] = False,
    shard: Annotated[
        str | None,
        typer.Option(metavar="I/N", help="Only shard I of N (0-based), split by a stable hash of each name."),
    ] = None,
    pack: Annotated[
        str | None,
        typer.Option(
            metavar="SIZE", help="Write safetensors shards of about SIZE (e.g. 1GB) instead of one file per image."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
    jsonl: Annotated[
        bool, typer.Option("--jsonl", help="Print each manifest record to stdout as it is written.")
    ] = False,
    engine: Annotated[
        Engine,
        typer.Option(
            help="local: this process encodes; ray: a Ray Data actor pool (pip install 'phi3embed[ray]'), "
            "on a private local Ray instance or the cluster at --ray-address. Same outputs either way."
        ),
    ] = Engine.local,
    ray_address: Annotated[
        str | None,
        typer.Option(
            envvar="RAY_ADDRESS",
            metavar="ADDR",
            help="--engine ray: connect to this Ray cluster (auto, HOST:PORT or ray://HOST:PORT) "
            "instead of starting a local instance.",
        ),
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(
            min=1, help="--engine ray: encoder actors (default: one per GPU of the cluster; without GPUs one per CPU)."
        ),
    ] = None,
) -> None:
    try:
        options = _options(
            out=out,
            model=model,
            num_crops=num_crops,
            device=device,
            dtype=dtype.value,
            out_dtype=out_dtype.value,
            fmt=format.value if format else None,
            batch_size=batch_size,
            workers=workers,
            exif_transpose=exif_transpose,
            alpha=alpha.value,
            overwrite=overwrite,
            shard=shard,
            pack=pack,
            quiet=quiet,
            jsonl=jsonl,
            engine=engine.value,
            ray_address=ray_address,
            actors=actors,
        )
        code = _encode(inputs, options)
    except _Usage as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:  # before the job started (e.g. while the model loads)
        raise _fail("interrupted", 130) from None
    raise typer.Exit(code)


@dataclass(frozen=True)
class _EncodeOptions:
    """The options of one ``encode`` job, parsed and checked: what both engines and :func:`_run` read."""

    out: Path
    model: str
    num_crops: int | None
    device: str
    dtype: str  # compute dtype name or "auto"
    out_dtype: str  # stored dtype name or "auto"
    fmt: str | None  # --format as given (None: npy, or the shards of --pack)
    batch_size: int | None
    workers: int | None
    exif_transpose: bool
    alpha: str
    overwrite: bool
    shard: str | None  # --shard as given, for messages
    shard_spec: tuple[int, int] | None
    pack_bytes: int | None
    quiet: bool
    jsonl: bool
    engine: str = "local"
    ray_address: str | None = None
    actors: int | None = None

    @property
    def output_format(self) -> str:
        """What the store writes: ``pack`` (shards), else one ``npy`` / ``safetensors`` file per image."""
        return "pack" if self.pack_bytes is not None else (self.fmt or "npy")


def _options(*, shard: str | None, pack: str | None, **options: Any) -> _EncodeOptions:
    """The command's options -> :class:`_EncodeOptions`; an inconsistent combination is a :class:`_Usage`."""
    from phi3embed.errors import Phi3EmbedError
    from phi3embed.inputs.listing import parse_shard

    try:
        shard_spec = parse_shard(shard) if shard is not None else None
    except Phi3EmbedError as exc:
        raise _Usage(str(exc)) from None
    opts = _EncodeOptions(
        shard=shard, shard_spec=shard_spec, pack_bytes=parse_size(pack) if pack is not None else None, **options
    )
    if opts.pack_bytes is not None and opts.fmt == "npy":
        raise _Usage("--pack writes safetensors shards: leave out --format npy")
    if opts.fmt == "npy" and opts.out_dtype == "bfloat16":
        raise _Usage("npy cannot store bfloat16: use --format safetensors, or --out-dtype float32/float16")
    return opts


def _encode(inputs: list[str], opts: _EncodeOptions) -> int:
    from phi3embed.errors import Phi3EmbedError
    from phi3embed.inputs.listing import expand_inputs, select_shard

    try:
        sources = expand_inputs(inputs, exclude=[str(opts.out)])
    except Phi3EmbedError as exc:
        raise _Usage(str(exc)) from None
    except OSError as exc:
        raise _Usage(f"cannot read the inputs: {exc}") from None
    listed = len(sources)
    if opts.shard_spec is not None:
        sources = select_shard(sources, *opts.shard_spec)

    from rich.console import Console

    from phi3embed.cli.progress import say

    console = Console(stderr=True)
    if not sources:
        if not opts.quiet:
            extra = f" in shard {opts.shard} ({listed} images in all)" if opts.shard_spec else ""
            say(console, f"phi3embed encode: no images to encode{extra}")
        return 0
    _check_writable(opts.out)

    from phi3embed.core.checkpoint import resolve

    try:  # find the checkpoint first: a wrong --model is reported before transformers is even imported
        checkpoint_dir = str(resolve(opts.model).root)
    except Phi3EmbedError as exc:
        raise _Usage(str(exc)) from None

    if opts.engine == "ray":
        return _encode_ray(sources, opts, console)

    from phi3embed.core.embedder import Phi3VisionEmbedder, resolve_device

    try:
        dev = resolve_device(opts.device)
        compute, stored = _dtypes(dev.type, opts)
        batch = opts.batch_size or DEFAULT_BATCH_SIZE.get(dev.type, 8)
        # On CPU decoding is ~0.3% of an image's time, so workers gain nothing; on CUDA they keep the GPU fed.
        n_workers = opts.workers if opts.workers is not None else default_workers(dev.type)
        status = console.status(f"loading {opts.model}") if not opts.quiet and console.is_terminal else None
        if status is not None:
            status.start()
        try:
            embedder = Phi3VisionEmbedder.from_pretrained(
                checkpoint_dir,
                device=dev,
                dtype=compute,
                num_crops=opts.num_crops,
                alpha=opts.alpha,  # type: ignore[arg-type]
                exif_transpose=opts.exif_transpose,
                batch_size=batch,
            )
        finally:
            if status is not None:
                status.stop()
    except Phi3EmbedError as exc:
        raise _Usage(str(exc)) from None
    return _run(embedder, sources, opts, stored=stored, workers=n_workers, console=console)


def _dtypes(device_type: str, opts: _EncodeOptions) -> tuple[Any, Any]:
    """(compute, stored) torch dtypes from the options: auto computes in float32 on CPU, bfloat16 on CUDA;
    stores float32 on CPU, the compute dtype on CUDA (float32 when npy cannot hold it)."""
    import torch

    from phi3embed.core.embedder import parse_dtype

    dtype, out_dtype = opts.dtype, opts.out_dtype
    compute = parse_dtype(dtype) if dtype != "auto" else (torch.bfloat16 if device_type == "cuda" else torch.float32)
    if out_dtype != "auto":
        stored = parse_dtype(out_dtype)
    elif device_type == "cuda" and not (opts.output_format == "npy" and compute == torch.bfloat16):
        stored = compute
    else:
        stored = torch.float32
    return compute, stored


def _encode_ray(sources: list[Any], opts: _EncodeOptions, console: Any) -> int:
    """``--engine ray``: the same job on a Ray actor pool; the outputs are written here, as locally."""
    from dataclasses import replace

    from phi3embed.cli.progress import say
    from phi3embed.core.embedder import ImageOptions
    from phi3embed.errors import Phi3EmbedError

    try:
        from phi3embed.jobs.ray_engine import EncoderSpec, checkpoint_facts, cluster_resources, ray_session, run_ray
    except ImportError:
        raise _Usage("--engine ray needs Ray: pip install 'phi3embed[ray]'") from None
    device, model, ray_address, alpha = opts.device, opts.model, opts.ray_address, opts.alpha
    if device not in ("auto", "cpu", "cuda"):
        raise _Usage(f"--engine ray places one actor per GPU itself: use --device auto, cuda or cpu, not {device!r}")
    # Every node resolves the checkpoint itself: a local directory by its absolute path (it must be on a
    # filesystem all nodes share), a hub id or preset by name (each node's hub cache).
    actor_model = os.path.abspath(model) if os.path.isdir(model) else model
    spec = EncoderSpec(
        model=actor_model,
        num_crops=opts.num_crops,
        alpha=alpha,  # type: ignore[arg-type]
        exif_transpose=opts.exif_transpose,
    )
    try:
        fingerprint, crops = checkpoint_facts(spec)  # hashes the vision weights here: actors must match
    except Phi3EmbedError as exc:
        raise _Usage(str(exc)) from None

    def connect() -> Any:
        return ray_session(ray_address, num_cpus=usable_cpus())

    with contextlib.ExitStack() as stack:
        if ray_address:  # the cluster's resources decide the device; a local instance is started only when needed
            _enter_ray(stack, connect(), ray_address)
            cpus, gpus = cluster_resources()
        else:
            import torch

            cpus, gpus = float(usable_cpus()), float(torch.cuda.device_count())
        dev_type = "cuda" if device == "cuda" or (device == "auto" and gpus > 0) else "cpu"
        if dev_type == "cuda" and gpus == 0:
            raise _Usage(f"--device cuda: {'the Ray cluster' if ray_address else 'this machine'} has no GPU")
        try:
            compute, stored = _dtypes(dev_type, opts)
        except Phi3EmbedError as exc:
            raise _Usage(str(exc)) from None
        n_actors = opts.actors or max(1, int(gpus if dev_type == "cuda" else cpus))
        batch = opts.batch_size or DEFAULT_BATCH_SIZE[dev_type]
        threads = opts.workers if opts.workers is not None else (4 if dev_type == "cuda" else 0)
        spec = replace(
            spec,
            device=dev_type,
            dtype=str(compute).removeprefix("torch."),
            out_dtype=str(stored).removeprefix("torch."),
            batch_size=batch,
            decode_threads=threads,
            expect_fingerprint=fingerprint,
        )

        def announce(where: str) -> None:
            if not opts.quiet:
                say(
                    console,
                    f"phi3embed encode: {n_actors} Ray actor{'s' if n_actors != 1 else ''} on {dev_type}, "
                    f"{where} ({int(cpus)} CPUs, {int(gpus)} GPUs)",
                )

        @contextlib.contextmanager
        def start_local() -> Any:
            with contextlib.ExitStack() as inner:
                _enter_ray(inner, connect(), None)
                announce("local Ray instance")
                yield

        if ray_address:
            announce(f"Ray cluster {ray_address}")
        view = _EngineView(
            fingerprint=fingerprint,
            num_crops=crops,
            dtype=compute,
            image_options=ImageOptions(alpha=alpha, exif_transpose=opts.exif_transpose),  # type: ignore[arg-type]
            device="cuda:0" if dev_type == "cuda" else "cpu",  # what each actor sees (Ray gives it one GPU)
            batch_size=batch,
        )
        return _run(
            view,
            sources,
            opts,
            stored=stored,
            workers=n_actors,
            console=console,
            runner=lambda todo, store, reporter: run_ray(
                spec,
                todo,
                store,
                actors=n_actors,
                restart_actors=bool(ray_address),
                reporter=reporter,
                connect=None if ray_address else start_local,
            ),
        )


def _enter_ray(stack: contextlib.ExitStack, session: Any, address: str | None) -> None:
    try:
        stack.enter_context(session)
    except Exception as exc:  # Ray cannot start, or the cluster cannot be reached
        what = f"connect to Ray at {address}" if address else "start a local Ray instance"
        raise _Usage(f"cannot {what}: {' '.join(str(exc).split())}") from None


@dataclass(frozen=True)
class _EngineView:
    """What :func:`_run` reads of an embedder, for an engine whose model lives elsewhere (Ray actors)."""

    fingerprint: str
    num_crops: int
    dtype: Any
    image_options: Any
    device: str
    batch_size: int


def _run(
    embedder: Any,
    sources: list[Any],
    opts: _EncodeOptions,
    *,
    stored: Any,
    workers: int,
    console: Any,
    runner: Any = None,
) -> int:
    from phi3embed.cli.progress import ProgressReporter, RunInfo, render_summary, say
    from phi3embed.errors import Phi3EmbedError
    from phi3embed.jobs.local import run_local
    from phi3embed.outputs.store import OutputSettings, OutputStore, dtype_name

    out, model, fmt, pack_bytes, quiet = opts.out, opts.model, opts.output_format, opts.pack_bytes, opts.quiet
    printer = _JsonlPrinter() if opts.jsonl else None
    try:
        settings = OutputSettings(
            model=model,
            fingerprint=embedder.fingerprint,
            num_crops=embedder.num_crops,
            dtype=stored,
            compute_dtype=embedder.dtype,
            format=fmt,  # type: ignore[arg-type]
            pack_bytes=pack_bytes,
            alpha=embedder.image_options.alpha,
            exif_transpose=embedder.image_options.exif_transpose,
            device=str(embedder.device),
        )
        store = OutputStore(out, settings, overwrite=opts.overwrite, shard=opts.shard_spec, on_record=printer).open()
    except Phi3EmbedError as exc:
        raise _Usage(str(exc)) from None
    reporter = ProgressReporter(console, show_progress=not quiet)
    try:
        if runner is not None:
            summary = runner(sources, store, reporter)
        else:
            summary = run_local(embedder, sources, store, workers=workers, reporter=reporter)
    finally:
        store.close()
    if summary.fatal:
        code = 2
    elif summary.interrupted:
        code = 143 if summary.interrupted == "SIGTERM" else 130
    else:
        code = 1 if summary.failed else 0
    if store.recovered and not quiet:
        say(console, f"note: restored {store.recovered} manifest records from shards a killed run had written")
    if summary.fatal:
        say(console, f"error: {summary.fatal}", "bold red")
    if not quiet:
        if fmt == "pack":
            output = f"safetensors shards of up to {pack_bytes:,} bytes, {dtype_name(stored)}"
        else:
            output = f"{fmt} {dtype_name(stored)}"
        info = RunInfo(
            out_dir=str(out),
            output=output,
            model=model,
            fingerprint=embedder.fingerprint,
            device=str(embedder.device),
            compute_dtype=dtype_name(embedder.dtype),
            num_crops=embedder.num_crops,
            batch_size=embedder.batch_size,
            workers=workers,
            exit_code=code,
        )
        render_summary(console, summary, info, bytes_written=store.bytes_written, files=store.files_written)
    return code


def _check_writable(out: Path) -> None:
    """Fail early (before loading a model) when DIR cannot be created or written; create nothing yet."""
    probe = out
    while not probe.exists():
        if probe.is_symlink() or probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise _Usage(f"{out}: cannot be an output directory ({probe} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise _Usage(f"{out}: cannot write there (permission denied on {probe})")


class _JsonlPrinter:
    """Manifest records to stdout, one per line, flushed. A closed pipe stops the printing, not the job."""

    def __init__(self) -> None:
        self.closed = False

    def __call__(self, record: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            sys.stdout.write(json.dumps(record, ensure_ascii=True) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            self.closed = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush stays quiet
            os.close(devnull)


def main() -> None:
    """Console-script entry point."""
    app()
