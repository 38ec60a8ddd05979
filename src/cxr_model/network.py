"""The MONAI DenseNet121 and a wrapper that also returns the CAM feature map.

A model that takes metadata (age, sex, view; :mod:`cxr_model.metadata`) is
the same DenseNet121 with one more bias-free linear layer, ``metadata_out``,
whose output is added to the classifier's:

    logit_c = sum_k w_ck mean_xy F_k + b_c + sum_j v_cj m_j

which is one linear layer over [pooled features ++ metadata] with weight
[W | V], stored as its two blocks: ``class_layers.out.weight`` (W, the
image-feature columns, the only ones the CAM uses) and ``metadata_out.weight``
(V).  The metadata term is a per-image constant in the logit and never part
of the spatial map.  Every other state-dict key is the plain DenseNet121's,
so backbones, importers and CAM code are shared with image-only models.
"""

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
#: the metadata columns of the classifier (rows = labels), present only in models that take metadata.
METADATA_WEIGHT = "metadata_out.weight"
#: the module whose output is the feature map F_k used by CAM and Grad-CAM.
CAM_LAYER = "class_layers.relu"


class DenseNet121WithMetadata(DenseNet121):
    """DenseNet121 whose logits also take a metadata vector: ``forward(x, metadata)``.

    ``metadata_out`` starts at zero, so a fresh one leaves the image model's
    outputs as they were until training moves it.
    """

    def __init__(self, in_channels: int, out_channels: int, metadata_features: int) -> None:
        super().__init__(spatial_dims=2, in_channels=in_channels, out_channels=out_channels)
        self.metadata_out = nn.Linear(metadata_features, out_channels, bias=False)
        nn.init.zeros_(self.metadata_out.weight)

    def forward(self, x: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.class_layers(self.features(x)) + self.metadata_out(metadata.to(x.dtype))


def build_network(in_channels: int, out_channels: int, metadata_features: int = 0) -> DenseNet121:
    """MONAI DenseNet121; with ``metadata_features`` > 0 the variant that also takes a metadata vector."""
    if metadata_features:
        return DenseNet121WithMetadata(in_channels, out_channels, metadata_features)
    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=out_channels)


def takes_metadata(net: torch.nn.Module) -> bool:
    return isinstance(net, DenseNet121WithMetadata)


class LogitsAndFeatures(nn.Module):
    """Runs DenseNet121 once and returns (logits, F) with F = output of ``class_layers.relu``.

    ``logits = class_layers.out(flatten(pool(F)))`` exactly as MONAI's own
    forward computes it, so the two outputs are consistent by construction;
    a network with metadata adds ``metadata_out(metadata)`` (required then,
    refused otherwise), which leaves F as it is.
    """

    def __init__(self, net: DenseNet121) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, metadata: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        cl = self.net.class_layers
        feats = cl.relu(self.net.features(x))
        logits = cl.out(cl.flatten(cl.pool(feats)))
        if takes_metadata(self.net):
            if metadata is None:
                raise ModelError("this network takes metadata inputs; none were given")
            logits = logits + self.net.metadata_out(metadata.to(logits.dtype))
        elif metadata is not None:
            raise ModelError("metadata given to a network without metadata inputs")
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
    v = state.get(METADATA_WEIGHT)
    if card.takes_metadata and (v is None or tuple(v.shape) != (len(card.labels), card.metadata_features)):
        raise ModelError(
            f"model card says the network takes {card.metadata_features} metadata input(s) but the weights "
            f"have {'no ' + repr(METADATA_WEIGHT) if v is None else f'a {tuple(v.shape)} {METADATA_WEIGHT!r}'} ({path})"
        )
    if not card.takes_metadata and v is not None:
        raise ModelError(
            f"the weights {path} have metadata inputs ({METADATA_WEIGHT!r}) but the model card records none "
            "(no 'metadata_inputs')"
        )
    conv0 = state.get("features.conv0.weight")
    if conv0 is not None and conv0.shape[1] != card.in_channels:
        raise ModelError(
            f"input channel mismatch: model card says in_channels={card.in_channels} but the weights' "
            f"first convolution takes {conv0.shape[1]}"
        )
    net = build_network(card.in_channels, len(card.labels), card.metadata_features)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"weights {path} do not fit monai DenseNet121: {exc}") from exc
    return net.eval()
