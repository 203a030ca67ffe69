"""The ``phi3embed`` command: Typer commands, thin over the library.

stdout carries only machine output (``--jsonl`` records); people read stderr. Heavy modules (torch,
transformers) are imported inside the commands, so ``--help`` and usage errors are instant.

Exit codes of ``encode``: 0 every image done; 1 some images failed (each has an error record and a line on
stderr); 2 usage, input, model, checkpoint or output-directory errors (reported before any work starts),
or the job stopped on out of memory / a failing output directory (finished outputs are kept);
130 stopped by Ctrl-C (SIGINT), 143 stopped by SIGTERM (finished outputs are kept; rerun to resume).
"""

# No ``from __future__ import annotations``: Typer reads the annotations at runtime.

import json
import os
import re
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from phi3embed.cli.combine import register as register_combine_commands
from phi3embed.cli.inspect_commands import register as register_inspect_commands
from phi3embed.cli.options import DEFAULT_MODEL, MODEL_ENV, Alpha, ImageColumn, Revision
from phi3embed.cli.plan import STAGE_HELP
from phi3embed.cli.search import register as register_search_commands
from phi3embed.core.config import DEFAULT_BATCH_SIZE, default_workers

if TYPE_CHECKING:
    from phi3embed.outputs.records import Record


class EncodeStage(str, Enum):
    """``--stage`` of encode: the stages of phi3embed.core.stages, or none (vectors only)."""

    projected = "projected"
    hd = "hd"
    clip = "clip"
    none = "none"


ENCODE_STAGE_HELP = STAGE_HELP + " none: no token matrices, only the --vectors (and the manifest)."
VECTORS_HELP = (
    "Also write one vector per image, comma list of: cls (CLIP's pooled feature of the global view), mean (mean "
    "of the global view's patch features at layer_idx), tokens (mean of the projected tokens, separators "
    "excluded); as DIR/vectors/<kind>/img_emb/NNNNN.npy shards with aligned metadata/NNNNN.parquet "
    "(embedding-reader's parquet_npy layout; needs pyarrow: pip install 'phi3embed[parquet]')."
)

