"""The ``phi3embed`` command: Typer commands, thin over the library.

stdout carries only machine output (``--jsonl`` records); people read stderr. Heavy modules (torch,
transformers) are imported inside the commands, so ``--help`` and usage errors are instant.

Exit codes of ``encode``: 0 every image done; 1 some images failed (each has an error record and a line on
stderr); 2 usage, input, model, checkpoint or output-directory errors (reported before any work starts),
or the job stopped on out of memory / a failing output directory (one line naming DIR and the cause: no space
left on device, disk quota exceeded, read-only file system, the folder removed; finished outputs are kept);
130 stopped by Ctrl-C (SIGINT), 143 stopped by SIGTERM (finished outputs are kept; rerun to resume).
"""

# No ``from __future__ import annotations``: Typer reads the annotations at runtime.

import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from phi3embed.cli.combine import register as register_combine_commands
from phi3embed.cli.errors import FAILED, INTERRUPTED, OK, TERMINATED, USAGE, UsageError, one_line_errors
from phi3embed.cli.inspect_commands import register as register_inspect_commands
from phi3embed.cli.options import DEFAULT_MODEL, MODEL_ENV, Alpha, ImageColumn, OutDType, Revision
from phi3embed.cli.plan import STAGE_HELP
from phi3embed.cli.search import register as register_search_commands
from phi3embed.core.stages import DEFAULT_STAGE, STAGES
from phi3embed.jobs.runtime import DEFAULT_IMAGE_TIMEOUT, ENGINES

if TYPE_CHECKING:
    from phi3embed.jobs.runtime import EngineOptions
    from phi3embed.outputs.records import Record


#: ``--stage`` of encode: the stages of phi3embed.core.stages, or none (vectors only)
EncodeStage = Enum("EncodeStage", [(name, name) for name in (*STAGES, "none")], type=str)  # type: ignore[misc]


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


#: ``--dtype`` / ``--out-dtype`` of encode: auto, or one of the dtypes ``plan --out-dtype`` takes.
DType = Enum("DType", [("auto", "auto"), *((d.value, d.value) for d in OutDType)], type=str)  # type: ignore[misc]


class Format(str, Enum):
    npy = "npy"
    safetensors = "safetensors"


#: ``--engine``: the engines phi3embed.jobs.runtime builds, as a Typer choice.
Engine = Enum("Engine", [(name, name) for name in ENGINES], type=str)  # type: ignore[misc]


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
        raise UsageError(f"--pack SIZE must look like 500MB, 1GB or 2GiB, got {text!r}")
    value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value < 1:
        raise UsageError(f"--pack SIZE must be at least 1 byte, got {text!r}")
    return value


ENCODE_HELP = """Encode images into Phi-3-vision image-token embeddings.

INPUT: image files, directories (recursed; images found by extension or content), glob patterns (quote them: 'imgs/**/*.jpg'), or - to read newline-separated paths from stdin.

Output: DIR/<path relative to its input root>.<format>, e.g. imgs/a/b.jpg -> DIR/a/b.jpg.npy, holding one num_tokens x hidden array (safetensors: key image_embeds). With --pack: numbered pack files DIR/emb-00000.safetensors, one tensor per image. DIR/manifest.jsonl gets one JSON record per image and attempt. Rerunning the same command skips finished images (--overwrite redoes them).

Exit codes: 0 all images done; 1 some images failed (see the error records); 2 usage, model, checkpoint or output-directory problems (disk full, quota, read-only, folder removed: one line naming DIR and the cause), or out of memory; 130 Ctrl-C; 143 SIGTERM. Finished outputs are always kept; rerun the same command to finish.
"""


