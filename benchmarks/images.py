"""Procedurally generated benchmark images (gradients + noise + shapes), written once under .bench-cache/.

Photo-like content matters for decode and resize cost (JPEG entropy, PNG compression), not for the encoder,
whose cost depends only on the crop grid. Sizes cover the common shapes: a 12 MP phone photo, a small
photo, a 16:9 screenshot, a portrait and a panorama.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
IMAGE_DIR = REPO / ".bench-cache" / "images"


@dataclass(frozen=True)
class BenchImage:
    name: str
    width: int
    height: int
    fmt: str  # "JPEG" or "PNG"
    photo: bool  # part of the "photo set" the speed targets refer to

    @property
    def filename(self) -> str:
        return f"{self.name}_{self.width}x{self.height}.{'jpg' if self.fmt == 'JPEG' else 'png'}"


IMAGES = (
    BenchImage("photo12mp", 4032, 3024, "JPEG", photo=True),
    BenchImage("photo", 1024, 768, "JPEG", photo=True),
    BenchImage("screen", 1920, 1080, "PNG", photo=False),
    BenchImage("portrait", 600, 1400, "PNG", photo=False),
    BenchImage("panorama", 3000, 200, "JPEG", photo=False),
)


def render(spec: BenchImage, seed: int = 0) -> Image.Image:
    """A deterministic photo-like RGB image: smooth gradients, smooth noise, fine grain and shapes."""
    rng = np.random.default_rng(seed + spec.width * 7 + spec.height)
    w, h = spec.width, spec.height
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
    base = np.stack(
        [0.5 + 0.4 * np.sin(3 * x + 2 * y), 0.4 + 0.3 * np.cos(4 * y - x), 0.3 + 0.3 * x * y], axis=-1
    )  # (h, w, 3)
    # Smooth low-frequency noise: a small random field upsampled bicubically by Pillow.
    small = (rng.random((max(2, h // 64), max(2, w // 64), 3)) * 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    grain = rng.normal(0.0, 0.03, size=(h, w, 3)).astype(np.float32)
    arr = np.clip((0.6 * base + 0.4 * smooth + grain) * 255, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(24):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 40 + 1, w // 4 + 2)), y0 + int(rng.integers(h // 40 + 1, h // 4 + 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.rectangle((x0, y0, x1, y1), outline=color, width=max(1, min(w, h) // 100))
    return img


def ensure_images(names: list[str] | None = None, directory: Path = IMAGE_DIR) -> list[tuple[BenchImage, Path]]:
    """Write the images that are not cached yet; return (spec, path) for the selected ones, in table order."""
    chosen = [s for s in IMAGES if names is None or s.name in names]
    unknown = set(names or ()) - {s.name for s in IMAGES}
    if unknown:
        raise SystemExit(f"unknown image names {sorted(unknown)}; choose from {[s.name for s in IMAGES]}")
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for spec in chosen:
        path = directory / spec.filename
        if not path.is_file():
            tmp = path.with_suffix(".partial")
            img = render(spec)
            if spec.fmt == "JPEG":
                img.save(tmp, "JPEG", quality=90)
            else:
                img.save(tmp, "PNG")
            tmp.replace(path)
        out.append((spec, path))
    return out
