"""Writing a model directory: weights + ``model_card.json``, atomically and reproducibly."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .card import ModelCard, sha256_file, write_bytes_atomic, write_card

WEIGHTS_FILE = "weights.pt"


def write_model_dir(
    out_dir: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    *,
    weights_dtype: str = "float32",
    weights_file: str = WEIGHTS_FILE,
    **card_fields: Any,
) -> ModelCard:
    """Save ``state_dict`` (floating tensors cast to ``weights_dtype``) and a card describing it.

    ``card_fields`` are the remaining :class:`ModelCard` fields (name, version,
    labels, ...); the weights' file name, SHA-256 and dtype are filled in here.
    The weights are serialised through a buffer so the same tensors always give
    the same bytes (and hash).
    """
    dtype = {"float32": torch.float32, "float16": torch.float16}[weights_dtype]
    state = {
        k: (v.detach().cpu().to(dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in state_dict.items()
    }
    out = Path(out_dir)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(out / weights_file, buf.getvalue())
    card = ModelCard(
        weights_file=weights_file,
        weights_sha256=sha256_file(out / weights_file),
        weights_dtype=weights_dtype,
        **card_fields,
    )
    write_card(card, out)
    return card
