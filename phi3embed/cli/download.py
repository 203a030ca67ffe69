"""``phi3embed download MODEL``: fetch a hub model's vision tensors into the cache, for runs without network.

On a machine with network (a login node) this writes what encode needs into the phi3embed cache
(:mod:`phi3embed.core.hub`); jobs on machines without network then run with ``HF_HUB_OFFLINE=1`` and the same
``PHI3EMBED_CACHE`` (or ``HF_HOME``). stdout says what was fetched, how many bytes, and where (``--json``:
one JSON document); exit 0 when the model is ready, 2 when it is not.
"""

# No ``from __future__ import annotations``: Typer reads these annotations at runtime.

import json
from typing import Annotated

import typer

from phi3embed.cli.errors import one_line_errors
from phi3embed.cli.options import DEFAULT_MODEL, MODEL_ENV, AsJson, Revision, human_bytes
from phi3embed.errors import CheckpointError


@one_line_errors
def download_command(
    model: Annotated[
        str,
        typer.Argument(
            help=f"Hub id (owner/name) or preset name (env {MODEL_ENV}, default {DEFAULT_MODEL}).",
            envvar=MODEL_ENV,
            show_default=False,
        ),
    ] = DEFAULT_MODEL,
    revision: Revision = None,
    text_embeddings: Annotated[
        bool,
        typer.Option(
            "--text-embeddings", help="Also fetch the token-embedding table (load_text_embeddings, prompt merging)."
        ),
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Fetch only the vision tensors of a hub model into the phi3embed cache (for offline runs)."""
    from phi3embed.core import hub
    from phi3embed.core.checkpoint import locate

    got = locate(model, revision=revision, vision=True, text=text_embeddings)
    if not isinstance(got, hub.HubModel):
        raise CheckpointError("a local checkpoint folder needs no download; pass it as --model", path=got)
    plan = got.plan
    doc = {
        "model": got.repo_id,
        "commit": got.commit,
        "location": got.location,
        "paths": [str(p) for p in got.roots],
        "bytes_fetched": got.bytes_fetched,
        "tensors": sum(len(ks) for ks in plan.keys.values()) if plan else None,
        "tensor_bytes": plan.tensor_bytes if plan else None,
        "weight_files": [f.name for f in plan.files] if plan else [],
        "whole_files_bytes": plan.whole_files_bytes if plan else None,
        "cache": str(hub.cache_root()),
    }
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    if plan is None:
        where = "the Hugging Face cache" if got.location == "hub cache" else "the phi3embed cache"
        typer.echo(f"{got.repo_id} @ {got.commit}: already in {where}, nothing fetched")
    else:
        typer.echo(
            f"{got.repo_id} @ {got.commit}: fetched {doc['tensors']} tensors ({human_bytes(plan.tensor_bytes)}) "
            f"from {', '.join(f.name for f in plan.files)}: {got.bytes_fetched:,} bytes "
            f"({human_bytes(got.bytes_fetched)}; the weight files whole are {human_bytes(plan.whole_files_bytes)})"
        )
    for path in got.roots:
        typer.echo(f"  {path}")