@app.command("encode", help=ENCODE_HELP, no_args_is_help=True)
@one_line_errors
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
    dtype: Annotated[
        DType,
        typer.Option(
            help="Compute dtype (auto: float32 on CPU, bfloat16 on CUDA). auto stays float32 on every CPU, bf16 "
            "units or not, so every host gives the reference numbers; phi3embed info says what bfloat16 gives here."
        ),
    ] = DType["auto"],
    out_dtype: Annotated[
        DType,
        typer.Option(
            help="Stored dtype (auto: float32 on CPU, the compute dtype on CUDA; npy cannot hold bfloat16, "
            "so auto stores float32 there)."
        ),
    ] = DType["auto"],
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
    stage: Annotated[EncodeStage, typer.Option(help=ENCODE_STAGE_HELP)] = EncodeStage[DEFAULT_STAGE],
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
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="torch.compile the encoder layers before the first image (local engine; needs a C++ compiler on "
            "CPU, else it runs eagerly and says why). Costs ~20 s per process with the real-size model on 2 CPU "
            "cores, reported in the summary; it measured no faster on this project's CPU host "
            "(benchmarks/RESULTS.md): time it on yours.",
        ),
    ] = False,
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
    ] = Engine["local"],
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
    raise typer.Exit(_encode(inputs, _options(**given)))


@dataclass(frozen=True)
class _EncodeOptions:
    """The options of one ``encode`` job, parsed and checked: what :meth:`engine_options` and :func:`_run` read."""

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
    compile: bool = False  # torch.compile the encoder layers at start (local engine)

    @property
    def vector_kinds(self) -> tuple[str, ...]:
        from phi3embed.core.vectors import parse_vectors

        return parse_vectors(self.vectors) if self.vectors is not None else ()

    @property
    def output_format(self) -> str:
        """What the store writes: ``pack`` (pack files), else one ``npy`` / ``safetensors`` file per image."""
        return "pack" if self.pack_bytes is not None else (self.fmt or "npy")

    def engine_options(self) -> "EngineOptions":
        """What the engine is asked for (phi3embed.jobs.runtime assembles it)."""
        from phi3embed.jobs.runtime import EngineOptions

        same_names = (
            "model", "revision", "device", "dtype", "out_dtype", "output_format", "num_crops", "alpha",
            "exif_transpose", "batch_size", "workers", "image_timeout", "engine", "actors", "compile",
        )  # fmt: skip
        return EngineOptions(
            **{name: getattr(self, name) for name in same_names},
            stage=DEFAULT_STAGE if self.stage == "none" else self.stage,  # type: ignore[arg-type]
            store_tokens=self.stage != "none",
            vectors=self.vector_kinds,
            address=self.ray_address,
        )


def _options(*, shard: str | None, pack: str | None, format: "Format | None", **options: Any) -> _EncodeOptions:
    """The command's options (Typer's values, enums included) -> :class:`_EncodeOptions`; an inconsistent
    combination is a :class:`~phi3embed.cli.errors.UsageError`."""
    from phi3embed.inputs.listing import parse_shard

    options = {name: value.value if isinstance(value, Enum) else value for name, value in options.items()}
    opts = _EncodeOptions(
        fmt=format.value if format else None,
        shard=shard,
        shard_spec=parse_shard(shard) if shard is not None else None,
        pack_bytes=parse_size(pack) if pack is not None else None,
        **options,
    )
    if opts.pack_bytes is not None and opts.fmt == "npy":
        raise UsageError("--pack writes safetensors pack files: leave out --format npy")
    if opts.fmt == "npy" and opts.out_dtype == "bfloat16":
        raise UsageError("npy cannot store bfloat16: use --format safetensors, or --out-dtype float32/float16")
    if opts.compile and opts.engine == "ray":
        raise UsageError("--compile is for the local engine: Ray's actors run the encoder eagerly")
    _check_vectors(opts)
    return opts


def _check_vectors(opts: _EncodeOptions) -> None:
    """``--vectors`` names known kinds and pyarrow is there; ``--stage none`` comes with ``--vectors``."""
    if opts.vectors is None:
        if opts.stage == "none":
            raise UsageError("--stage none stores no token matrices: give --vectors KINDS (e.g. --vectors cls,mean)")
        return
    opts.vector_kinds  # noqa: B018 - parses the list (a Phi3EmbedError: one line, exit 2)
    from phi3embed.outputs.vectors import require_pyarrow

    require_pyarrow()


