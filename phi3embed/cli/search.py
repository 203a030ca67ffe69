"""Typer commands ``search``, ``neighbors`` and ``index`` over the vectors ``encode --vectors`` wrote
(:mod:`phi3embed.jobs.search`, :mod:`phi3embed.outputs.vector_index`).

``register(app)`` adds them to the application that ``phi3embed.cli.app`` builds. As for ``plan``, stdout carries
the results (a table for people, or JSON lines with ``--json``) and stderr the notes and errors. Exit codes: 0
done; 1 some QUERY could not be searched (each reported, the others searched); 2 usage, DIR, model or index
problems.
"""

# No ``from __future__ import annotations``: Typer reads these annotations at runtime.

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from phi3embed.cli.errors import one_line_errors

if TYPE_CHECKING:  # numpy, torch: only the command that runs pays for them, not --help
    from phi3embed.jobs.search import Group, Hit, Query
    from phi3embed.outputs.vector_index import OpenIndex
    from phi3embed.outputs.vector_set import VectorSet

PREFERRED_KIND = "mean"  # the default among several kinds (the most robust to resized copies: README)

OutDir = Annotated[Path, typer.Argument(metavar="DIR", help="An encode output folder (or a manifest file).")]
VectorKindOption = Annotated[
    str | None,
    typer.Option(
        "--vectors",
        metavar="KIND",
        help=f"Which vectors: cls, mean or tokens (default: the only kind written, else {PREFERRED_KIND}).",
    ),
]
Exact = Annotated[bool, typer.Option("--exact", help="Compare with every vector even when a fresh index exists.")]


def register(app: typer.Typer) -> None:
    """Add ``search``, ``neighbors`` and ``index`` to ``app``."""
    app.command("search", no_args_is_help=True)(search_command)
    app.command("neighbors", no_args_is_help=True)(neighbors_command)
    app.command("index", no_args_is_help=True)(index_command)


