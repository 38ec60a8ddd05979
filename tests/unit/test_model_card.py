"""Model card, model directory verification, demo model and image file loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_model import (
    FINDINGS,
    ImageRefused,
    ModelCard,
    ModelError,
    bundled_demo_path,
    load_card,
    load_image_file,
    load_model,
)
from cxr_model.network import build_network
from cxr_model.store import write_model_dir

PNG_DIR = Path(__file__).resolve().parents[1] / "data" / "png"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def card_fields(**over):
    fields = dict(
        name="t", version="1", labels=FINDINGS, input_size=64, in_channels=3, normalization="imagenet",
        thresholds={f: 0.5 for f in FINDINGS}, calibration={}, evaluation={}, intended_use="test only", demo=False,
    )
    fields.update(over)
    return fields


def test_bundled_demo_card_says_demo():
    card = load_card(bundled_demo_path())
    assert card.demo is True
    assert card.name == "cxr-triage-demo-densenet121" and card.version == "0.1.0-demo"
    assert card.labels == FINDINGS
    assert card.architecture == "monai.DenseNet121"
    assert card.weights_dtype == "float16"
    assert "DEMO WEIGHTS" in card.intended_use and "NOT FOR DIAGNOSTIC USE" in card.intended_use
    assert (bundled_demo_path() / card.weights_file).stat().st_size < 16_000_000


def test_demo_model_gives_image_dependent_probabilities():
    model = load_model(bundled_demo_path(), "torch")
    assert all(p.dtype == torch.float32 for p in model.backend.module.parameters())
    rng = np.random.default_rng(0)
    images = [rng.random((80, 64), dtype=np.float32), np.zeros((64, 64), np.float32),
              np.linspace(0, 1, 96 * 64, dtype=np.float32).reshape(96, 64)]
    preds = model.predict(images, cams=False)
    probs = np.array([[p.probabilities[f] for f in FINDINGS] for p in preds])
    assert list(preds[0].probabilities) == list(FINDINGS)
    assert ((probs > 0) & (probs < 1)).all()
    assert (probs.std(axis=0) > 1e-4).all(), "each finding's probability must vary with the image"
    assert preds[0].cams is None


def test_sha256_mismatch_is_refused(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(bundled_demo_path(), d)
    with open(d / "weights.pt", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ModelError, match="SHA-256 mismatch"):
        load_model(d, "torch")


def test_missing_weights_file_is_refused(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(bundled_demo_path(), d)
    (d / "weights.pt").unlink()
    with pytest.raises(ModelError, match="weights file 'weights.pt'.*missing"):
        load_model(d, "torch")


def test_label_count_mismatch_is_refused(tmp_path):
    torch.manual_seed(0)
    state = build_network(3, 14).state_dict()
    labels = FINDINGS[:13]
    write_model_dir(tmp_path, state, **card_fields(labels=labels, thresholds={f: 0.5 for f in labels}))
    with pytest.raises(ModelError, match="label mismatch: model card lists 13 labels but the weights have 14 outputs"):
        load_model(tmp_path, "torch")


def test_card_validation_names_the_field(tmp_path):
    with pytest.raises(ModelError, match="'in_channels'"):
        ModelCard(**card_fields(in_channels=1), weights_file="w.pt", weights_sha256="0" * 64)
    with pytest.raises(ModelError, match="'thresholds'.*missing \\['Hernia'\\]"):
        ModelCard(**card_fields(thresholds={f: 0.5 for f in FINDINGS[:-1]}), weights_file="w.pt",
                  weights_sha256="0" * 64)
    with pytest.raises(ModelError, match="'calibration'.*temperature"):
        ModelCard(**card_fields(calibration={"Mass": {"temperature": -1}}), weights_file="w.pt",
                  weights_sha256="0" * 64)
    with pytest.raises(ModelError, match="'weights_file'"):
        ModelCard(**card_fields(), weights_file="../w.pt", weights_sha256="0" * 64)
    data = json.loads((bundled_demo_path() / "model_card.json").read_text())
    del data["weights_sha256"]
    data["colour"] = "blue"
    (tmp_path / "model_card.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="unknown field"):
        load_card(tmp_path)
    with pytest.raises(ModelError, match="no model_card.json"):
        load_card(tmp_path / "nowhere")


def test_card_round_trips_through_json(tmp_path):
    torch.manual_seed(0)
    card = write_model_dir(tmp_path, build_network(1, 14).state_dict(),
                           **card_fields(in_channels=1, normalization="xrv",
                                         calibration={"Mass": {"temperature": 1.5}}))
    assert load_card(tmp_path) == card


def test_load_image_file_8_and_16_bit(tmp_path):
    img = load_image_file(PNG_DIR / "00000001_000.png")
    assert img.dtype == np.float32 and img.shape == (512, 512)
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.max() > 0.9
    ramp = (np.arange(0, 65536, 257, dtype=np.uint16)[None, :].repeat(4, axis=0))
    Image.fromarray(ramp).save(tmp_path / "r16.png")
    r16 = load_image_file(tmp_path / "r16.png")
    np.testing.assert_allclose(r16[0], ramp[0] / 65535.0, atol=1e-6)
    Image.fromarray((ramp >> 8).astype(np.uint8)).convert("RGB").save(tmp_path / "grey_rgb.jpg", quality=95)
    assert load_image_file(tmp_path / "grey_rgb.jpg").shape == (4, 256)


def test_load_image_file_refuses_non_radiographs(tmp_path):
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0] = 255
    Image.fromarray(colour).save(tmp_path / "red.png")
    with pytest.raises(ImageRefused, match="colour image"):
        load_image_file(tmp_path / "red.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageRefused, match="not a readable PNG/JPEG"):
        load_image_file(tmp_path / "notes.png")
    with pytest.raises(ModelError, match="file not found"):
        load_image_file(tmp_path / "absent.png")
