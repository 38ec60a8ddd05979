"""Platt scaling (sigmoid(a logit + b) per finding) beside temperature scaling: fit, card, Model, calibrate, evaluate.

Synthetic phantoms in the end-to-end test: tests of the pipeline, not clinical claims.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cxr_model import (
    FINDINGS,
    ModelCard,
    ModelError,
    bundled_demo_path,
    load_card,
    load_model,
)
from cxr_model.evaluate import CALIBRATION_METHODS, classification_metrics
from cxr_model.metrics import (
    LogitCalibration,
    expected_calibration_error,
    fit_platt,
    fit_temperature,
    sigmoid,
)
from cxr_model.phantoms import DRAWN_FINDINGS, draw_phantom
from cxr_triage import cli
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def card(**over):
    fields = dict(
        name="t", version="1", labels=FINDINGS, input_size=64, in_channels=3, normalization="imagenet",
        thresholds={f: 0.5 for f in FINDINGS}, calibration={}, evaluation={}, intended_use="test only", demo=False,
        weights_file="w.pt", weights_sha256="0" * 64,
    )
    fields.update(over)
    return ModelCard(**fields)


@pytest.mark.parametrize(("a", "b"), [(0.6, -1.2), (2.5, 0.4), (1.0, 0.0)])
def test_platt_fit_recovers_known_slope_and_offset(a, b):
    rng = np.random.default_rng(7)
    z = rng.normal(0.0, 2.0, 200_000)
    y = (rng.random(z.size) < sigmoid(a * z + b)).astype(np.float64)
    fa, fb = fit_platt(y, z)
    assert fa == pytest.approx(a, abs=0.03) and fb == pytest.approx(b, abs=0.03)
    assert fit_platt(np.ones(10), z[:10]) is None  # one class: nothing to fit


def test_platt_with_zero_offset_agrees_with_temperature():
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 3.0, 50_000)
    y = (rng.random(z.size) < sigmoid(z / 2.0)).astype(np.float64)
    a, b = fit_platt(y, z)
    assert a == pytest.approx(1.0 / fit_temperature(y, z), rel=0.02) and abs(b) < 0.05


def test_platt_slope_stays_bounded_on_separable_data():
    z = np.r_[np.linspace(-5, -1, 50), np.linspace(1, 5, 50)]
    y = np.r_[np.zeros(50), np.ones(50)]
    a, b = fit_platt(y, z)
    assert a == pytest.approx(20.0, rel=1e-3) and np.isfinite(b)  # the 1/T bound of fit_temperature


def test_card_accepts_platt_and_keeps_temperature_cards():
    c = card(calibration={"Mass": {"platt_a": 0.8, "platt_b": -0.3}, "Edema": {"temperature": 1.5}})
    assert (c.calibration_method("Mass"), c.calibration_method("Edema"), c.calibration_method("Hernia")) == (
        "platt", "temperature", None)
    assert card(calibration={"Mass": {"temperature": 2.0}}).calibration_method("Mass") == "temperature"
    for bad, why in (({"platt_a": 1.0}, "neither"), ({"temperature": 1.0, "platt_a": 1.0, "platt_b": 0.0}, "neither"),
                     ({"platt_a": -1.0, "platt_b": 0.0}, "platt_a must be a positive"),
                     ({"platt_a": 1.0, "platt_b": float("inf")}, "platt_b must be a finite")):
        with pytest.raises(ModelError, match=why):
            card(calibration={"Mass": bad})


def test_logit_calibration_mixes_methods_and_keeps_temperature_exact():
    z = np.array([[-2.0, 0.5, 3.0], [1.0, -1.0, 0.0]])
    t_only = LogitCalibration.from_entries([{"temperature": 1.7}, {}, {"temperature": 0.3}])
    assert t_only.slope is None and np.array_equal(t_only(z), z / np.array([1.7, 1.0, 0.3]))
    mixed = LogitCalibration.from_entries([{"temperature": 2.0}, {"platt_a": 0.5, "platt_b": 1.0}, {}])
    assert np.allclose(mixed(z), np.stack([z[:, 0] / 2.0, 0.5 * z[:, 1] + 1.0, z[:, 2]], 1))


def test_evaluate_ece_uses_the_cards_platt_parameters():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, (400, 2))
    y = (rng.random(z.shape) < sigmoid(0.5 * z - 1.0)).astype(np.float64)
    c = card(labels=("Mass", "Edema"), thresholds={"Mass": 0.5, "Edema": 0.5},
             calibration={"Mass": {"platt_a": 0.5, "platt_b": -1.0}, "Edema": {"temperature": 2.0}})
    m = classification_metrics(c, ["Mass", "Edema"], y, np.ones_like(y), z, n_boot=10, seed=0)
    assert m["ece"]["after"]["Mass"] == pytest.approx(expected_calibration_error(y[:, 0], sigmoid(0.5 * z[:, 0] - 1.0)))
    assert m["ece"]["after"]["Edema"] == pytest.approx(expected_calibration_error(y[:, 1], sigmoid(z[:, 1] / 2.0)))
    assert m["ece"]["before"]["Mass"] == pytest.approx(expected_calibration_error(y[:, 0], sigmoid(z[:, 0])))
    assert m["ece"]["methods"] == {"Mass": "platt", "Edema": "temperature"}


def test_model_applies_platt_from_the_card(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(bundled_demo_path(), d)
    data = json.loads((d / "model_card.json").read_text())
    data["calibration"] = {"Mass": {"platt_a": 0.5, "platt_b": 1.0}}
    (d / "model_card.json").write_text(json.dumps(data))
    image = draw_phantom(np.random.default_rng(0), 96, {"Mass"})[0]
    (plain,) = load_model(bundled_demo_path(), "torch").predict([image], cams=False)
    (cal,) = load_model(d, "torch").predict([image], cams=False)
    logit = np.log(plain.probabilities["Mass"] / (1 - plain.probabilities["Mass"]))
    assert cal.probabilities["Mass"] == pytest.approx(1 / (1 + np.exp(-(0.5 * logit + 1.0))), abs=1e-6)
    assert cal.probabilities["Edema"] == plain.probabilities["Edema"]


def test_calibrate_method_platt_writes_the_card_and_the_model_applies_it(tmp_path):
    data, model_dir, raw_dir, report = tmp_path / "data", tmp_path / "model", tmp_path / "raw", tmp_path / "report"

    run_cli("model", "make-phantoms", str(data), "--n", "40", "--size", "64", "--seed", "4")
    run_cli("model", "train", "--dataset", "chestxray14", "--data-dir", str(data), "--out", str(model_dir),
        "--image-size", "64", "--epochs", "1", "--batch-size", "8", "--split", "random", "--no-augment")
    shutil.copytree(model_dir, raw_dir)
    # The training split: a 40-image phantom set's validation split is too small to hold both classes.
    log = run_cli("model", "calibrate", "--model", str(model_dir), "--dataset", "chestxray14", "--data-dir", str(data),
              "--split", "train", "--method", "platt")
    assert "Platt parameters" in log and " a=" in log
    after = load_card(model_dir)
    fitted = sorted(after.calibration)
    assert fitted and set(fitted) <= set(DRAWN_FINDINGS)
    assert all(after.calibration_method(f) == "platt" for f in fitted)
    assert "Platt" in after.evaluation["calibration"]["method"]
    assert after.weights_sha256 == load_card(raw_dir).weights_sha256
    images = [draw_phantom(np.random.default_rng(s), 64, {"Effusion", "Mass"} if s else set())[0] for s in range(2)]
    raw = load_model(raw_dir, "torch").predict(images, cams=False)
    cal = load_model(model_dir, "torch").predict(images, cams=False)
    for r, c in zip(raw, cal, strict=True):
        for f in FINDINGS:
            p = r.probabilities[f]
            if f in after.calibration:
                a, b = after.calibration[f]["platt_a"], after.calibration[f]["platt_b"]
                z = np.log(p / (1 - p))
                assert c.probabilities[f] == pytest.approx(1 / (1 + np.exp(-(a * z + b))), abs=1e-6)
            else:
                assert c.probabilities[f] == p
        assert set(c.positive) == {f for f in FINDINGS if c.probabilities[f] >= after.thresholds[f]}
    run_cli("model", "evaluate", "--model", str(model_dir), "--dataset", "chestxray14", "--data-dir", str(data),
        "--split", "test", "--out", str(report), "--bootstrap", "20")
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["ece"]["calibrated"] is True
    assert {f: m for f, m in metrics["ece"]["methods"].items() if m} == {f: "platt" for f in fitted}


def test_cli_calibration_methods_mirror_the_library():
    assert cli.CALIBRATION_METHODS == CALIBRATION_METHODS
