"""Feature HD transform as pure tensor functions (docs/pipeline.md §10), and the token-count formula (§8).

Nothing here knows the model size: widths and grid sides come from the tensors.
"""

from __future__ import annotations

import torch


def num_image_tokens(*, rows: int, cols: int, tokens_per_side: int) -> int:
    """Tokens of one image with a ``rows x cols`` crop grid.

    ``tokens_per_side`` (``m``) is the side of one crop's token grid after the 2x2 merge, from the config
    (``VisionConfig.tokens_per_side``: 12 for 336 px crops of 14 px patches). ``m * rows`` lines of
    ``m * cols + 1`` tokens (the +1 is ``sub_GN``), one ``glb_GN``, then the global view's ``m`` lines of
    ``m + 1`` tokens.
    """
    m = tokens_per_side
    return m * rows * (m * cols + 1) + 1 + m * (m + 1)


def merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """Concatenate each 2x2 block of patches. ``[N, g*g, C] -> [N, g/2, g/2, 4C]``.

    Channel order inside a merged token: (row offset, column offset) = (0,0), (0,1), (1,0), (1,1).
    """
    n, p, c = features.shape
    g = int(round(p**0.5))
    assert g * g == p and g % 2 == 0, f"patch count {p} is not an even square"
    h = g // 2
    return (
        features.reshape(n, h, 2, h, 2, c)  # (N, i, a, j, b, C)
        .permute(0, 1, 3, 2, 4, 5)  # (N, i, j, a, b, C)
        .reshape(n, h, h, 4 * c)  # (N, g/2, g/2, 4C)
    )


def grid_with_newlines(merged: torch.Tensor, *, rows: int, cols: int, sub_gn: torch.Tensor) -> torch.Tensor:
    """Place merged crops on their grid and end every token row with ``sub_GN``.

    ``merged``: ``[rows*cols, m, m, D4]`` (row-major crops); ``sub_gn``: ``[D4]``.
    Returns ``[rows*m * (cols*m + 1), D4]``.
    """
    n, m, _, d4 = merged.shape
    assert n == rows * cols, (n, rows, cols)
    grid = (
        merged.reshape(rows, cols, m, m, d4)  # (rows, cols, i, j, D4)
        .permute(0, 2, 1, 3, 4)  # (rows, i, cols, j, D4)
        .reshape(rows * m, cols * m, d4)  # (rows*m, cols*m, D4)
    )
    newline = sub_gn.reshape(1, 1, d4).expand(rows * m, 1, d4)  # (rows*m, 1, D4)
    return torch.cat([grid, newline], dim=1).reshape(-1, d4)  # (rows*m * (cols*m+1), D4)


def image_tokens(
    features: torch.Tensor,
    *,
    rows: int,
    cols: int,
    sub_gn: torch.Tensor,
    glb_gn: torch.Tensor,
    order: str = "sub_glb",
) -> torch.Tensor:
    """All tokens of one image before projection.

    ``features``: ``[1 + rows*cols, g*g, C]`` (crop 0 = global view); ``sub_gn``, ``glb_gn``: ``[4C]``.
    Returns ``[T, 4C]``: ``[sub tokens; glb_GN; global tokens]`` for ``sub_glb`` (the released order) or
    ``[global tokens; glb_GN; sub tokens]`` for ``glb_sub``.
    """
    merged = merge_2x2(features)  # (1+n, m, m, 4C)
    glb = grid_with_newlines(merged[:1], rows=1, cols=1, sub_gn=sub_gn)  # (m*(m+1), 4C)
    sub = grid_with_newlines(merged[1:], rows=rows, cols=cols, sub_gn=sub_gn)  # (rows*m*(cols*m+1), 4C)
    sep = glb_gn.reshape(1, -1)  # (1, 4C)
    parts = [sub, sep, glb] if order == "sub_glb" else [glb, sep, sub]
    return torch.cat(parts, dim=0)
