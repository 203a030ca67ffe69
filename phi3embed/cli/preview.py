"""``phi3embed preview``: a picture of how one image is tiled for the model (:mod:`phi3embed.core.preview`).

The picture goes to ``-o/--out`` (format from its extension); one line on stderr says what was written.
"""

# No ``from __future__ import annotations``: Typer reads these annotations at runtime.

from pathlib import Path
from typing import Annotated

import typer
from PIL import Image

from phi3embed.cli.errors import one_line_errors
from phi3embed.cli.options import Alpha, ConfigModel, ExifTranspose, NumCrops, model_settings
from phi3embed.errors import ConfigError, ImageError


@one_line_errors
def preview_command(
    image: Annotated[Path, typer.Argument(help="The image to show.", show_default=False)],
    out: Annotated[Path, typer.Option("-o", "--out", help="Picture to write (format from its extension).")],
    model: ConfigModel = None,
    num_crops: NumCrops = None,
    alpha: Annotated[
        Alpha,
        typer.Option("--alpha", help="Transparency: drop (reference, transformers 4) or white (composite on white)."),
    ] = Alpha.drop,
    exif_transpose: ExifTranspose = False,
    max_side: Annotated[
        int, typer.Option("--max-side", min=64, help="Scale the HD image down to at most this many pixels.")
    ] = 1024,
) -> None:
    """Draw how an image is tiled: the padded HD image with its numbered crop grid, the global view, tokens."""

    from phi3embed.core.preview import render_preview

    _, pre, _ = model_settings(model, num_crops)
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None:
        raise ConfigError(f"cannot tell the image format from the extension {out.suffix!r}", path=out)
    picture = render_preview(image, pre, alpha=alpha.value, exif_transpose=exif_transpose, max_side=max_side).image
    try:
        picture.save(out, format=fmt)
    except OSError as exc:
        raise ImageError(f"cannot write the preview: {exc.strerror or exc}", path=out) from None
    typer.echo(f"wrote {out} ({picture.width}x{picture.height}, num_crops {pre.num_crops})", err=True)
