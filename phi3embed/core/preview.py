"""Picture how an image is tiled for the model: the padded HD image with its numbered crop grid, the global
view, and a caption with the token count (``phi3embed preview``).

The pixels are the model's own: the image is opened and converted as encode does
(:func:`phi3embed.core.preprocess.open_image`, ``to_rgb``), the HD image is
:func:`phi3embed.core.preprocess.hd_image` and the global view the model's bicubic crop; all geometry comes from
the checkpoint's :class:`~phi3embed.core.config.PreprocessConfig` (crop size, tokens per side, normalisation).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from phi3embed.core.config import PreprocessConfig
from phi3embed.core.preprocess import (
    AlphaMode,
    HDGrid,
    ImageInput,
    conversion_errors,
    global_crop,
    hd_image,
    image_geometry,
    normalize,
    open_image,
    to_rgb,
)

_LINE = (230, 0, 70)  # grid lines and crop numbers
_CONTENT = (0, 110, 255)  # outline of the resized image inside the white padding
_BACKGROUND = (228, 228, 228)  # canvas, so white padding stays visible
_TEXT = (20, 20, 20)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (AttributeError, ImportError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


@dataclass(frozen=True)
class PreviewLayout:
    """Where everything sits on the preview canvas (pixels). Positions of the HD image are scaled by ``scale``."""

    scale: float
    crop_size: int
    rows: int
    cols: int
    hd_origin: tuple[int, int]  # top-left of the (scaled) HD image
    hd_size: tuple[int, int]  # (width, height) of the scaled HD image
    global_origin: tuple[int, int]
    global_size: int
    caption_origin: tuple[int, int]
    size: tuple[int, int]  # canvas (width, height)
    label_font_size: int
    text_font_size: int

    def col_x(self, col: int) -> int:
        """Canvas x of the boundary left of crop column ``col`` (``col == cols``: the right edge)."""
        return self.hd_origin[0] + round(col * self.crop_size * self.scale)

    def row_y(self, row: int) -> int:
        return self.hd_origin[1] + round(row * self.crop_size * self.scale)


def preview_layout(
    grid: HDGrid, *, crop_size: int, max_side: int = 1024, caption_lines: Sequence[str] = ()
) -> PreviewLayout:
    """Geometry of :func:`render_preview`: the HD image scaled to fit ``max_side`` (never enlarged)."""
    scale = min(1.0, max_side / max(grid.out_w, grid.out_h))
    hd_w, hd_h = round(grid.out_w * scale), round(grid.out_h * scale)
    text_size = 16
    margin, gap, title = 16, 24, text_size + 10
    global_size = crop_size
    hd_origin = (margin, margin + title)
    global_origin = (margin + hd_w + gap, margin + title)
    body_h = max(hd_h, global_size)
    caption_origin = (margin, hd_origin[1] + body_h + 14)
    font = _font(text_size)
    text_w = max((int(math.ceil(font.getlength(line))) for line in caption_lines), default=0)
    width = max(global_origin[0] + global_size + margin, margin + text_w + margin)
    height = caption_origin[1] + len(caption_lines) * (text_size + 6) + margin
    crop_px = crop_size * scale
    label = max(11, min(36, round(crop_px * 0.14)))
    return PreviewLayout(
        scale=scale,
        crop_size=crop_size,
        rows=grid.rows,
        cols=grid.cols,
        hd_origin=hd_origin,
        hd_size=(hd_w, hd_h),
        global_origin=global_origin,
        global_size=global_size,
        caption_origin=caption_origin,
        size=(width, height),
        label_font_size=label,
        text_font_size=text_size,
    )


def global_view(hd: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """The global crop exactly as computed for the model (bicubic on the normalised HD image), back in uint8.

    ``x * std + mean`` then ``* 255``, rounded and clipped (bicubic overshoots a little at sharp edges).
    """
    x = normalize(hd, mean=cfg.image_mean, std=cfg.image_std)  # (3, H', W')
    glb = global_crop(x, crop_size=cfg.crop_size)[0].numpy()  # (3, S, S)
    mean = np.asarray(cfg.image_mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg.image_std, dtype=np.float32).reshape(3, 1, 1)
    pixels = np.clip(np.rint((glb * std + mean) * 255.0), 0, 255).astype(np.uint8)  # (3, S, S)
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")  # (S, S, 3)


def _caption(grid: HDGrid, *, name: str | None, num_crops: int, tokens: int, tokens_per_side: int) -> list[str]:
    resized = (grid.resized_h, grid.resized_w) if grid.transposed else (grid.resized_w, grid.resized_h)
    pad = grid.pad_top + grid.pad_bottom
    pad_where = "left/right" if grid.transposed else "top/bottom"
    m = tokens_per_side
    n = grid.rows * grid.cols
    crops_label = f"crops 1-{n}" if n > 1 else "crop 1"
    return [
        f"{name + ': ' if name else ''}{grid.width}x{grid.height} px, resized to {resized[0]}x{resized[1]}, "
        + (f"padded with white to {grid.out_w}x{grid.out_h} ({pad} px {pad_where})" if pad else "no padding needed"),
        f"num_crops {num_crops}: grid {grid.rows} x {grid.cols} = {n} crop{'s' if n > 1 else ''} + 1 global view, "
        f"image_sizes [{grid.out_h}, {grid.out_w}]",
        f"{tokens} image tokens = {m * grid.rows} x ({m * grid.cols} + 1 sub_GN) for {crops_label} "
        f"+ 1 glb_GN + {m} x ({m} + 1) for the global view",
    ]


@dataclass(frozen=True)
class TilingPreview:
    """A rendered preview with the facts it shows (tests and callers can locate every element)."""

    image: Image.Image
    grid: HDGrid
    layout: PreviewLayout
    caption: list[str]


def render_preview(
    image: ImageInput,
    cfg: PreprocessConfig,
    *,
    alpha: AlphaMode = "drop",
    exif_transpose: bool = False,
    max_side: int = 1024,
    name: str | None = None,
) -> TilingPreview:
    """A picture of how ``image`` is tiled for the model (``.image``), with the grid, layout and caption drawn.

    Left: the resized, white-padded HD image (:func:`phi3embed.core.preprocess.hd_image`, so exactly the
    pixels the crops are cut from), scaled down to fit ``max_side`` if larger, with the crop grid drawn
    and each crop numbered 1..n in row-major order, its position in ``pixel_values`` after the global view
    (0); its ``m x m`` tokens (``cfg.tokens_per_side``) land in token rows interleaved with its row
    neighbours'. The resized image's own extent is outlined in blue where white padding was added. Right:
    the global view (the model's bicubic crop of the normalised HD image, converted back to uint8; see
    :func:`global_view`). Below: a caption with the source size, grid, ``image_sizes`` and token count.
    Raises ImageError for unreadable images.
    """
    label = name or (os.fspath(image) if isinstance(image, (str, os.PathLike)) else None)
    img = open_image(image, name=label)
    with conversion_errors(label):
        rgb = to_rgb(img, alpha=alpha, exif_transpose=exif_transpose)
        grid, tokens = image_geometry(width=rgb.width, height=rgb.height, cfg=cfg)
        hd = hd_image(rgb, grid)
    glb = global_view(hd, cfg)
    crop_size = cfg.crop_size
    caption = _caption(
        grid,
        name=Path(label).name if label else None,
        num_crops=cfg.num_crops,
        tokens=tokens,
        tokens_per_side=cfg.tokens_per_side,
    )
    layout = preview_layout(grid, crop_size=crop_size, max_side=max_side, caption_lines=caption)

    canvas = Image.new("RGB", layout.size, _BACKGROUND)
    shown = hd if layout.scale == 1.0 else hd.resize(layout.hd_size, Image.Resampling.LANCZOS)
    canvas.paste(shown, layout.hd_origin)
    canvas.paste(glb, layout.global_origin)
    draw = ImageDraw.Draw(canvas)
    text_font = _font(layout.text_font_size)
    title_y = layout.hd_origin[1] - layout.text_font_size - 6
    draw.text(
        (layout.hd_origin[0], title_y),
        f"HD image {grid.out_w}x{grid.out_h}" + ("" if layout.scale == 1.0 else f" (shown at {layout.scale:.0%})"),
        fill=_TEXT,
        font=text_font,
    )
    draw.text((layout.global_origin[0], title_y), f"global view {crop_size}x{crop_size}", fill=_TEXT, font=text_font)
    _outline_content(draw, grid, layout)
    _draw_grid(draw, layout)
    gx, gy = layout.global_origin
    draw.rectangle((gx - 1, gy - 1, gx + layout.global_size, gy + layout.global_size), outline=_LINE, width=1)
    _badge(draw, (gx + 6, gy + 6), "G", _font(max(11, min(36, round(crop_size * 0.14)))))
    cx, cy = layout.caption_origin
    for i, line in enumerate(caption):
        draw.text((cx, cy + i * (layout.text_font_size + 6)), line, fill=_TEXT, font=text_font)
    return TilingPreview(image=canvas, grid=grid, layout=layout, caption=caption)


def _outline_content(draw: ImageDraw.ImageDraw, grid: HDGrid, layout: PreviewLayout) -> None:
    """Blue outline of the resized image where white padding surrounds it."""
    if grid.pad_top + grid.pad_bottom == 0:
        return
    s, (x0, y0) = layout.scale, layout.hd_origin
    if grid.transposed:  # padding was added left/right
        box = (grid.pad_top, 0, grid.pad_top + grid.resized_h, grid.resized_w)
    else:
        box = (0, grid.pad_top, grid.resized_w, grid.pad_top + grid.resized_h)
    left, top, right, bottom = (round(v * s) for v in box)
    draw.rectangle((x0 + left, y0 + top, x0 + right - 1, y0 + bottom - 1), outline=_CONTENT, width=1)


def _draw_grid(draw: ImageDraw.ImageDraw, layout: PreviewLayout) -> None:
    """Lines 3 px wide centred on every crop boundary (edges included), and crop numbers."""
    top, bottom = layout.row_y(0), layout.row_y(layout.rows)
    left, right = layout.col_x(0), layout.col_x(layout.cols)
    for c in range(layout.cols + 1):
        x = layout.col_x(c)
        draw.rectangle((x - 1, top - 1, x + 1, bottom + 1), fill=_LINE)
    for r in range(layout.rows + 1):
        y = layout.row_y(r)
        draw.rectangle((left - 1, y - 1, right + 1, y + 1), fill=_LINE)
    font = _font(layout.label_font_size)
    for r in range(layout.rows):
        for c in range(layout.cols):
            _badge(draw, (layout.col_x(c) + 6, layout.row_y(r) + 6), str(r * layout.cols + c + 1), font)


def _badge(draw: ImageDraw.ImageDraw, at: tuple[int, int], text: str, font: Any) -> None:
    x, y = at
    left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    pad = max(2, (bottom - top) // 5)
    draw.rectangle((left - pad, top - pad, right + pad, bottom + pad), fill=_LINE)
    draw.text((x, y), text, fill=(255, 255, 255), font=font)
