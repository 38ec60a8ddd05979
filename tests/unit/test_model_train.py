"""Training, evaluation and calibration end to end on synthetic phantoms, through `cxr-triage model ...`.

Synthetic phantoms: tests of the pipeline, not clinical claims.  64 px
phantoms, 480 images, 4 epochs of a standard DenseNet121 on CPU (about half
a minute on 2 cores); localisation at this size is not asserted (the CAM grid
is 2 x 2), that is bench/train_bench.py's job at 224 px.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_model import FINDINGS, load_card, load_model
from cxr_model.card import sha256_file
from cxr_model.datasets import CHEXPERT_COLUMNS, CHEXPERT_LABELS, DATASETS, SPLIT_NAMES, SPLIT_SCHEMES, read_nih_boxes
from cxr_model.losses import LOSSES
from cxr_model.phantoms import DRAWN_FINDINGS, PHANTOM_NOTE, draw_phantom, read_manifest
from cxr_model.train import CHECKPOINT_FILE
from cxr_triage import cli
from tests.conftest import run_cli

PNG_DIR = Path(__file__).resolve().parents[1] / "data" / "png"
REQUIRED_KEYS = {"auroc", "auroc_ci95", "mean_auroc", "auprc", "operating_points", "ece", "localization"}
#: what metrics.json adds beside the issue's keys: what was measured, on what, and the notice.
CONTEXT_KEYS = {"notice", "model", "data"}


def _run(capsys, *argv: str) -> str:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    return out.out


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom-run")
    data, model, report = root / "data", root / "model", root / "report"
    logs = {}

    logs["phantoms"] = run_cli("model", "make-phantoms", str(data), "--n", "480", "--size", "64", "--seed", "0")
    logs["train"] = run_cli("model", "train", "--dataset", "chestxray14", "--data-dir", str(data), "--out", str(model),
                        "--image-size", "64", "--epochs", "4", "--batch-size", "16", "--seed", "0")
    card_before = load_card(model)
    logs["calibrate"] = run_cli("model", "calibrate", "--model", str(model), "--dataset", "chestxray14", "--data-dir",
                            str(data), "--split", "val")
    logs["evaluate"] = run_cli("model", "evaluate", "--model", str(model), "--dataset", "chestxray14", "--data-dir",
                           str(data), "--split", "test", "--out", str(report), "--bootstrap", "200")
    metrics = json.loads((report / "metrics.json").read_text())
    return {"data": data, "model": model, "report": report, "logs": logs, "metrics": metrics, "card_before": card_before}


def test_make_phantoms_writes_the_chestxray14_layout(phantom_run):
    data = phantom_run["data"]
    manifest = read_manifest(data)
    assert manifest["note"] == PHANTOM_NOTE and PHANTOM_NOTE in phantom_run["logs"]["phantoms"]
    assert len(list((data / "images").glob("*.png"))) == 480
    assert Image.open(next((data / "images").glob("*.png"))).size == (64, 64)
    test = set((data / "test_list.txt").read_text().split())
    train_val = set((data / "train_val_list.txt").read_text().split())
    assert len(test) + len(train_val) == 480 and not test & train_val
    patient = lambda name: name.split("_")[0]  # noqa: E731
    assert not {patient(n) for n in test} & {patient(n) for n in train_val}
    boxes = read_nih_boxes(data / "BBox_List_2017.csv")
    assert len(boxes) == manifest["boxes"] > 0
    assert {b.image for b in boxes} <= test and {b.finding for b in boxes} == set(DRAWN_FINDINGS)


def test_phantom_training_learns_the_drawn_findings(phantom_run):
    m = phantom_run["metrics"]
    assert m["mean_auroc"] > 0.95, m["auroc"]
    for f in FINDINGS:
        if f in DRAWN_FINDINGS:
            assert m["auroc"][f] > 0.75, (f, m["auroc"][f])
        else:
            assert m["auroc"][f] is None and m["auroc_ci95"][f] is None  # never drawn: undefined, not 0.5
    log = phantom_run["logs"]["train"]
    assert "epoch 4/4" in log and "val mean AUROC" in log and PHANTOM_NOTE in log
    history = json.loads((phantom_run["model"] / "train_history.json").read_text())
    assert [h["epoch"] for h in history["history"]] == [1, 2, 3, 4]
    assert history["history"][-1]["train_loss"] < history["history"][0]["train_loss"]


def test_evaluate_writes_metrics_json_and_pngs(phantom_run):
    m, report = phantom_run["metrics"], phantom_run["report"]
    assert REQUIRED_KEYS <= set(m) and set(m) - REQUIRED_KEYS <= CONTEXT_KEYS
    assert m["notice"] == PHANTOM_NOTE and PHANTOM_NOTE in phantom_run["logs"]["evaluate"]
    for key in ("auroc", "auroc_ci95", "auprc"):
        assert set(m[key]) == set(FINDINGS)
    for f in DRAWN_FINDINGS:
        lo, hi = m["auroc_ci95"][f]
        assert lo <= m["auroc"][f] <= hi
        op = m["operating_points"][f]
        assert {"threshold", "sensitivity", "specificity"} <= set(op) and 0 <= op["sensitivity"] <= 1
    assert set(m["ece"]["before"]) == set(m["ece"]["after"]) and m["ece"]["calibrated"] is True
    loc = m["localization"]
    for key in ("pointing_game", "random_pointing_game"):
        assert set(loc[key]) == set(DRAWN_FINDINGS) and all(0 <= v <= 1 for v in loc[key].values())
    assert set(loc["iobb"]) == {"0.1", "0.25", "0.5"}
    for level in loc["iobb"].values():
        assert set(level) == set(DRAWN_FINDINGS)
    for name in ("roc.png", "reliability.png"):
        with Image.open(report / name) as img:
            assert img.format == "PNG" and img.size[0] > 300
            assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 5  # something drawn, not a blank page


def test_calibrate_writes_thresholds_and_temperatures_into_a_card_that_loads(phantom_run):
    model_dir, before = phantom_run["model"], phantom_run["card_before"]
    after = load_card(model_dir)
    assert before.calibration == {} and set(before.thresholds.values()) == {0.5}
    assert set(after.calibration) == set(DRAWN_FINDINGS)  # the others have no positives to fit on
    assert all(after.calibration[f]["temperature"] > 0 for f in DRAWN_FINDINGS)
    assert any(after.thresholds[f] != 0.5 for f in DRAWN_FINDINGS)
    assert after.weights_sha256 == before.weights_sha256 == sha256_file(model_dir / after.weights_file)
    assert after.evaluation["calibration"]["split"] == "val" and "Youden" in phantom_run["logs"]["calibrate"]
    model = load_model(model_dir, "torch")  # the hash check still passes
    assert model.card.calibration == after.calibration


def test_trained_card_is_honest_about_phantoms(phantom_run):
    card = load_card(phantom_run["model"])
    assert card.demo is False
    assert "PIPELINE TEST, NOT CLINICAL" in card.intended_use and PHANTOM_NOTE in card.intended_use
    assert card.evaluation["note"] == PHANTOM_NOTE and card.provenance["synthetic_phantoms"] is True
    assert card.labels == FINDINGS and card.input_size == 64


def test_trained_model_loads_and_predicts_in_the_service_paths(phantom_run, capsys, monkeypatch, tmp_path):
    model_dir, data = phantom_run["model"], phantom_run["data"]
    model = load_model(model_dir, "torch")
    rng = np.random.default_rng(5)
    with_eff, _ = draw_phantom(rng, 64, {"Effusion", "Pneumothorax"})
    without, _ = draw_phantom(rng, 64, set())
    p_with, p_without = model.predict([with_eff, without])
    assert p_with.probabilities["Effusion"] > p_without.probabilities["Effusion"]
    assert p_with.probabilities["Pneumothorax"] > p_without.probabilities["Pneumothorax"]
    assert p_with.cams["Effusion"].shape == (64, 64)
    monkeypatch.setenv("CXR_TRIAGE_MODEL_RUNTIME", "torch")
    monkeypatch.setenv("CXR_TRIAGE_DATA_DIR", str(tmp_path))
    phantom_png = sorted((data / "images").glob("*.png"))[0]
    out = _run(capsys, "predict", str(phantom_png), str(PNG_DIR / "00000001_000.png"), "--model", str(model_dir), "--json")
    records = json.loads(out)
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert records[0]["model"] == {"name": model.card.name, "version": model.card.version, "demo": False,
                                   "runtime": "torch"}
    assert set(records[1]["probabilities"]) == set(FINDINGS)


def _train_args(data: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["model", "train", "--dataset", "chestxray14", "--data-dir", str(data), "--out", str(out), "--image-size",
            "64", "--epochs", str(epochs), "--batch-size", "8", "--seed", "7", "--split", "random", *extra]


def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path, capsys):
    data = tmp_path / "data"
    _run(capsys, "model", "make-phantoms", str(data), "--n", "40", "--size", "64", "--seed", "1")
    _run(capsys, *_train_args(data, tmp_path / "straight", 2))
    _run(capsys, *_train_args(data, tmp_path / "resumed", 1))
    first = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)
    assert first["epoch"] == 1
    log = _run(capsys, *_train_args(data, tmp_path / "resumed", 2, "--resume"))
    assert "resuming" in log and "epoch 1/2:" not in log and "epoch 2/2:" in log
    straight = torch.load(tmp_path / "straight" / CHECKPOINT_FILE, weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / CHECKPOINT_FILE, weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 2
    assert len(resumed["history"]) == 2
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key  # deterministic on CPU, resume included
    assert any(not torch.equal(v, first["model"][k]) for k, v in resumed["model"].items())  # it did train on
    assert load_card(tmp_path / "resumed").weights_sha256 == load_card(tmp_path / "straight").weights_sha256


def test_chexpert_training_with_per_finding_uncertainty(tmp_path, capsys):
    data = tmp_path / "chexpert"
    rng = np.random.default_rng(0)
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_COLUMNS)
    lines = {"train.csv": [header], "valid.csv": [header]}
    for i in range(36):
        csv_name, split = ("valid.csv", "valid") if i >= 28 else ("train.csv", "train")
        findings = {f for f in ("Cardiomegaly", "Effusion") if rng.random() < 0.5}
        img, _ = draw_phantom(rng, 64, findings)
        rel = f"CheXpert-v1.0-small/{split}/patient{i // 2:05d}/study1/view{i % 2 + 1}_frontal.jpg"
        path = data / rel.split("/", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255).astype(np.uint8)).save(path, format="JPEG", quality=95)
        values = []
        for c in CHEXPERT_COLUMNS:
            name = "Effusion" if c == "Pleural Effusion" else c
            if name in findings:
                values.append("1.0")
            elif name == "Atelectasis" and split == "train" and i % 3 == 0:
                values.append("-1.0")
            elif name == "Edema" and split == "train" and i % 4 == 0:
                values.append("-1.0")
            else:
                values.append("0.0" if split == "valid" or i % 2 else "")
        lines[csv_name].append(f"{rel},Male,50,Frontal,PA," + ",".join(values))
    for name, rows in lines.items():
        (data / name).write_text("\n".join(rows) + "\n")
    out = tmp_path / "model"
    log = _run(capsys, "model", "train", "--dataset", "chexpert", "--data-dir", str(data), "--out", str(out),
               "--image-size", "64", "--epochs", "1", "--batch-size", "8", "--uncertainty", "zeros,Atelectasis=ones",
               "--loss", "focal")
    assert "epoch 1/1:" in log
    card = load_card(out)
    assert card.labels == CHEXPERT_LABELS and card.provenance["config"]["uncertainty"] == "zeros,Atelectasis=ones"
    assert "PIPELINE TEST" not in card.intended_use  # no phantom manifest: real-data wording
    load_model(out, "torch")


def test_cli_choices_mirror_the_library():
    assert cli.DATASETS == DATASETS and cli.SPLIT_SCHEMES == SPLIT_SCHEMES
    assert cli.SPLIT_NAMES == SPLIT_NAMES and cli.LOSSES == LOSSES


def test_bad_arguments_are_reported_not_raised(tmp_path, capsys):
    rc = cli.main(["model", "train", "--dataset", "chestxray14", "--data-dir", str(tmp_path), "--out",
                   str(tmp_path / "m"), "--image-size", "64", "--epochs", "1"])
    assert rc == 2 and "Data_Entry_2017" in capsys.readouterr().err


def test_init_from_torchvision_and_from_a_model_dir(phantom_run, tmp_path):
    from cxr_model.train import TrainConfig, _initial_state

    from .test_model_import import randomised

    ref = randomised(3, 1000, seed=3)
    torch.save(ref.state_dict(), tmp_path / "densenet121.pth")
    cfg = TrainConfig(dataset="chestxray14", data_dir=str(tmp_path), out_dir=str(tmp_path / "o"),
                      init=f"torchvision:{tmp_path / 'densenet121.pth'}")
    state, note = _initial_state(cfg, FINDINGS, tmp_path / "init")
    assert note.startswith("torchvision:")
    assert torch.equal(state["features.conv0.weight"], ref.state_dict()["features.conv0.weight"])
    assert state["class_layers.out.weight"].shape == (14, 1024)
    # From a trained model directory with another label set: backbone kept, fresh head.
    trained = torch.load(phantom_run["model"] / "weights.pt", weights_only=True)
    cfg = TrainConfig(dataset="chexpert", data_dir=str(tmp_path), out_dir=str(tmp_path / "o"),
                      init=f"model:{phantom_run['model']}")
    state, _ = _initial_state(cfg, CHEXPERT_LABELS, tmp_path / "init2")
    assert torch.equal(state["features.denseblock4.denselayer16.layers.conv2.weight"],
                      trained["features.denseblock4.denselayer16.layers.conv2.weight"])
    assert not torch.equal(state["class_layers.out.weight"], trained["class_layers.out.weight"])
