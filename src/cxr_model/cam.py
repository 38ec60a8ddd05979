"""Class activation maps for every label from a single forward pass.

DenseNet121 ends in ReLU -> global average pooling -> linear, so for label c

    logit_c = mean_xy( sum_k w_ck F_k(x, y) ) + b_c

and CAM_c = ReLU( sum_k w_ck F_k ), F = output of ``class_layers.relu``.
Grad-CAM on the same layer weights the channels with the spatial mean of
d logit_c / d F_k = w_ck / (h w), i.e. it is the same map divided by h w: the
CAM is Grad-CAM without a backward pass, for all labels at once.

Maps are normalised by dividing by their maximum (an all-zero map stays
zero), so 1 = strongest evidence and 0 = none.  MONAI's default Grad-CAM
normaliser maps max -> 0 and min -> 1 (it inverts the map); it is never used.
"""

from __future__ import annotations

import numpy as np
import torch

from .preprocess import Geometry, to_image_grid


def raw_cams(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) features and (C, K) classifier weight -> (B, C, h, w) non-negative maps."""
    return torch.relu(torch.einsum("ck,bkhw->bchw", weight.float(), features.float()))


def normalize_max(maps: torch.Tensor) -> torch.Tensor:
    """Divide each non-negative (.., H, W) map by its maximum, in place; all-zero maps stay zero."""
    peak = maps.flatten(-2).amax(-1)[..., None, None]
    return maps.div_(peak.clamp_min(torch.finfo(maps.dtype).tiny)).clamp_(0.0, 1.0)


def cams_for_image(raw: torch.Tensor, geo: Geometry) -> np.ndarray:
    """(C, h, w) raw maps of one image -> (C, H, W) float32 in [0, 1] on the original image grid."""
    mapped = to_image_grid(raw, geo).clamp_min_(0.0)  # bilinear keeps it >= 0; guards rounding
    return normalize_max(mapped).numpy()
