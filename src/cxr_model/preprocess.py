"""Turn a display-ready 2-D radiograph into the network's input, and back.

Input contract: a 2-D array of shape (H, W), values in [0, 1], where 1 is the
brightest displayed value (bone, white) and 0 is black (air).  DICOM LUTs and
MONOCHROME1 inversion are applied by the caller before this point.

The image is resized with its aspect ratio kept so that its longer side equals
``card.input_size``, centred, and padded with black (0 in the [0, 1] domain,
*before* normalisation, so that the padding looks like air to the network
whatever the normalisation).  :class:`Geometry` records where the image went
so that maps computed on the network input can be mapped back onto the
original pixel grid with :func:`to_image_grid`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .card import ModelCard
from .errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: torchxrayvision maps [0, max] linearly onto [-1024, 1024].
XRV_RANGE = 1024.0
#: tolerated rounding error outside [0, 1] before an input is refused.
RANGE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Geometry:
    """Where the original image lies inside the square network input."""

    image_shape: tuple[int, int]  # (H, W) of the original image
    input_size: int  # side of the square network input
    resized_shape: tuple[int, int]  # (h, w) of the image once resized
    offset: tuple[int, int]  # (top, left) of the resized image in the input

    @property
    def scale(self) -> float:
        return self.resized_shape[0] / self.image_shape[0]


def geometry_for(image_shape: tuple[int, int], input_size: int) -> Geometry:
    """Aspect-preserving fit of ``image_shape`` into a centred square."""
    h, w = (int(image_shape[0]), int(image_shape[1]))
    if h < 1 or w < 1:
        raise ModelError(f"image has an empty dimension: {h}x{w}")
    scale = input_size / max(h, w)
    rh = min(input_size, max(1, round(h * scale)))
    rw = min(input_size, max(1, round(w * scale)))
    return Geometry((h, w), input_size, (rh, rw), ((input_size - rh) // 2, (input_size - rw) // 2))


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate the input contract; return a float32 view clipped to [0, 1]."""
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ModelError(f"expected a 2-D greyscale image, got an array of shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ModelError(f"expected a real-valued image, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if arr.size == 0:
        raise ModelError("image is empty")
    if not np.isfinite(arr).all():
        raise ModelError("image contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        raise ModelError(
            f"image values must lie in [0, 1] (1 = brightest displayed); got [{lo:g}, {hi:g}] "
            "- apply the display LUT and scale before calling the model"
        )
    return np.clip(arr, 0.0, 1.0)


def _resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a (N, C, H, W) tensor; antialiased when shrinking."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    shrink = size[0] < t.shape[-2] or size[1] < t.shape[-1]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def normalize(x: np.ndarray, card: ModelCard) -> np.ndarray:
    """Map a [0, 1] (S, S) array to the (C, S, S) input the card's network expects."""
    if card.normalization == "imagenet":
        mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
        std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
        return ((x[None] - mean) / std).astype(np.float32)
    if card.normalization == "xrv":
        return ((x * 2.0 - 1.0) * XRV_RANGE)[None].astype(np.float32)
    raise ModelError(f"unknown normalization {card.normalization!r}")  # pragma: no cover (card validates)


def preprocess(image: np.ndarray, card: ModelCard) -> tuple[np.ndarray, Geometry]:
    """Return the (C, S, S) float32 network input for one image and its geometry."""
    arr = check_image(image)
    geo = geometry_for(arr.shape, card.input_size)
    resized = _resize(torch.from_numpy(np.ascontiguousarray(arr))[None, None], geo.resized_shape)[0, 0]
    canvas = np.zeros((card.input_size, card.input_size), dtype=np.float32)  # 0 = black = air
    (top, left), (rh, rw) = geo.offset, geo.resized_shape
    canvas[top : top + rh, left : left + rw] = np.clip(resized.numpy(), 0.0, 1.0)
    return normalize(canvas, card), geo


def to_image_grid(maps: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """Map (N, h, w) maps defined over the square network input onto the original (N, H, W) grid.

    The maps are first brought to the input resolution (bilinear, as MONAI's
    CAM upsampler does), the padding is cropped away and the rest is resized to
    the original image shape.
    """
    m = maps[None].float().clone()  # never alias the caller's tensor (later steps work in place)
    m = _resize(m, (geo.input_size, geo.input_size))
    (top, left), (rh, rw) = geo.offset, geo.resized_shape
    m = m[..., top : top + rh, left : left + rw]
    return _resize(m, geo.image_shape)[0]


def _resize_rows(signals: torch.Tensor, n_out: int, antialias: bool) -> torch.Tensor:
    """Resize each row of an (N, n_in) tensor to length ``n_out`` with the 1-D form of :func:`_resize`.

    Same call (bilinear, same antialias flag) along the last axis, the other
    axis of length 1 so that it is left as is.  (Not along the height axis
    with a width of 1: torch 2.13's antialiased kernel gives wrong weights for
    that layout.)
    """
    if signals.shape[-1] == n_out:
        return signals
    out = F.interpolate(signals[None, :, None, :], size=(1, n_out), mode="bilinear", align_corners=False,
                        antialias=antialias)
    return out[0, :, 0, :]


def image_grid_matrices(map_shape: tuple[int, int], geo: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_y, R_x) with ``to_image_grid(m, geo)[i] == R_y @ m[i] @ R_x.T`` for (h, w) = ``map_shape`` maps.

    Resizing is separable, so the three steps of :func:`to_image_grid` (to the
    input square, crop the padding, to the image shape) compose into one
    (H, h) and one (W, w) matrix, built by sending the h (or w) unit impulses
    through the same three steps.  Applying them costs O(H W w) for a map
    instead of two image-sized interpolations.
    """
    h, w = (int(map_shape[0]), int(map_shape[1]))
    s = geo.input_size
    (top, left), (rh, rw) = geo.offset, geo.resized_shape
    big_h, big_w = geo.image_shape
    shrink1 = s < h or s < w  # the flags _resize computes for the 2-D calls
    shrink2 = big_h < rh or big_w < rw
    ry = _resize_rows(_resize_rows(torch.eye(h), s, shrink1)[:, top : top + rh], big_h, shrink2)
    rx = _resize_rows(_resize_rows(torch.eye(w), s, shrink1)[:, left : left + rw], big_w, shrink2)
    return ry.T.contiguous(), rx.T.contiguous()