def _encode(inputs: list[str], opts: _EncodeOptions) -> int:
    """List, check, load and run; the exit code. A problem found before the job starts raises (exit code 2)."""
    from phi3embed.inputs.listing import Listing, list_inputs, select_shard

    completed = {} if opts.overwrite else _completed_archives(opts.out)

    def list_now(refused: frozenset[str] = frozenset()) -> tuple[Listing, Sequence[Any]]:
        """The listing, archives with a completion record in DIR left unread (but those ``refused``: the store
        found them not done after all), and this shard's sources."""

        def finished(path: str, name: str, st: os.stat_result) -> int | None:
            record = completed.get(name)
            if record is None or name in refused or record.get("path") != path:
                return None
            same = record.get("size") == st.st_size and record.get("mtime_ns") == st.st_mtime_ns
            images = record.get("images")
            return images if same and isinstance(images, int) else None

        try:
            listing = list_inputs(
                inputs,
                exclude=[str(opts.out)],
                image_column=opts.image_column,
                finished_archive=finished if completed else None,
                shard=opts.shard_spec,
            )
        except OSError as exc:
            raise UsageError(f"cannot read the inputs: {exc}") from None
        sources = listing.sources
        if opts.shard_spec is not None:
            sources = select_shard(sources, *opts.shard_spec)
        return listing, sources

    listing, sources = list_now()
    done = listing.finished_images  # finished archives (of this shard): listed, every image skipped
    listed = len(listing.sources) + done

    from rich.console import Console

    from phi3embed.cli.progress import listing_notes, say, skipped_special

    console = Console(stderr=True)
    notes = listing_notes(listing)
    if not sources and not done:
        if not opts.quiet:
            extra = f" in shard {opts.shard} ({listed} images in all)" if opts.shard_spec else ""
            extra += f"; {skipped_special(listing.special)}" if listing.special else ""
            say(console, f"phi3embed encode: no images to encode{extra}")
            for note in notes:
                say(console, f"note: {note}")
        return OK
    _check_writable(opts.out)

    from phi3embed.jobs.runtime import build_engine

    if opts.engine == "ray" and opts.image_timeout and not opts.quiet:
        say(console, "note: --image-timeout is not enforced by --engine ray (file rules still apply)")
    loading = None if opts.quiet or not console.is_terminal else lambda: console.status(f"loading {opts.model}")
    engine = build_engine(
        opts.engine_options(),
        announce=lambda line: None if opts.quiet else say(console, f"phi3embed encode: {line}"),
        loading=loading,
    )
    return _run(
        engine, sources, opts, console=console, special=listing.special, notes=notes, listing=listing, relist=list_now
    )


def _completed_archives(out: Path) -> dict[str, dict[str, Any]]:
    """The completion records of archives in DIR (none when it holds no index file yet)."""
    from phi3embed.outputs.store import OutputStore

    return OutputStore.completed_archives(out)


