"""The feature HD transform as pure tensor functions (docs/pipeline.md §10), on hand-checkable inputs."""

from __future__ import annotations

import torch

from phi3embed.core.hd import grid_with_newlines, image_tokens, merge_2x2, num_image_tokens


def test_merge_2x2_channel_order() -> None:
    g, c = 4, 3
    feats = torch.arange(g * g * c, dtype=torch.float32).reshape(1, g * g, c)  # patch p has channels 3p..3p+2
    merged = merge_2x2(feats)
    assert merged.shape == (1, 2, 2, 4 * c)
    patch = lambda r, col: feats[0, r * g + col]  # noqa: E731
    for i in range(2):
        for j in range(2):
            expected = torch.cat(
                [patch(2 * i, 2 * j), patch(2 * i, 2 * j + 1), patch(2 * i + 1, 2 * j), patch(2 * i + 1, 2 * j + 1)]
            )
            assert torch.equal(merged[0, i, j], expected)


def test_grid_places_crops_row_major_and_appends_newline() -> None:
    rows, cols, m, d = 2, 3, 2, 1
    merged = torch.arange(rows * cols, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, m, m, d)  # crop id
    sub = torch.tensor([-1.0])
    out = grid_with_newlines(merged, rows=rows, cols=cols, sub_gn=sub).reshape(rows * m, cols * m + 1)
    expected_row0 = [0, 0, 1, 1, 2, 2, -1]
    expected_row2 = [3, 3, 4, 4, 5, 5, -1]
    assert out[0].tolist() == expected_row0 and out[1].tolist() == expected_row0
    assert out[2].tolist() == expected_row2 and out[3].tolist() == expected_row2


def test_token_layout_and_count() -> None:
    rows, cols, g, c = 2, 3, 24, 2
    feats = torch.randn(1 + rows * cols, g * g, c)
    sub, glb = torch.full((4 * c,), 7.0), torch.full((4 * c,), 9.0)
    sub_glb = image_tokens(feats, rows=rows, cols=cols, sub_gn=sub, glb_gn=glb, order="sub_glb")
    n_sub = 12 * rows * (12 * cols + 1)
    assert sub_glb.shape == (num_image_tokens(rows=rows, cols=cols, tokens_per_side=g // 2), 4 * c)
    assert sub_glb.shape[0] == (rows * cols + 1) * 144 + 1 + (rows + 1) * 12  # docs/pipeline.md §8
    assert torch.equal(sub_glb[n_sub], glb)
    assert torch.equal(sub_glb[12 * cols], sub)  # end of the first token row is the newline
    glb_sub = image_tokens(feats, rows=rows, cols=cols, sub_gn=sub, glb_gn=glb, order="glb_sub")
    assert torch.equal(glb_sub[156], glb)
    assert torch.equal(glb_sub[:156], sub_glb[n_sub + 1 :])
    assert torch.equal(glb_sub[157:], sub_glb[:n_sub])
