"""Compute cost of the image-token path, from the config's dimensions (``plan``, ``info``, benchmarks).

A multiply-add counts as 2 FLOP; norms, softmax, activations and biases are not counted, as
``torch.utils.flop_counter`` does not count them (tests/test_cost.py checks the formulas against it).
"""

from __future__ import annotations

from phi3embed.core.config import ClipConfig, VisionConfig
from phi3embed.core.hd import num_image_tokens


def crop_flops(clip: ClipConfig, *, layers: int) -> int:
    """FLOP of the CLIP vision encoder on one crop, running its first ``layers`` layers.

    With ``g = image_size / patch_size``, ``N = g*g + 1`` tokens (CLS included), width ``C``, MLP width ``I``,
    ``k = num_channels * patch_size**2``::

        patch embedding (conv)        2 * g*g * k * C
        per layer  Q, K, V, out proj  2 * N * C * 4C   = 8 N C^2
                   scores Q K^T       2 * N^2 * C
                   weighted sum A V   2 * N^2 * C
                   MLP fc1 + fc2      2 * N * C * I * 2 = 4 N C I
        crop = 2 g^2 k C + layers * (8 N C^2 + 4 N^2 C + 4 N C I)

    ViT-L/14-336 (N = 577, C = 1024, I = 4096): 366.03 GFLOP with the 23 layers the fast path runs for
    ``layer_idx = -2``, 381.92 GFLOP with all 24.
    """
    g = clip.grid
    n = clip.tokens
    c, i = clip.hidden_size, clip.intermediate_size
    patch = 2 * g * g * clip.num_channels * clip.patch_size**2 * c
    per_layer = 8 * n * c * c + 4 * n * n * c + 4 * n * c * i
    return patch + layers * per_layer


def token_flops(vision: VisionConfig) -> int:
    """FLOP of the projection on one image token: ``2 (4C D + D D)`` for the MLP, ``2 * 4C D`` for linear."""
    d4, d = vision.merged_dim, vision.lm_hidden_size
    return 2 * (d4 * d + d * d) if vision.projection_cls == "mlp" else 2 * d4 * d


def image_flops(vision: VisionConfig, *, rows: int, cols: int) -> int:
    """FLOP of one image on the fast path: CLIP on its ``1 + rows*cols`` real crops, projection on its tokens."""
    tokens = num_image_tokens(rows=rows, cols=cols, tokens_per_side=vision.tokens_per_side)
    return (1 + rows * cols) * crop_flops(vision.clip, layers=vision.layers_needed) + tokens * token_flops(vision)