app = typer.Typer(
    name="phi3embed",
    help="Images -> the exact image-token embeddings Phi-3-vision / Phi-3.5-vision feed their language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# the inspection commands (plan, preview, info) and combine live in their own modules
register_inspect_commands(app)
register_combine_commands(app)
register_search_commands(app)


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


#: Seconds reading and decoding one image may take by default: far above any real image (a 100 MP PNG decodes in
#: a few seconds), short enough that a stuck network mount costs minutes, not the night.
DEFAULT_IMAGE_TIMEOUT = 120.0

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

Output: DIR/<path relative to its input root>.<format>, e.g. imgs/a/b.jpg -> DIR/a/b.jpg.npy, holding one num_tokens x hidden array (safetensors: key image_embeds). With --pack: numbered pack files DIR/emb-00000.safetensors, one tensor per image. DIR/manifest.jsonl gets one JSON record per image and attempt. Rerunning the same command skips finished images (--overwrite redoes them).

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
    revision: Revision = None,
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
    stage: Annotated[EncodeStage, typer.Option(help=ENCODE_STAGE_HELP)] = EncodeStage.projected,
    vectors: Annotated[str | None, typer.Option(metavar="KINDS", help=VECTORS_HELP)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Encode again images already done.")] = False,
    no_dedup: Annotated[
        bool,
        typer.Option(
            "--no-dedup",
            help="Encode every image, even one whose bytes an earlier image of the job (or an ok output of an "
            "earlier run) has; by default such a copy shares that output (a hard link, or the pack key).",
        ),
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            metavar="I/N",
            help="Only part I of N (0-based), split by a stable hash of each name (of each archive's name for the "
            "images inside tar and parquet files).",
        ),
    ] = None,
    image_column: ImageColumn = None,
    pack: Annotated[
        str | None,
        typer.Option(
            metavar="SIZE", help="Write safetensors pack files of about SIZE (e.g. 1GB) instead of one file per image."
        ),
    ] = None,
    image_timeout: Annotated[
        float | None,
        typer.Option(
            min=0,
            metavar="SECONDS",
            help=f"Longest time reading and decoding one image may take (default {DEFAULT_IMAGE_TIMEOUT:g}; 0: no "
            "limit); past it the image gets an error record and the job goes on. Local engine only.",
            show_default=False,
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
    given = dict(locals())  # every option of the command, by name: _options reads them all
    del given["inputs"]
    try:
        options = _options(**given)
        code = _encode(inputs, options)
    except _Usage as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:  # before the job started (e.g. while the model loads)
        raise _fail("interrupted", 130) from None
    raise typer.Exit(code)


@dataclass(frozen=True)
class _EncodeOptions:
    """The options of one ``encode`` job, parsed and checked: what the engine builders and :func:`_run` read."""

    out: Path
    model: str
    num_crops: int | None
    device: str
    dtype: str  # compute dtype name or "auto"
    out_dtype: str  # stored dtype name or "auto"
    fmt: str | None  # --format as given (None: npy, or the packs of --pack)
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
    image_timeout: float | None = None  # as given (None: DEFAULT_IMAGE_TIMEOUT)
    stage: str = "projected"
    revision: str | None = None  # of a hub id
    image_column: str | None = None  # of parquet INPUTs (None: the first of the usual names)
    no_dedup: bool = False  # encode copies of identical bytes too
    vectors: str | None = None  # --vectors as given (a comma list of kinds)

    @property
    def vector_kinds(self) -> tuple[str, ...]:
        from phi3embed.core.vectors import parse_vectors

        return parse_vectors(self.vectors) if self.vectors is not None else ()

    @property
    def output_format(self) -> str:
        """What the store writes: ``pack`` (pack files), else one ``npy`` / ``safetensors`` file per image."""
        return "pack" if self.pack_bytes is not None else (self.fmt or "npy")


def _options(*, shard: str | None, pack: str | None, format: "Format | None", **options: Any) -> _EncodeOptions:
    """The command's options (Typer's values, enums included) -> :class:`_EncodeOptions`; an inconsistent
    combination is a :class:`_Usage`."""
    from phi3embed.errors import Phi3EmbedError
    from phi3embed.inputs.listing import parse_shard

    options = {name: value.value if isinstance(value, Enum) else value for name, value in options.items()}

    try:
        shard_spec = parse_shard(shard) if shard is not None else None
    except Phi3EmbedError as exc:
        raise _Usage(str(exc)) from None
    opts = _EncodeOptions(
        fmt=format.value if format else None,
        shard=shard,
        shard_spec=shard_spec,
        pack_bytes=parse_size(pack) if pack is not None else None,
        **options,
    )
    if opts.pack_bytes is not None and opts.fmt == "npy":
        raise _Usage("--pack writes safetensors pack files: leave out --format npy")
    if opts.fmt == "npy" and opts.out_dtype == "bfloat16":
        raise _Usage("npy cannot store bfloat16: use --format safetensors, or --out-dtype float32/float16")
    _check_vectors(opts)
    return opts


def _check_vectors(opts: _EncodeOptions) -> None:
    """``--vectors`` names known kinds and pyarrow is there; ``--stage none`` comes with ``--vectors``."""
    from phi3embed.errors import Phi3EmbedError

    if opts.vectors is None:
        if opts.stage == "none":
            raise _Usage("--stage none stores no token matrices: give --vectors KINDS (e.g. --vectors cls,mean)")
        return
    if opts.engine == "ray":
        raise _Usage("--vectors is written by --engine local only for now (the Ray actors return no vectors yet)")
    try:
        opts.vector_kinds  # noqa: B018 - parses the list
        from phi3embed.outputs.vectors import require_pyarrow

        require_pyarrow()
    except Phi3EmbedError as exc:
        raise _Usage(str(exc)) from None


def _encode(inputs: list[str], opts: _EncodeOptions) -> int:
    from phi3embed.errors import Phi3EmbedError
    from phi3embed.inputs.listing import list_inputs, select_shard

    try:
        listing = list_inputs(inputs, exclude=[str(opts.out)], image_column=opts.image_column)
    except Phi3EmbedError as exc:
        raise _Usage(str(exc)) from None
    except OSError as exc:
        raise _Usage(f"cannot read the inputs: {exc}") from None
    sources = listing.sources
    listed = len(sources)
    if opts.shard_spec is not None:
        sources = select_shard(sources, *opts.shard_spec)

    from rich.console import Console

    from phi3embed.cli.progress import say, skipped_special

    console = Console(stderr=True)
    if not sources:
        if not opts.quiet:
            extra = f" in shard {opts.shard} ({listed} images in all)" if opts.shard_spec else ""
            extra += f"; {skipped_special(listing.special)}" if listing.special else ""
            say(console, f"phi3embed encode: no images to encode{extra}")
        return 0
    _check_writable(opts.out)

    from phi3embed.core.checkpoint import resolve

    try:  # find the checkpoint first: a wrong --model is reported before transformers is even imported
        checkpoint_dir = str(resolve(opts.model, revision=opts.revision).root)
    except Phi3EmbedError as exc:
        raise _Usage(str(exc)) from None

    try:
        engine = _ray_engine(opts, console) if opts.engine == "ray" else _local_engine(opts, checkpoint_dir, console)
    except Phi3EmbedError as exc:
        raise _Usage(str(exc)) from None
    return _run(engine, sources, opts, console=console, special=listing.special)


def _local_engine(opts: _EncodeOptions, checkpoint_dir: str, console: Any) -> Any:
    """Load the embedder here: the local engine. On CPU the allocator keeps freed memory for reuse
    (phi3embed/core/allocator.py): the command owns its process, a library user decides for theirs."""
    from phi3embed.core.allocator import keep_freed_memory
    from phi3embed.core.embedder import Phi3VisionEmbedder, resolve_device
    from phi3embed.jobs.core import stored_dtypes
    from phi3embed.jobs.local import LocalEngine

    dev = resolve_device(opts.device)
    compute, stored = stored_dtypes(
        dev.type, dtype=opts.dtype, out_dtype=opts.out_dtype, output_format=opts.output_format
    )
    batch = opts.batch_size or DEFAULT_BATCH_SIZE.get(dev.type, 8)
    # On CPU decoding is ~0.3% of an image's time, so workers gain nothing; on CUDA they keep the GPU fed.
    workers = opts.workers if opts.workers is not None else default_workers(dev.type)
    if dev.type == "cpu":
        keep_freed_memory()
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
            stage=opts.stage if opts.stage != "none" else "projected",  # type: ignore[arg-type]
        )
    finally:
        if status is not None:
            status.stop()
    timeout = DEFAULT_IMAGE_TIMEOUT if opts.image_timeout is None else opts.image_timeout
    return LocalEngine(
        embedder,
        stored_dtype=stored,
        workers=workers,
        image_timeout=timeout or None,
        vectors=opts.vector_kinds,
        store_tokens=opts.stage != "none",
    )


def _ray_engine(opts: _EncodeOptions, console: Any) -> Any:
    """``--engine ray``: the same job on a Ray actor pool (planned by phi3embed.jobs.ray_engine.plan)."""
    from phi3embed.cli.progress import say

    if opts.image_timeout and not opts.quiet:
        say(console, "note: --image-timeout is not enforced by --engine ray (file rules still apply)")
    try:
        from phi3embed.jobs.ray_engine import RayOptions, plan
    except ImportError:
        raise _Usage("--engine ray needs Ray: pip install 'phi3embed[ray]'") from None
    same_names = (
        "model", "revision", "device", "dtype", "out_dtype", "output_format", "num_crops", "alpha", "exif_transpose",
        "stage",
    )  # fmt: skip
    options = RayOptions(
        **{name: getattr(opts, name) for name in (*same_names, "batch_size", "actors")},
        decode_threads=opts.workers,
        address=opts.ray_address,
    )
    return plan(options, announce=lambda line: None if opts.quiet else say(console, f"phi3embed encode: {line}"))


def _run(engine: Any, sources: list[Any], opts: _EncodeOptions, *, console: Any, special: int = 0) -> int:
    """Open the store, run the job, render the summary (``special``: special files the listing skipped); the
    exit code."""
    from phi3embed.cli.progress import ProgressReporter, RunInfo, render_summary, say
    from phi3embed.errors import Phi3EmbedError
    from phi3embed.jobs.core import run_job
    from phi3embed.outputs.formats import dtype_name
    from phi3embed.outputs.store import OutputStore

    info, fmt, pack_bytes, quiet = engine.info, opts.output_format, opts.pack_bytes, opts.quiet
    try:
        try:
            settings = info.output_settings(model=opts.model, format=fmt, pack_bytes=pack_bytes)
            store = OutputStore(
                opts.out,
                settings,
                overwrite=opts.overwrite,
                shard=opts.shard_spec,
                on_record=_JsonlPrinter() if opts.jsonl else None,
            ).open()
        except Phi3EmbedError as exc:
            raise _Usage(str(exc)) from None
        try:
            reporter = ProgressReporter(console, show_progress=not quiet)
            summary = run_job(sources, store, engine, reporter=reporter, dedup=not opts.no_dedup)
        finally:
            store.close()
    finally:
        engine.close()
    if summary.fatal:
        code = 2
    elif summary.interrupted:
        code = 143 if summary.interrupted == "SIGTERM" else 130
    else:
        code = 1 if summary.failed else 0
    if store.recovered and not quiet:
        say(console, f"note: restored {store.recovered} manifest records from packs a killed run had written")
    if summary.fatal:
        say(console, f"error: {summary.fatal}", "bold red")
    if not quiet:
        if fmt == "pack":
            output = f"safetensors packs of up to {pack_bytes:,} bytes, {dtype_name(info.stored_dtype)}"
        else:
            output = f"{fmt} {dtype_name(info.stored_dtype)}"
        run = RunInfo(
            out_dir=str(opts.out), output=output, model=opts.model, engine=info, exit_code=code, special=special
        )
        written = store.publisher
        render_summary(console, summary, run, bytes_written=written.bytes_written, files=written.files_written)
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

    def __call__(self, record: "Record") -> None:
        if self.closed:
            return
        try:
            sys.stdout.write(json.dumps(record.to_json(), ensure_ascii=True) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            self.closed = True
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's final flush stays quiet
            os.close(devnull)


def main() -> None:
    """Console-script entry point."""
    app()
