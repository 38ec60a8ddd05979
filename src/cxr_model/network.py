"""The MONAI DenseNet121 and a wrapper that also returns the CAM feature map."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from monai.networks.nets import DenseNet121
from torch import nn

from .card import ModelCard, sha256_file
from .errors import ModelError

#: the state-dict key of the final linear layer (rows = labels).
CLASSIFIER_WEIGHT = "class_layers.out.weight"
CLASSIFIER_BIAS = "class_layers.out.bias"
#: the module whose output is the feature map F_k used by CAM and Grad-CAM.
CAM_LAYER = "class_layers.relu"


def build_network(in_channels: int, out_channels: int) -> DenseNet121:
    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=out_channels)


class LogitsAndFeatures(nn.Module):
    """Runs DenseNet121 once and returns (logits, F) with F = output of ``class_layers.relu``.

    ``logits = class_layers.out(flatten(pool(F)))`` exactly as MONAI's own
    forward computes it, so the two outputs are consistent by construction.
    """

    def __init__(self, net: DenseNet121) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cl = self.net.class_layers
        feats = cl.relu(self.net.features(x))
        logits = cl.out(cl.flatten(cl.pool(feats)))
        return logits, feats


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a plain tensor state dict safely (``weights_only=True``), cast to float32."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load weights {path} as a plain state dict: {exc}") from exc
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights {path} are not a plain state dict of tensors")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in obj.items()}


def load_network(model_dir: str | os.PathLike[str], card: ModelCard) -> DenseNet121:
    """Build the network described by ``card`` and load its verified weights (eval mode, float32)."""
    path = Path(model_dir) / card.weights_file
    if not path.is_file():
        raise ModelError(f"weights file {card.weights_file!r} named by the model card is missing from {Path(model_dir)}")
    digest = sha256_file(path)
    if digest != card.weights_sha256:
        raise ModelError(
            f"SHA-256 mismatch for {path}: model card says {card.weights_sha256}, file is {digest}; "
            "the weights are not the ones the card describes"
        )
    state = read_state_dict(path)
    w = state.get(CLASSIFIER_WEIGHT)
    if w is None or w.ndim != 2:
        raise ModelError(f"weights {path} have no {CLASSIFIER_WEIGHT!r} matrix; not a MONAI DenseNet121 state dict")
    if w.shape[0] != len(card.labels):
        raise ModelError(
            f"label mismatch: model card lists {len(card.labels)} labels but the weights have "
            f"{w.shape[0]} outputs ({path})"
        )
    conv0 = state.get("features.conv0.weight")
    if conv0 is not None and conv0.shape[1] != card.in_channels:
        raise ModelError(
            f"input channel mismatch: model card says in_channels={card.in_channels} but the weights' "
            f"first convolution takes {conv0.shape[1]}"
        )
    net = build_network(card.in_channels, len(card.labels))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"weights {path} do not fit monai DenseNet121: {exc}") from exc
    return net.eval()
