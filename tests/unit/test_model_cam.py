"""CAMs: equal to MONAI Grad-CAM up to scale, and located where the evidence is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM

from cxr_model import FINDINGS, ModelCard
from cxr_model.cam import CamMaps, raw_cams
from cxr_model.model import Model
from cxr_model.network import build_network
from cxr_model.preprocess import geometry_for, image_grid_matrices, preprocess, to_image_grid
from cxr_model.runtime import TorchRuntime

SIZE = 128  # DenseNet121 -> 4x4 feature map


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_card(size=SIZE, normalization="imagenet"):
    return ModelCard(
        name="t", version="1", labels=FINDINGS, input_size=size, in_channels=3 if normalization == "imagenet" else 1,
        normalization=normalization, thresholds={f: 0.5 for f in FINDINGS}, calibration={}, evaluation={},
        weights_file="w.pt", weights_sha256="0" * 64, intended_use="test", demo=False,
    )


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    n = build_network(3, len(FINDINGS)).eval()
    with torch.no_grad():  # a less uniform head than the default init, so maps differ between labels
        n.class_layers.out.weight.normal_(0, 0.05)
    return n


def max_normalise(a):
    a = np.asarray(a, dtype=np.float64)
    return a / a.max() if a.max() > 0 else a


def test_cams_equal_monai_gradcam(net):
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    image = np.clip(0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy) + 0.05 * rng.standard_normal((SIZE, SIZE)), 0, 1)
    image = image.astype(np.float32)
    card = make_card()
    model = Model(card, TorchRuntime(net), net.class_layers.out.weight.detach().numpy())
    ours = model.predict([image])[0].cams
    x = torch.from_numpy(preprocess(image, card)[0])[None]
    gradcam = GradCAM(nn_module=net, target_layers="class_layers.relu", postprocessing=lambda m: m)
    compared = 0
    for c, label in enumerate(FINDINGS):
        ref = gradcam(x, class_idx=c)[0, 0].detach().numpy()  # raw: never MONAI's inverting normaliser
        assert ours[label].shape == image.shape and ours[label].dtype == np.float32
        if ref.max() <= 0:
            assert ours[label].max() == 0
            continue
        a, b = max_normalise(ours[label]), max_normalise(ref)
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
        np.testing.assert_allclose(a, b, atol=1e-4)
        compared += 1
    assert compared >= 5


def test_one_hot_head_gives_that_channels_feature_map(net):
    k = 17
    head = np.zeros((len(FINDINGS), 1024), np.float32)
    head[FINDINGS.index("Mass"), k] = 1.0
    card = make_card()
    model = Model(card, TorchRuntime(net), head)
    image = np.random.default_rng(2).random((SIZE, SIZE), dtype=np.float32)
    cams = model.predict([image])[0].cams
    x = torch.from_numpy(preprocess(image, card)[0])[None]
    with torch.no_grad():
        fk = net.class_layers.relu(net.features(x))[:, k : k + 1]
    expected = F.interpolate(fk, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(cams["Mass"], max_normalise(expected), atol=1e-5)
    assert cams["Hernia"].max() == 0.0  # an all-zero map stays zero


class PoolingBackend:
    """A stand-in network: channel 0 = the image average-pooled 8x, channel 1 = its negative."""

    name = "fake"

    def forward(self, batch):
        x = torch.from_numpy(batch[:, :1])
        f = F.avg_pool2d(x, 8)
        return np.zeros((len(batch), len(FINDINGS)), np.float32), torch.cat([f, -f], 1).numpy()


def test_cam_lies_on_the_injected_pattern_of_a_non_square_image():
    h, w = 60, 100  # landscape: padded top and bottom
    image = np.zeros((h, w), np.float32)
    image[35:50, 70:90] = 1.0  # bright patch, lower right
    head = np.zeros((len(FINDINGS), 2), np.float32)
    head[FINDINGS.index("Nodule"), 0] = 1.0
    head[FINDINGS.index("Pneumothorax"), 1] = 1.0
    model = Model(make_card(size=64, normalization="xrv"), PoolingBackend(), head)
    pred = model.predict([image])[0]
    cam = pred.cams["Nodule"]
    assert cam.shape == (h, w)
    assert cam.min() >= 0.0 and cam.max() == pytest.approx(1.0)
    y, x = np.unravel_index(cam.argmax(), cam.shape)
    assert 35 <= y < 50 and 70 <= x < 90
    assert cam[35:50, 70:90].mean() > 3 * cam[:, :40].mean()
    # evidence for the negative channel is where the image is dark, never on the patch
    neg = pred.cams["Pneumothorax"]
    assert neg[40:45, 75:85].max() < 0.5 and neg[:, :40].mean() > 0.8


@pytest.mark.parametrize(
    ("image_shape", "size", "map_side"),
    [((2048, 1700), 224, 7), ((90, 150), 128, 4), ((10, 20), 64, 2), ((64, 64), 64, 2), ((300, 40), 96, 3)],
)
def test_separable_mapping_equals_resizing_the_maps(image_shape, size, map_side):
    """R_y @ m @ R_x.T is the same linear map as interpolate -> crop -> interpolate, antialiased shrink included."""
    geo = geometry_for(image_shape, size)
    maps = torch.rand(3, map_side, map_side, generator=torch.Generator().manual_seed(4))
    ry, rx = image_grid_matrices((map_side, map_side), geo)
    assert ry.shape == (image_shape[0], map_side) and rx.shape == (image_shape[1], map_side)
    np.testing.assert_allclose((ry @ maps @ rx.T).numpy(), to_image_grid(maps, geo).numpy(), atol=1e-6)
    cams = CamMaps(["a", "b", "c"], maps, geo)
    for i, label in enumerate(cams):
        np.testing.assert_allclose(cams[label], max_normalise(to_image_grid(maps, geo)[i].numpy()), atol=1e-6)


def test_cam_maps_are_mapped_when_read_and_stack_in_label_order():
    geo = geometry_for((300, 200), 64)
    raw = torch.rand(len(FINDINGS), 2, 2, generator=torch.Generator().manual_seed(5))
    raw[FINDINGS.index("Hernia")] = 0.0
    cams = CamMaps(FINDINGS, raw, geo)
    assert len(cams) == len(FINDINGS) and list(cams) == list(FINDINGS) and cams.shape == (300, 200)
    assert "Mass" in cams and "Not a finding" not in cams and "0 mapped" in repr(cams)
    mass = cams["Mass"]
    assert "1 mapped" in repr(cams)  # reading one map does not pay for the other thirteen
    assert mass.dtype == np.float32 and mass.shape == (300, 200) and mass.max() == 1.0 and mass.min() >= 0.0
    stacked = cams.stack()
    assert stacked.shape == (len(FINDINGS), 300, 200) and stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked[FINDINGS.index("Mass")], mass)
    for j, label in enumerate(FINDINGS):
        np.testing.assert_array_equal(stacked[j], cams[label])
    assert stacked[FINDINGS.index("Hernia")].max() == 0.0
    with pytest.raises(KeyError):
        cams["Not a finding"]


def test_raw_cams_is_the_classifier_applied_at_every_position():
    feats = torch.rand(2, 5, 3, 4, generator=torch.Generator().manual_seed(6))
    weight = torch.randn(7, 5, generator=torch.Generator().manual_seed(7))
    expected = torch.relu(torch.einsum("ck,bkhw->bchw", weight, feats))
    torch.testing.assert_close(raw_cams(feats, weight), expected)
