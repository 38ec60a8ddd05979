"""Checkpoint import: an independent torchvision-named DenseNet121 gives the same logits after import."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cxr_model import FINDINGS, ModelError, load_card
from cxr_model.importers import XRV_LABELS, import_checkpoint
from cxr_model.network import LogitsAndFeatures, load_network

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class RefDenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int = 32, bn_size: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        new = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return torch.cat([x, new], 1)


class RefDenseNet121(nn.Module):
    """DenseNet-BC-121 written from the paper with torchvision's parameter names (no MONAI, no torchvision)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        layers = OrderedDict(
            conv0=nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
            norm0=nn.BatchNorm2d(64), relu0=nn.ReLU(), pool0=nn.MaxPool2d(3, stride=2, padding=1),
        )
        c = 64
        for i, n in enumerate((6, 12, 24, 16), start=1):
            block = nn.Sequential(OrderedDict((f"denselayer{j + 1}", RefDenseLayer(c + 32 * j)) for j in range(n)))
            layers[f"denseblock{i}"] = block
            c += 32 * n
            if i < 4:
                layers[f"transition{i}"] = nn.Sequential(OrderedDict(
                    norm=nn.BatchNorm2d(c), relu=nn.ReLU(), conv=nn.Conv2d(c, c // 2, 1, bias=False),
                    pool=nn.AvgPool2d(2, stride=2)))
                c //= 2
        layers["norm5"] = nn.BatchNorm2d(c)
        self.features = nn.Sequential(layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        f = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))


def randomised(in_channels: int, num_classes: int, seed: int) -> RefDenseNet121:
    torch.manual_seed(seed)
    net = RefDenseNet121(in_channels, num_classes)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so a mis-mapped tensor shows
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(seed + 7)
        elif isinstance(m, nn.Linear):
            m.bias.data.normal_(0, 0.5)
    return net.eval()


def legacy_chexnet_key(key: str) -> str:
    """torchvision <0.4 names (norm.1) under CheXNet's DataParallel wrapper, classifier as Sequential(Linear, Sigmoid)."""
    for a in ("norm", "relu", "conv"):
        for i in ("1", "2"):
            key = key.replace(f".{a}{i}.", f".{a}.{i}.")
    key = key.replace("classifier.", "classifier.0.")
    return "module.densenet121." + key


def imported_logits(out_dir, x):
    card = load_card(out_dir)
    with torch.no_grad():
        return LogitsAndFeatures(load_network(out_dir, card))(x)


@pytest.fixture(scope="module")
def ref3():
    return randomised(3, 14, seed=1)


@pytest.fixture(scope="module")
def x3():
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def test_chexnet_import_reproduces_logits(ref3, x3, tmp_path):
    ckpt = {"epoch": 7, "state_dict": {legacy_chexnet_key(k): v for k, v in ref3.state_dict().items()}}
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in ckpt["state_dict"]
    torch.save(ckpt, tmp_path / "model.pth.tar")
    card = import_checkpoint("chexnet", tmp_path / "model.pth.tar", tmp_path / "out", name="chexnet-test")
    assert card.labels == FINDINGS and card.normalization == "imagenet" and card.in_channels == 3
    assert card.name == "chexnet-test" and card.version.startswith("imported-") and not card.demo
    with torch.no_grad():
        ref = ref3(x3)
    ours, _ = imported_logits(tmp_path / "out", x3)
    assert ref.std() > 0.1, "reference logits must not be degenerate"
    assert (ours - ref).abs().max().item() < 1e-4


def test_chexnet_without_num_batches_tracked(ref3, x3, tmp_path):
    sd = {legacy_chexnet_key(k): v for k, v in ref3.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": sd}, tmp_path / "old.pth.tar")  # as saved by PyTorch 0.3
    card = import_checkpoint("chexnet", tmp_path / "old.pth.tar", tmp_path / "out")
    assert any("num_batches_tracked" in n for n in card.provenance["notes"])
    with torch.no_grad():
        ref = ref3(x3)
    assert (imported_logits(tmp_path / "out", x3)[0] - ref).abs().max().item() < 1e-4


def test_torchxrayvision_import_maps_outputs_by_name(tmp_path):
    ref = randomised(1, len(XRV_LABELS), seed=2)
    sd = dict(ref.state_dict())
    op = torch.full((len(XRV_LABELS),), float("nan"))
    op[XRV_LABELS.index("Effusion")] = 0.3
    sd["op_threshs"] = op
    torch.save(sd, tmp_path / "xrv.pt")
    card = import_checkpoint("torchxrayvision", tmp_path / "xrv.pt", tmp_path / "out", version="2")
    assert card.normalization == "xrv" and card.in_channels == 1 and card.version == "2"
    assert card.thresholds["Effusion"] == pytest.approx(0.3) and card.thresholds["Mass"] == 0.5
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref_logits = ref(x)
    ours, _ = imported_logits(tmp_path / "out", x)
    for j, label in enumerate(FINDINGS):
        diff = (ours[:, j] - ref_logits[:, XRV_LABELS.index(label)]).abs().max().item()
        assert diff < 1e-4, label


def test_torchvision_import_keeps_backbone_and_marks_untrained_head(tmp_path):
    ref = randomised(3, 1000, seed=3)
    torch.save(ref.state_dict(), tmp_path / "densenet121-a639ec97.pth")
    card = import_checkpoint("torchvision", tmp_path / "densenet121-a639ec97.pth", tmp_path / "out")
    assert card.demo is True and card.provenance["untrained_head"] is True
    assert "UNTRAINED HEAD" in card.intended_use
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref_feats = F.relu(ref.features(x))
    logits, feats = imported_logits(tmp_path / "out", x)
    assert logits.shape == (1, 14)
    assert (feats - ref_feats).abs().max().item() < 1e-4


def test_leftover_source_tensor_is_refused(ref3, tmp_path):
    sd = dict(ref3.state_dict())
    sd["features.denseblock1.denselayer1.extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "c.pt")
    with pytest.raises(ModelError, match=r"unused source tensor\(s\): \['features.denseblock1.denselayer1.extra.weight'\]"):
        import_checkpoint("chexnet", tmp_path / "c.pt", tmp_path / "out")
    assert not (tmp_path / "out" / "model_card.json").exists()


def test_missing_tensor_is_refused(ref3, tmp_path):
    sd = dict(ref3.state_dict())
    del sd["features.norm5.running_var"]
    torch.save(sd, tmp_path / "c.pt")
    with pytest.raises(ModelError, match=r"target tensor\(s\) not provided: \['features.norm5.running_var'\]"):
        import_checkpoint("chexnet", tmp_path / "c.pt", tmp_path / "out")


def test_wrong_label_count_is_refused(tmp_path):
    ref = randomised(3, 13, seed=4)
    torch.save(ref.state_dict(), tmp_path / "c.pt")
    with pytest.raises(ModelError, match="label mismatch: chexnet classifier has 13 outputs, expected 14"):
        import_checkpoint("chexnet", tmp_path / "c.pt", tmp_path / "out")
    with pytest.raises(ModelError, match="first convolution takes 3 channel"):
        import_checkpoint("torchxrayvision", tmp_path / "c.pt", tmp_path / "out")
