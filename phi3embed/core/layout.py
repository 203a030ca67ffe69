"""A checkpoint's layout in Hugging Face form: its file names, and which of its tensors the image path reads.

``model.vision_embed_tokens.wte.weight``, which a fine-tune re-saved from the official class can carry, is
an alias of the text table ``model.embed_tokens.weight`` (the official module registers the table as its
submodule ``wte``): it is not a vision tensor, never read for encoding, and the text table when the real
key is absent (:func:`select_keys`). Both the local reader (:mod:`phi3embed.core.checkpoint`) and the hub
(:mod:`phi3embed.core.hub`) choose tensors here.
"""

from __future__ import annotations

from collections.abc import Iterable

VISION_PREFIX = "model.vision_embed_tokens."
TEXT_EMBED_KEY = "model.embed_tokens.weight"
TIED_TEXT_ALIAS = VISION_PREFIX + "wte.weight"  # the same table, saved under the vision module's name
CONFIG_FILES = ("config.json", "preprocessor_config.json")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def is_vision_key(key: str) -> bool:
    """A tensor of the vision module (the ``wte`` alias of the text table is not one)."""
    return key.startswith(VISION_PREFIX) and key != TIED_TEXT_ALIAS


def select_keys(keys: Iterable[str], *, vision: bool, text: bool) -> set[str]:
    """The keys to read among a checkpoint's ``keys``: the vision tensors (never the ``wte`` alias) and/or the
    text table (``model.embed_tokens.weight``, else its alias ``model.vision_embed_tokens.wte.weight``)."""
    present = set(keys)
    chosen = {k for k in present if is_vision_key(k)} if vision else set()
    if text:
        table = TEXT_EMBED_KEY if TEXT_EMBED_KEY in present else TIED_TEXT_ALIAS
        if table in present:
            chosen.add(table)
    return chosen
