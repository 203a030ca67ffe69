"""The cost model (phi3embed.core.cost) against torch's own FLOP counter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_128K
from torch.utils.flop_counter import FlopCounterMode

from phi3embed.core.config import ClipConfig, PreprocessConfig, VisionConfig, vision_config_from_dict
from phi3embed.core.cost import crop_flops, image_flops, token_flops
from phi3embed.core.model import Phi3VisionModel
from phi3embed.core.preprocess import preprocess_image


def _tiny_vision(golden: Path) -> VisionConfig:
    return vision_config_from_dict(json.loads((golden / "checkpoints" / TINY_128K / "config.json").read_text()))


def _counted_flops(model: torch.nn.Module, pixel_values: torch.Tensor, grids: list[tuple[int, int]]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(pixel_values, grids)
    return int(counter.get_total_flops())


def test_flop_formula_equals_torch_count_on_tiny_model(golden: Path) -> None:
    vision = _tiny_vision(golden)
    image = golden / "images" / "photo_1000x750.jpg"
    pre = preprocess_image(image, PreprocessConfig(num_crops=4))
    grids = [(pre.grid.rows, pre.grid.cols)]
    torch.manual_seed(0)
    model = Phi3VisionModel(vision, attn="eager").eval()
    counted = _counted_flops(model, pre.pixel_values, grids)
    # exact: the formula counts what torch counts (patch convolution, linear layers, both attention products)
    assert image_flops(vision, rows=pre.grid.rows, cols=pre.grid.cols) == counted


@pytest.mark.parametrize("full_depth", [False, True])
def test_flop_formula_at_real_size(full_depth: bool) -> None:
    """ViT-L/14-336 on the meta device (no memory, no compute): 23 layers for layer_idx -2, or all 24."""
    vision = VisionConfig()
    with torch.device("meta"):
        model = Phi3VisionModel(vision, full_depth=full_depth, attn="eager")
        crop = torch.empty(1, 3, 336, 336)
    counter = FlopCounterMode(display=False)
    with counter:
        model.crop_features(crop)
    layers = vision.clip.num_hidden_layers if full_depth else vision.layers_needed
    assert layers == (24 if full_depth else 23)
    assert crop_flops(vision.clip, layers=layers) == counter.get_total_flops()
    gflop = crop_flops(vision.clip, layers=layers) / 1e9
    assert gflop == pytest.approx(381.92 if full_depth else 366.03, abs=0.01)


def test_projection_flops_per_token() -> None:
    assert token_flops(VisionConfig()) == 2 * (4096 * 3072 + 3072 * 3072)
    assert token_flops(VisionConfig(projection_cls="linear")) == 2 * 4096 * 3072
    assert crop_flops(ClipConfig(), layers=0) == 2 * 576 * 588 * 1024  # the patch embedding alone