def _run(
    engine: Any,
    sources: Sequence[Any],
    opts: _EncodeOptions,
    *,
    console: Any,
    special: int = 0,
    notes: Sequence[str] = (),
    listing: Any = None,
    relist: Callable[[frozenset[str]], tuple[Any, Sequence[Any]]] | None = None,
) -> int:
    """Open the store, run the job, render the summary (``special``: special files the listing skipped;
    ``notes``: its other lines about the listing; ``listing``: the listing, whose finished archives (not listed
    image by image) the store confirms: any it finds not all done after all are listed by ``relist``); the
    exit code."""
    from phi3embed.cli.progress import ProgressReporter, RunInfo, listing_notes, manifest_note, render_summary, say
    from phi3embed.jobs.core import run_job
    from phi3embed.outputs.formats import dtype_name
    from phi3embed.outputs.publish import OutputError
    from phi3embed.outputs.store import OutputStore

    info, fmt, pack_bytes, quiet = engine.info, opts.output_format, opts.pack_bytes, opts.quiet
    try:
        settings = info.output_settings(model=opts.model, format=fmt, pack_bytes=pack_bytes)
        store = OutputStore(
            opts.out,
            settings,
            overwrite=opts.overwrite,
            shard=opts.shard_spec,
            on_record=_JsonlPrinter() if opts.jsonl else None,
        ).open()
        closing: OutputError | None = None
        try:
            already_done = 0
            if listing is not None and listing.finished_archives:
                finished = {n: (listing.finished_paths[n], k) for n, k in listing.finished_archives.items()}
                refused = store.confirm_archives(finished)
                if refused and relist is not None:  # an output removed since, other settings...: list those
                    listing, sources = relist(frozenset(refused))
                    notes = listing_notes(listing)
                already_done = listing.finished_images
            reporter = ProgressReporter(console, show_progress=not quiet)
            summary = run_job(
                sources, store, engine, reporter=reporter, dedup=not opts.no_dedup, already_done=already_done
            )
        finally:
            try:
                store.close()  # the last pack is written here: a full disk may refuse it
            except OutputError as exc:
                closing = exc
    finally:
        engine.close()
    if closing is not None and summary.fatal is None:
        summary.fatal = str(closing)
    if summary.fatal:
        code = USAGE
    elif summary.interrupted:
        code = TERMINATED if summary.interrupted == "SIGTERM" else INTERRUPTED
    else:
        code = FAILED if summary.failed else OK
    if store.recovered and not quiet:
        say(console, f"note: restored {store.recovered} manifest records from packs a killed run had written")
    if summary.fatal:
        say(console, f"error: {summary.fatal}", "bold red")
    if not quiet:
        if fmt == "pack":
            output = f"safetensors packs of up to {pack_bytes:,} bytes, {dtype_name(info.stored_dtype)}"
        else:
            output = f"{fmt} {dtype_name(info.stored_dtype)}"
        if store.unreadable_lines:
            notes = [*notes, manifest_note(store.unreadable_lines, str(opts.out / store.manifest.path.name))]
        run = RunInfo(
            out_dir=str(opts.out),
            output=output,
            model=opts.model,
            engine=info,
            exit_code=code,
            special=special,
            notes=tuple(notes),
            dtype_note=_bf16_note(engine, opts, summary),
        )
        written = store.publisher
        render_summary(console, summary, run, bytes_written=written.bytes_written, files=written.files_written)
    return code


#: The encode summary times ``--dtype bfloat16`` (one encoder layer: 0.8 s on a quiet 2-core host, 2 s on a busy
#: one) only after a job at least this long, where that is a few per cent at most; after a shorter job its note
#: points to ``phi3embed info``.
MEASURE_AFTER_S = 60.0


def _bf16_note(engine: Any, opts: _EncodeOptions, summary: Any) -> str | None:
    """The summary's note on ``--dtype bfloat16``, for a job this process ran on the CPU in float32 because
    ``--dtype`` was left to auto, on a CPU with bf16 matrix units; None otherwise (a chosen dtype is the user's
    choice made; Ray's actors may run on other CPUs; a stopped job's summary is about what stopped it)."""
    from phi3embed.jobs.local import LocalEngine
    from phi3embed.outputs.formats import dtype_name

    info = engine.info
    if not isinstance(engine, LocalEngine) or opts.dtype != "auto" or info.device != "cpu":
        return None
    if dtype_name(info.compute_dtype) != "float32" or summary.interrupted or summary.fatal or not summary.todo:
        return None
    from phi3embed.cli.progress import cpu_note
    from phi3embed.core.cpu import bf16_advice, matrix_units

    units = matrix_units()
    if not units.any:
        return None
    advice = bf16_advice(
        engine.embedder.vision_config,
        measure=summary.wall_s >= MEASURE_AFTER_S,
        units=units,
        not_asked=f"the job took under {MEASURE_AFTER_S:.0f} s",
    )
    return cpu_note(advice, measure_hint=f"phi3embed info --model {shlex.quote(opts.model)} measures it")


def _check_writable(out: Path) -> None:
    """Fail early (before loading a model) when DIR cannot be created or written; create nothing yet."""
    probe = out
    while not probe.exists():
        if probe.is_symlink() or probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{out}: cannot be an output directory ({probe} is not a directory)")
    if not os.access(probe, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        why = "read-only file system" if read_only else "permission denied"
        raise UsageError(f"{out}: cannot write there ({why} on {probe})")


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
