"""The functions behind ``cxr-triage model info`` / ``predict`` on real NIH radiographs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr_model import FINDINGS, ImageRefused, bundled_demo_path, load_image_file, load_model
from cxr_model import ModelError
from cxr_model.cli import info, predict_files
from cxr_triage.dicom_input import render_heatmap

PNG_DIR = Path(__file__).resolve().parents[1] / "data" / "png"
NIH = [PNG_DIR / "00000001_000.png", PNG_DIR / "00027426_000.png"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_model():
    return load_model(bundled_demo_path(), "torch")


def test_info_shouts_demo_weights():
    text = info(bundled_demo_path())
    first, *rest = text.splitlines()
    assert "DEMO WEIGHTS" in first and "NOT FOR DIAGNOSTIC USE" in first
    assert "cxr-triage-demo-densenet121" in text and "0.1.0-demo" in text
    assert all(f in text for f in FINDINGS)


def test_predict_on_real_nih_pngs(demo_model):
    images = [load_image_file(p) for p in NIH]
    preds = demo_model.predict(images)
    for img, pred in zip(images, preds, strict=True):
        assert list(pred.probabilities) == list(FINDINGS)
        assert pred.positive == tuple(f for f in FINDINGS if pred.probabilities[f] >= 0.5)
        assert set(pred.cams) == set(FINDINGS)
        for cam in pred.cams.values():
            assert cam.shape == img.shape and cam.dtype == np.float32
            assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert preds[0].probabilities != preds[1].probabilities


def test_predict_files_json_shape_and_statuses(demo_model, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    dicom_like = tmp_path / "a.dcm"
    dicom_like.write_bytes(b"x")
    broken = tmp_path / "b.dcm"
    broken.write_bytes(b"y")

    def reader(path: Path) -> np.ndarray:
        if path == dicom_like:
            raise ImageRefused("lateral view: not scored")
        if path == broken:
            raise RuntimeError("decoder exploded")
        from cxr_model.cli import default_read_image

        return default_read_image(path)

    out = predict_files([*NIH, notes, dicom_like, broken], bundled_demo_path(), heatmaps_dir=tmp_path / "hm",
                        as_json=True, read_image=reader, model=demo_model, render_heatmap=render_heatmap)
    records = json.loads(out)
    assert [r["status"] for r in records] == ["ok", "ok", "skipped", "skipped", "error"]
    for r in records:
        assert {"file", "status", "reason", "model", "probabilities", "positive"} <= set(r)
        assert r["model"] == {"name": "cxr-triage-demo-densenet121", "version": "0.1.0-demo", "demo": True,
                              "runtime": "torch"}
    ok = records[0]
    assert ok["file"] == str(NIH[0]) and ok["reason"] is None
    assert list(ok["probabilities"]) == list(FINDINGS)
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in ok["probabilities"].values())
    assert ok["positive"] == [f for f in FINDINGS if ok["probabilities"][f] >= 0.5]
    assert "unsupported file type '.txt'" in records[2]["reason"]
    assert records[3]["reason"] == "lateral view: not scored" and records[3]["probabilities"] is None
    assert records[4]["reason"] == "RuntimeError: decoder exploded"
    heatmaps = [Path(p) for p in ok["heatmaps"]]
    expected = ok["positive"] or [max(ok["probabilities"], key=ok["probabilities"].get)]
    assert [p.name for p in heatmaps] == [f"00000001_000_{f}.png" for f in expected]
    with Image.open(heatmaps[0]) as im:
        assert im.mode == "RGB" and im.width == 512 and im.height > 512  # legend band below the image


def test_heatmaps_need_the_renderer(demo_model, tmp_path):
    with pytest.raises(ModelError, match="renderer"):
        predict_files(NIH[:1], bundled_demo_path(), heatmaps_dir=tmp_path / "hm", model=demo_model)


def test_predict_files_text_report(demo_model):
    text = predict_files(NIH[:1], bundled_demo_path(), model=demo_model)
    assert text.splitlines()[0].startswith("*** DEMO WEIGHTS")
    assert str(NIH[0]) in text
