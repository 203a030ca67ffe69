"""How crops travel to the encoder: uint8 tiles normalised on the device by table lookup, float32 global view.

The values must be the reference's bits (the golden sha256 checks in test_parity.py run through this
representation too); these tests pin the pieces down on inputs the golden set does not cover.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from phi3embed.core.batching import HostCopier, _Assembler
from phi3embed.core.config import PreprocessConfig
from phi3embed.core.preprocess import (
    Preprocessed,
    global_crop,
    hd_image,
    normalization_table,
    normalize,
    normalize_tiles,
    preprocess_rgb,
    tile_pixels,
)

S = 336
ODD_MEAN, ODD_STD = (0.5, 0.25, 0.125), (0.3, 0.7, 0.11)  # not CLIP's: a table per normalisation


def _reference_crops(hd: np.ndarray, cfg: PreprocessConfig) -> torch.Tensor:
    """The reference's arithmetic: normalise the whole float image, bicubic global view, then cut tiles."""
    x = normalize(hd, mean=cfg.image_mean, std=cfg.image_std)  # (3, H', W')
    c, h, w = x.shape
    tiles = x.view(c, h // S, S, w // S, S).permute(1, 3, 0, 2, 4).reshape(-1, c, S, S)
    return torch.cat([global_crop(x, crop_size=S), tiles])


@pytest.mark.parametrize(
    ("mean", "std"), [(PreprocessConfig().image_mean, PreprocessConfig().image_std), (ODD_MEAN, ODD_STD)]
)
def test_table_gives_the_arithmetic_bits_for_every_value(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    values = np.arange(256, dtype=np.uint8)
    image = np.stack([values, values[::-1], np.roll(values, 77)], axis=-1)[None]  # (1, 256, 3): each value per channel
    expected = normalize(image, mean=mean, std=std)  # (3, 1, 256)
    tiles = torch.from_numpy(image.transpose(2, 0, 1).copy())[None]  # (1, 3, 1, 256) uint8
    got = normalize_tiles(tiles, normalization_table(mean, std))[0]
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))  # bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_and_device_lookups_agree_in_every_dtype(dtype: torch.dtype) -> None:
    """numpy's take on the CPU, index_select on CUDA: the same table entries, whatever the dtype."""
    from phi3embed.core.preprocess import _lookup_numpy, _lookup_torch

    tiles = torch.randint(0, 256, (3, 3, 17, 19), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    table = normalization_table(ODD_MEAN, ODD_STD).to(dtype)
    expected = torch.stack([table[c][tiles[:, c].long()] for c in range(3)], dim=1)  # plain indexing
    for got in (_lookup_numpy(tiles, table), _lookup_torch(tiles, table), normalize_tiles(tiles, table)):
        assert got.dtype == dtype and torch.equal(got, expected)


def test_tiles_and_global_view_equal_the_reference_crops() -> None:
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 256, size=(700, 1100, 3), dtype=np.uint8))  # 3 x 4 tiles after HD
    cfg = PreprocessConfig(num_crops=16)
    item = preprocess_rgb(rgb, cfg)
    assert item.tiles.dtype == torch.uint8 and item.global_view.dtype == torch.float32
    assert (item.grid.rows, item.grid.cols) == (3, 4)
    hd = np.asarray(hd_image(rgb, item.grid))
    assert torch.equal(item.pixel_values, _reference_crops(hd, cfg))
    # row-major: tile k is rows [r*S, (r+1)*S) and columns [c*S, (c+1)*S) of the HD image
    for k in (0, 3, 5, item.tiles.shape[0] - 1):
        r, c = divmod(k, item.grid.cols)
        assert np.array_equal(item.tiles[k].permute(1, 2, 0).numpy(), hd[r * S : (r + 1) * S, c * S : (c + 1) * S])
    # a quarter of the float bytes, plus the float global view
    nbytes = item.tiles.nbytes + item.global_view.nbytes
    assert nbytes * 3 < item.pixel_values.nbytes


def _items() -> list[Preprocessed]:
    rng = np.random.default_rng(3)
    sizes = [(400, 300), (336, 336), (1300, 500), (500, 900)]
    cfgs = [PreprocessConfig(num_crops=4), PreprocessConfig(num_crops=4, image_mean=ODD_MEAN, image_std=ODD_STD)]
    out = []
    for i, (w, h) in enumerate(sizes):
        rgb = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        out.append(preprocess_rgb(rgb, cfgs[i % 2]))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_assembled_batches_equal_the_concatenated_crops(dtype: torch.dtype) -> None:
    """Any cut of the crop sequence (across images, splitting images, mixed normalisations) -> the same rows."""
    items = _items()
    assemble = _Assembler(torch.device("cpu"), dtype)
    everything = torch.cat([it.pixel_values for it in items]).to(dtype)
    ranges = [(it, i) for it in items for i in range(it.num_real_crops)]
    for batch in (1, 2, 3, 5, len(ranges)):
        rows = []
        for start in range(0, len(ranges), batch):
            chunk = ranges[start : start + batch]
            pieces = []  # consecutive crops of one item -> one piece
            for item, crop in chunk:
                if pieces and pieces[-1][0] is item and pieces[-1][1] + pieces[-1][2] == crop:
                    pieces[-1] = (item, pieces[-1][1], pieces[-1][2] + 1)
                else:
                    pieces.append((item, crop, 1))
            out = assemble(pieces)
            assert out.dtype == dtype and out.shape[0] == len(chunk)
            rows.append(out)
        assert torch.equal(torch.cat(rows), everything), batch


def test_tile_pixels_keeps_uint8_and_the_row_order() -> None:
    hd = np.zeros((2 * S, S, 3), dtype=np.uint8)
    hd[S:] = 255
    tiles = tile_pixels(hd, crop_size=S)
    assert tiles.shape == (2, 3, S, S) and tiles.dtype == torch.uint8
    assert int(tiles[0].max()) == 0 and int(tiles[1].min()) == 255


def test_host_copier_on_cpu_converts_and_hands_back_at_once() -> None:
    x = torch.randn(5, 7)
    result = HostCopier(torch.device("cpu")).start(x, torch.bfloat16)
    got = result.wait()
    assert got.dtype == torch.bfloat16 and got.device.type == "cpu"
    assert torch.equal(got, x.to(torch.bfloat16))
