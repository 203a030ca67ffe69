"""FLOP counts of the image-token path (multiply-add = 2 FLOPs), from the config's dimensions.

CLIP encoder layer on ``N = g*g + 1`` tokens of width ``C`` with MLP width ``M``:

* q, k, v, out projections: ``4 * 2*N*C*C``
* attention scores ``Q K^T`` and ``softmax(.) V`` (all heads together): ``2 * 2*N*N*C``
* MLP fc1 + fc2: ``2 * 2*N*C*M``

For CLIP ViT-L/14-336 (N = 577, C = 1024, M = 4096) that is 15.885 GFLOP per layer: 381.2 GFLOP for all
24 layers, 365.4 GFLOP for the 23 layers Phi-3-V needs (hidden state -2). Layer norms, softmax, biases
and activations are O(N*C) and left out (< 0.5 %). The patch embedding adds ``2 * g*g * C * 3*p*p``
(0.69 GFLOP per crop). The projection costs ``2*T*(4C*D + D*D)`` for ``T`` image tokens (mlp projection;
``2*T*4C*D`` for a linear one).
"""

from __future__ import annotations

from phi3embed.core.config import VisionConfig


def clip_layer_flops(cfg: VisionConfig) -> int:
    """FLOPs of one encoder layer on one crop."""
    c = cfg.clip
    n = c.grid * c.grid + 1
    d, m = c.hidden_size, c.intermediate_size
    return 4 * 2 * n * d * d + 2 * 2 * n * n * d + 2 * 2 * n * d * m


def patch_embed_flops(cfg: VisionConfig) -> int:
    c = cfg.clip
    return 2 * c.grid * c.grid * c.hidden_size * c.num_channels * c.patch_size * c.patch_size


def crop_flops(cfg: VisionConfig, *, layers: int) -> int:
    """FLOPs of one crop through the patch embedding and ``layers`` encoder layers."""
    return patch_embed_flops(cfg) + layers * clip_layer_flops(cfg)


def projection_flops(cfg: VisionConfig, *, tokens: int) -> int:
    d4, d = cfg.merged_dim, cfg.lm_hidden_size
    if cfg.projection_cls == "mlp":
        return 2 * tokens * (d4 * d + d * d)
    return 2 * tokens * d4 * d


def image_flops(cfg: VisionConfig, *, crops: int, tokens: int, layers: int) -> int:
    """FLOPs to embed one image: ``crops`` crops through ``layers`` layers, then the projection of ``tokens``."""
    return crops * crop_flops(cfg, layers=layers) + projection_flops(cfg, tokens=tokens)
