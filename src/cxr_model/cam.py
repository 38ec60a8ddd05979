"""Class activation maps for every label from a single forward pass.

DenseNet121 ends in ReLU -> global average pooling -> linear, so for label c

    logit_c = mean_xy( sum_k w_ck F_k(x, y) ) + b_c

and CAM_c = ReLU( sum_k w_ck F_k ), F = output of ``class_layers.relu``.
Grad-CAM on the same layer weights the channels with the spatial mean of
d logit_c / d F_k = w_ck / (h w), i.e. it is the same map divided by h w: the
CAM is Grad-CAM without a backward pass, for all labels at once (one matmul
of the classifier weight with the feature map the forward pass returned).

Mapping a (h, w) map onto the original image (bilinear up to the square
network input, crop the padding, resize to the image) is linear and
separable, so it is one pair of small matrices per image:
``map_on_image = R_y @ map @ R_x.T``.  The 14 maps of an image are brought to
the image grid in one batched product when all are asked for
(:meth:`CamMaps.stack`), or one at a time when read through the mapping,
so that a caller who draws one heat map does not pay for fourteen
full-resolution arrays (14 x 2048 x 2048 float32 is 235 MB).

Maps are normalised by dividing by their maximum (an all-zero map stays
zero), so 1 = strongest evidence and 0 = none.  MONAI's default Grad-CAM
normaliser maps max -> 0 and min -> 1 (it inverts the map); it is never used.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from .preprocess import Geometry, image_grid_matrices


def raw_cams(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) features and (C, K) classifier weight -> (B, C, h, w) non-negative maps (one matmul)."""
    b, k, h, w = features.shape
    maps = torch.matmul(weight.float(), features.float().reshape(b, k, h * w))  # (B, C, h*w)
    return torch.relu_(maps).reshape(b, weight.shape[0], h, w)


def normalize_max(maps: torch.Tensor) -> torch.Tensor:
    """Divide each non-negative (.., H, W) map by its maximum, in place; all-zero maps stay zero."""
    peak = maps.flatten(-2).amax(-1)[..., None, None]
    return maps.div_(peak.clamp_min(torch.finfo(maps.dtype).tiny)).clamp_(0.0, 1.0)


class CamMaps(Mapping[str, np.ndarray]):
    """The CAMs of one image: label -> float32 (H, W) map in [0, 1] on the image's own grid.

    All labels' maps exist at the feature-map resolution as soon as this is
    built; each is brought to the image grid the first time it is read (and
    kept), or all at once with :meth:`stack`.
    """

    def __init__(self, labels: Sequence[str], raw: torch.Tensor, geo: Geometry) -> None:
        if raw.ndim != 3 or raw.shape[0] != len(labels):
            raise ValueError(f"raw maps of shape {tuple(raw.shape)} do not fit {len(labels)} labels")
        self._labels = tuple(labels)
        self._index = {label: i for i, label in enumerate(self._labels)}
        self._raw = raw.float()
        self._geo = geo
        self._matrices: tuple[torch.Tensor, torch.Tensor] | None = None
        self._done: dict[str, np.ndarray] = {}

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of every map: the original image's shape."""
        return self._geo.image_shape

    def __getitem__(self, label: str) -> np.ndarray:
        if label not in self._done:
            i = self._index[label]  # KeyError for an unknown label, as a dict would
            self._done[label] = self._to_image(self._raw[i : i + 1])[0]
        return self._done[label]

    def __contains__(self, label: object) -> bool:  # without mapping the map, unlike Mapping's default
        return label in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def __repr__(self) -> str:
        h, w = self.shape
        return f"CamMaps({len(self)} labels, {h}x{w}, {len(self._done)} mapped)"

    @property
    def native_shape(self) -> tuple[int, int]:
        """(rows, columns) of the feature-map grid over the image itself (the padding cropped):
        the model's own resolution, e.g. 7 x 7 for a square image at 224 px."""
        h, w = self._raw.shape[-2:]
        (rh, rw), size = self._geo.resized_shape, self._geo.input_size
        return max(1, round(h * rh / size)), max(1, round(w * rw / size))

    def native(self, label: str) -> np.ndarray:
        """The map of `label` at the model's own resolution over the image (`native_shape`), in [0, 1]:
        the same interpolation as the full-size map, onto a grid of that many cells."""
        coarse = Geometry(self.native_shape, self._geo.input_size, self._geo.resized_shape, self._geo.offset)
        ry, rx = image_grid_matrices(tuple(self._raw.shape[-2:]), coarse)
        i = self._index[label]
        out = torch.matmul(torch.matmul(ry, self._raw[i]), rx.T)
        return normalize_max(out[None])[0].numpy().astype(np.float32, copy=False)

    def stack(self) -> np.ndarray:
        """All maps as one (C, H, W) float32 array in label order, computed in one batched product."""
        todo = [label for label in self._labels if label not in self._done]
        if len(todo) == len(self._labels):  # nothing read yet: one array, no copy
            mapped = self._to_image(self._raw)
            self._done.update(zip(self._labels, mapped, strict=True))
            return mapped
        if todo:
            idx = torch.tensor([self._index[label] for label in todo])
            self._done.update(zip(todo, self._to_image(self._raw[idx]), strict=True))
        return np.stack([self._done[label] for label in self._labels])

    def _to_image(self, raw: torch.Tensor) -> np.ndarray:
        if self._matrices is None:
            self._matrices = image_grid_matrices(tuple(self._raw.shape[-2:]), self._geo)
        ry, rx = self._matrices
        # Non-negative maps times non-negative interpolation weights: no clamp needed, and
        # x / max(x) <= 1 holds exactly in IEEE division, so two passes over the big array suffice.
        # torch (its own thread setting) writes into a numpy-allocated array: numpy's BLAS would
        # start its own threads (slow on shared cores), torch's fresh tensors page-fault more
        # (measured, 2048 x 2048: 2.5 ms here against 5-30 ms for either alternative).
        mapped = np.empty((raw.shape[0], ry.shape[0], rx.shape[0]), dtype=np.float32)
        out = torch.from_numpy(mapped)
        torch.matmul(torch.matmul(ry, raw), rx.T, out=out)
        peak = out.flatten(1).amax(1)[:, None, None]
        out.div_(peak.clamp_min_(torch.finfo(torch.float32).tiny))
        return mapped


def cams_for_image(raw: torch.Tensor, geo: Geometry) -> np.ndarray:
    """(C, h, w) raw maps of one image -> (C, H, W) float32 in [0, 1] on the original image grid."""
    return CamMaps([str(i) for i in range(raw.shape[0])], raw, geo).stack()
