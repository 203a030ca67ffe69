"""Which intermediate of the pipeline an encode stores, and its shape (docs/pipeline.md §9-§11).

* ``projected`` (default): the image tokens the language model sees, ``[T, D]`` (§11);
* ``hd``: the same tokens before the projection, merged 2x2 with the separators in place, ``[T, 4C]`` (§10);
* ``clip``: CLIP hidden state ``layer_idx`` of the real crops, CLS dropped, ``[1 + rows*cols, g*g, C]``,
  crop 0 the global view (§9).

Each is what :class:`phi3embed.core.model.Phi3VisionModel` computes on its way to the next one
(``crop_features`` -> ``tokens`` -> ``project``); this module only names them and states their shapes.
"""

from __future__ import annotations

from typing import Literal, cast

from phi3embed.core.config import VisionConfig
from phi3embed.errors import ConfigError

Stage = Literal["projected", "hd", "clip"]
STAGES: tuple[Stage, ...] = ("projected", "hd", "clip")
DEFAULT_STAGE: Stage = "projected"


def parse_stage(value: str) -> Stage:
    """``"projected"``, ``"hd"`` or ``"clip"``; anything else is a ConfigError."""
    if value not in STAGES:
        raise ConfigError(f"stage {value!r} is not one of {', '.join(STAGES)}")
    return cast(Stage, value)


def stage_shape(stage: Stage, *, rows: int, cols: int, cfg: VisionConfig) -> tuple[int, ...]:
    """The shape of one image's output at ``stage``, for a ``rows x cols`` crop grid."""
    from phi3embed.core.hd import num_image_tokens  # torch: the stage names above stay light for --help

    if stage == "clip":
        return (1 + rows * cols, cfg.clip.grid**2, cfg.clip.hidden_size)
    tokens = num_image_tokens(rows=rows, cols=cols, tokens_per_side=cfg.tokens_per_side)
    return (tokens, cfg.merged_dim if stage == "hd" else cfg.lm_hidden_size)
