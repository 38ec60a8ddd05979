"""Preprocessing geometry and normalisation, and mapping maps back onto the image grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_model import FINDINGS, ModelCard, ModelError
from cxr_model.preprocess import IMAGENET_MEAN, IMAGENET_STD, geometry_for, preprocess, to_image_grid


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_card(normalization="xrv", size=64):
    return ModelCard(
        name="t", version="1", labels=FINDINGS, input_size=size, in_channels=1 if normalization == "xrv" else 3,
        normalization=normalization, thresholds={f: 0.5 for f in FINDINGS}, calibration={}, evaluation={},
        weights_file="w.pt", weights_sha256="0" * 64, intended_use="test", demo=False,
    )


@pytest.mark.parametrize(
    ("shape", "resized", "offset"),
    [((100, 50), (64, 32), (0, 16)), ((50, 100), (32, 64), (16, 0)), ((64, 64), (64, 64), (0, 0)),
     ((3000, 2500), (64, 53), (0, 5)), ((10, 20), (32, 64), (16, 0))],
)
def test_geometry_keeps_aspect_ratio_and_centres(shape, resized, offset):
    geo = geometry_for(shape, 64)
    assert geo.resized_shape == resized and geo.offset == offset
    assert abs(resized[0] / resized[1] - shape[0] / shape[1]) < 2 / min(resized)


def test_padding_is_black_before_normalisation():
    img = np.ones((100, 50), np.float32)  # all white, tall: padded left and right
    x, geo = preprocess(img, make_card("xrv"))
    assert x.shape == (1, 64, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, :16], -1024.0)
    np.testing.assert_allclose(x[0, :, 48:], -1024.0)
    np.testing.assert_allclose(x[0, :, 16:48], 1024.0, atol=1e-3)
    xi, _ = preprocess(img, make_card("imagenet"))
    assert xi.shape == (3, 64, 64)
    for c in range(3):  # padding is black in [0, 1] -> -mean/std, not 0
        np.testing.assert_allclose(xi[c, :, 0], -IMAGENET_MEAN[c] / IMAGENET_STD[c], rtol=1e-6)
        np.testing.assert_allclose(xi[c, :, 32], (1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rtol=1e-5)


def test_maps_on_the_input_come_back_onto_the_original_grid():
    h, w = 90, 150
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = (0.5 + 0.4 * np.sin(xx / 25.0) * np.cos(yy / 20.0)).astype(np.float32)
    x, geo = preprocess(img, make_card("xrv", size=128))
    as_unit = torch.from_numpy((x[0] / 1024.0 + 1.0) / 2.0)[None]  # the input itself, back in [0, 1]
    back = to_image_grid(as_unit, geo)[0].numpy()
    assert back.shape == (h, w)
    assert np.abs(back - img)[2:-2, 2:-2].max() < 0.03


def test_input_contract_is_enforced():
    card = make_card()
    with pytest.raises(ModelError, match="2-D"):
        preprocess(np.zeros((4, 4, 3), np.float32), card)
    with pytest.raises(ModelError, match="NaN"):
        preprocess(np.full((4, 4), np.nan, np.float32), card)
    with pytest.raises(ModelError, match=r"\[0, 1\]"):
        preprocess(np.full((4, 4), 255.0, np.float32), card)
    x, _ = preprocess(np.full((4, 4), 1.0005, np.float32), card)  # rounding error is clipped, not refused
    assert x.max() <= 1024.0 + 1e-3
