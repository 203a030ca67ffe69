"""What the outputs store: the tensor key of a per-image file and the dtypes an embedding can have.

Both writers (:mod:`phi3embed.outputs.files`, :mod:`phi3embed.outputs.packs`) write through
:func:`phi3embed.core.safetensors_io.write_safetensors`, so a file's bytes depend only on its tensors, their
order and the metadata.
"""

from __future__ import annotations

import torch

EMBED_KEY = "image_embeds"  # the tensor key of a per-image safetensors file

OUTPUT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]
