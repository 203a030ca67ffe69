"""The benchmark scripts' FLOP counts, in the form they call: the formulas are ``phi3embed.core.cost``'s.

``image_flops`` here takes the crops and tokens a run actually encoded (padding crops included on the plain
path), where the library's counts one image's real crops from its grid.
"""

from __future__ import annotations

from phi3embed.core import cost
from phi3embed.core.config import VisionConfig


def crop_flops(cfg: VisionConfig, *, layers: int) -> int:
    """FLOPs of one crop through the patch embedding and ``layers`` encoder layers."""
    return cost.crop_flops(cfg.clip, layers=layers)


def image_flops(cfg: VisionConfig, *, crops: int, tokens: int, layers: int) -> int:
    """FLOPs to embed one image: ``crops`` crops through ``layers`` layers, then the projection of ``tokens``."""
    return crops * cost.crop_flops(cfg.clip, layers=layers) + tokens * cost.token_flops(cfg)