@one_line_errors
def search_command(
    out_dir: OutDir,
    queries: Annotated[
        list[str],
        typer.Argument(
            metavar="QUERY...",
            help="A name in DIR, or an image file (encoded with DIR's model and settings, from its manifest).",
        ),
    ],
    k: Annotated[int, typer.Option("-k", "--top", min=1, help="How many similar images per query.")] = 10,
    kind: VectorKindOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON line per result (query, rank, name, cosine) instead of a table.")
    ] = False,
    exact: Exact = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Where the model of DIR's manifest is, when its recorded name does not find it here (the weights "
            "must have the recorded fingerprint).",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="Where image queries are encoded: auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """The images of DIR most similar to each QUERY, by cosine similarity of their vectors (encode --vectors).

    A QUERY naming an image of DIR uses its stored vector and is left out of its own results.

    Search compares every vector unless `phi3embed index` built an index that is still up to date.

    Exit code 0 when every query was searched, 1 when some could not be, 2 on usage, DIR, model or index problems.
    """

    def work() -> "tuple[list[Query], list[list[Hit] | None]]":
        from phi3embed.jobs.search import encoding_settings, load_query_embedder, resolve_queries, search

        vset = _open_set(out_dir, kind)
        index = None if exact else _fresh_index(vset, out_dir)
        resolved = resolve_queries(
            vset, queries, embedder=lambda: load_query_embedder(encoding_settings(vset), model=model, device=device)
        )
        return resolved, search(vset, resolved, k, index=index)

    resolved, results = work()
    if as_json:
        for query, hits in zip(resolved, results, strict=True):
            for rank, hit in enumerate(hits or (), 1):
                line = {"query": query.text, "rank": rank, "name": hit.name, "cosine": round(hit.cosine, 6)}
                typer.echo(json.dumps(line, ensure_ascii=False))
    else:
        _print_hits(resolved, results)
    failed = [q for q in resolved if q.error]
    for query in failed:
        typer.echo(f"error: {query.error}", err=True)
    if failed:
        raise typer.Exit(1)


@one_line_errors
def neighbors_command(
    out_dir: OutDir,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold", "-t", min=-1.0, max=1.0, help="Images whose vectors have at least this cosine are grouped."
        ),
    ],
    kind: VectorKindOption = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON line per group (group, size, weakest, names) instead of a table.")
    ] = False,
    exact: Exact = False,
    candidates: Annotated[
        int,
        typer.Option("--candidates", min=1, help="With an index: how many nearest images of each image are compared."),
    ] = 32,
) -> None:
    """Groups of near-duplicate images: pairs whose vectors have a cosine of at least --threshold, joined.

    Without an index every pair is compared, a block at a time (bounded memory; time grows as images squared).

    With an up-to-date index (`phi3embed index DIR`) each image's --candidates nearest images are compared.

    A group's `weakest` is the lowest cosine among its pairs.
    """

    def work() -> "tuple[list[Group], int]":
        from phi3embed.jobs.search import neighbors

        vset = _open_set(out_dir, kind)
        index = None if exact else _fresh_index(vset, out_dir)
        return neighbors(vset, threshold, index=index, candidates=candidates), len(vset)

    groups, total = work()
    if as_json:
        for number, group in enumerate(groups, 1):
            line = {"group": number, "size": len(group.names), "weakest": round(group.weakest, 6), "names": group.names}
            typer.echo(json.dumps(line, ensure_ascii=False))
    else:
        _print_groups(groups)
    grouped = sum(len(g.names) for g in groups)
    typer.echo(f"{len(groups)} groups holding {grouped} of {total} images (cosine >= {threshold})", err=True)


@one_line_errors
def index_command(
    out_dir: OutDir,
    kind: VectorKindOption = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build anew instead of extending the index.")] = False,
) -> None:
    """Build (or bring up to date) the approximate index of DIR's vectors, saved in DIR/vectors/KIND/index/.

    After another encode run the index is extended: new and changed images added, those gone forgotten.

    `search` and `neighbors` use it while it is up to date. Needs faiss: pip install 'phi3embed[index]'.
    """
    from rich.console import Console

    console = Console(stderr=True)

    def work() -> Any:
        from phi3embed.outputs.vector_index import build_index, index_folder

        vset = _open_set(out_dir, kind)
        with _progress(console, f"indexing {vset.kind} vectors") as progress:
            report = build_index(vset, rebuild=rebuild, progress=progress)
        return vset, report, index_folder(vset)

    vset, report, folder = work()
    if report.action == "unchanged":
        typer.echo(f"the {vset.kind} index is up to date ({report.count} vectors): {folder}", err=True)
    elif report.action == "built":
        typer.echo(
            f"built the {vset.kind} index of {report.count} vectors in {report.seconds:.1f} s: {folder}", err=True
        )
    else:
        typer.echo(
            f"extended the {vset.kind} index: {report.added} vectors added, {report.removed} removed, "
            f"{report.count} in all, in {report.seconds:.1f} s: {folder}",
            err=True,
        )


# --------------------------------------------------------------------------- helpers


def _open_set(out_dir: Path, kind: str | None) -> "VectorSet":
    """The vectors of ``kind`` (or the default kind) in ``out_dir``."""
    from phi3embed.errors import Phi3EmbedError
    from phi3embed.outputs.vector_set import VectorSet, latest_of, manifest_path, written_kinds

    manifest = manifest_path(out_dir)
    latest = latest_of(manifest)
    if kind is None:
        kinds = written_kinds(latest)
        if len(kinds) == 1:
            kind = kinds[0]
        elif PREFERRED_KIND in kinds:
            kind = PREFERRED_KIND
        elif kinds:
            raise Phi3EmbedError(f"several vector kinds here ({', '.join(kinds)}): choose one with --vectors")
        else:
            raise Phi3EmbedError("no vectors here (encode --vectors cls,mean,tokens writes them)", path=out_dir)
    return VectorSet(manifest.parent, kind, latest)


def _fresh_index(vset: "VectorSet", out_dir: Path) -> "OpenIndex | None":
    """The kind's index when it can be used; a note on stderr when there is one that cannot."""
    from phi3embed.outputs.vector_index import open_index

    index, why = open_index(vset)
    if why:
        typer.echo(
            f"note: not using the {vset.kind} index ({why}): comparing with every vector instead; "
            f"update it with: phi3embed index {out_dir} --vectors {vset.kind}",
            err=True,
        )
    return index


class _progress:
    """A progress bar on stderr (on a terminal) for ``index``; a callable ``(done, total)``."""

    def __init__(self, console: Any, label: str) -> None:
        self.console, self.label = console, label
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> "_progress":
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                self.label, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console, transient=True,
            )  # fmt: skip
            self.bar.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            return
        if self.task is None:
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _console() -> Any:
    from rich.console import Console

    console = Console(file=sys.stdout)
    if not console.is_terminal:  # a file or a pipe: wide enough that names are not folded
        console = Console(file=sys.stdout, width=max(console.width, 160))
    return console


def _print_hits(queries: "list[Query]", results: "list[list[Hit] | None]") -> None:
    from rich.table import Table
    from rich.text import Text

    console = _console()
    for query, hits in zip(queries, results, strict=True):
        if hits is None:
            continue
        table = Table(title=Text(f"query {query.text}"), title_justify="left", header_style="bold")
        table.add_column("rank", justify="right")
        table.add_column("image", overflow="fold")
        table.add_column("cosine", justify="right")
        for rank, hit in enumerate(hits, 1):
            table.add_row(str(rank), Text(hit.name), f"{hit.cosine:.4f}")
        console.print(table)


def _print_groups(groups: "list[Group]") -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(header_style="bold")
    table.add_column("group", justify="right")
    table.add_column("weakest", justify="right")
    table.add_column("image", overflow="fold")
    for number, group in enumerate(groups, 1):
        for i, name in enumerate(group.names):
            first = i == 0
            table.add_row(str(number) if first else "", f"{group.weakest:.4f}" if first else "", Text(name))
        table.add_section()
    _console().print(table)
