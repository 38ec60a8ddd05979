"""Metadata parsing and patient-wise splits on the real NIH ChestX-ray14 metadata; CheXpert uncertainty policies."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_model import FINDINGS
from cxr_model.datasets import (
    CHEXPERT_LABELS,
    load_chestxray14,
    parse_age_years,
    parse_uncertainty,
    patient_split,
    read_chexpert_csv,
    read_nih_boxes,
    read_nih_entries,
    split_chestxray14,
)
from cxr_model.errors import ModelError
from cxr_model.losses import masked_bce

NIH_META = Path(__file__).resolve().parents[1] / "data" / "nih_meta"
ENTRIES = NIH_META / "Data_Entry_2017_v2020.csv.gz"
BOXES = NIH_META / "BBox_List_2017.csv.gz"


@pytest.fixture(scope="module")
def nih_entries():
    return read_nih_entries(ENTRIES)


@pytest.fixture(scope="module")
def nih_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("nih")
    shutil.copy(ENTRIES, d / ENTRIES.name)
    ds, boxes = load_chestxray14(d, require_images=False)
    return d, ds


def _disjoint(parts):
    seen = [set(p.patients) for p in parts]
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            assert not (seen[i] & seen[j]), "a patient is on two sides of the split"


def test_real_nih_entries_counts(nih_entries):
    assert len(nih_entries) == 112_120
    assert len({e.patient_id for e in nih_entries}) == 30_805
    first = nih_entries[0]
    assert (first.image, first.findings, first.patient_id, first.age_years, first.sex, first.view) == (
        "00000001_000.png", ("Cardiomegaly",), "1", 57.0, "M", "PA")
    assert {f for e in nih_entries for f in e.findings} == set(FINDINGS)
    assert sum(1 for e in nih_entries if not e.findings) == 60_361  # "No Finding"
    assert sum(1 for e in nih_entries if "Hernia" in e.findings) == 227


def test_real_nih_boxes():
    boxes = read_nih_boxes(BOXES)
    assert len(boxes) == 984
    assert len({b.image for b in boxes}) == 880
    # "Infiltrate" in the box list is the "Infiltration" finding of the labels.
    assert {b.finding for b in boxes} == {"Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
                                          "Pneumonia", "Pneumothorax"}
    assert all(0 <= b.x < 1024 and 0 <= b.y < 1024 and b.w > 0 and b.h > 0 for b in boxes)


def test_boxes_lie_on_images_labelled_with_the_finding(nih_entries):
    labels = {e.image: set(e.findings) for e in nih_entries}
    boxes = read_nih_boxes(BOXES)
    assert all(b.image in labels for b in boxes)
    agree = sum(b.finding in labels[b.image] for b in boxes)
    assert agree / len(boxes) > 0.95


@pytest.mark.parametrize("text,years", [("57", 57.0), ("057Y", 57.0), ("006M", 0.5), ("", None), ("old", None)])
def test_age_in_both_csv_spellings(text, years):
    assert parse_age_years(text) == years


def test_random_split_is_patient_wise_70_10_20(nih_set):
    d, ds = nih_set
    parts = split_chestxray14(ds, d, "random", seed=3)
    train, val, test = parts["train"], parts["val"], parts["test"]
    assert len(train) + len(val) + len(test) == 112_120
    _disjoint([train, val, test])
    n_pat = [len(set(p.patients)) for p in (train, val, test)]
    assert sum(n_pat) == 30_805
    assert np.allclose(np.array(n_pat) / 30_805, (0.7, 0.1, 0.2), atol=0.001)
    again = split_chestxray14(ds, d, "random", seed=3)
    assert again["test"].names == test.names  # deterministic
    other = split_chestxray14(ds, d, "random", seed=4)
    assert other["test"].names != test.names


def test_official_split_carves_validation_by_patient(nih_set, tmp_path):
    d, ds = nih_set
    # The official lists are not shipped; build patient-wise ones with the same sizes' spirit.
    test_names = [n for n, p in zip(ds.names, ds.patients) if int(p) % 5 == 0]
    tv_names = [n for n, p in zip(ds.names, ds.patients) if int(p) % 5 != 0]
    (d / "test_list.txt").write_text("\n".join(test_names) + "\n")
    (d / "train_val_list.txt").write_text("\n".join(tv_names) + "\n")
    parts = split_chestxray14(ds, d, "official", seed=0)
    _disjoint(list(parts.values()))
    assert len(parts["test"]) == len(test_names)
    assert len(parts["train"]) + len(parts["val"]) == len(tv_names)
    tv_patients = len({p for n, p in zip(ds.names, ds.patients) if int(p) % 5 != 0})
    assert abs(len(set(parts["val"].patients)) - 0.1 * tv_patients) <= 1
    # A list that puts one patient on both sides is refused.
    (d / "test_list.txt").write_text("\n".join(test_names + [tv_names[0]]) + "\n")
    with pytest.raises(ModelError, match="both train_val and test"):
        split_chestxray14(ds, d, "official", seed=0)


def test_patient_split_keeps_every_patient_whole():
    patients = [str(i // 3) for i in range(300)]
    parts = patient_split(patients, (0.7, 0.1, 0.2), seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))
    sides = [{patients[i] for i in part} for part in parts]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    with pytest.raises(ModelError):
        patient_split(patients, (0.5, 0.2), seed=1)


# --------------------------------------------------------------------------- CheXpert


def _write_chexpert(path: Path) -> None:
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *(
        "Pleural Effusion" if c == "Effusion" else c for c in CHEXPERT_LABELS)]
    rows = [
        # patient00001: Atelectasis uncertain, Edema positive, Effusion not mentioned
        ["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Female", "68", "Frontal", "AP"],
        ["CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg", "Female", "68", "Lateral", ""],
        ["CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg", "Male", "40", "Frontal", "PA"],
    ]
    labels = [
        {"Atelectasis": "-1.0", "Edema": "1.0"},
        {"Atelectasis": "1.0"},
        {"Atelectasis": "0.0", "Edema": "-1.0", "Effusion": "-1.0", "No Finding": "1.0"},
    ]
    lines = [",".join(header)]
    for row, lab in zip(rows, labels):
        lines.append(",".join(row + [lab.get(c, "") for c in CHEXPERT_LABELS]))
    path.write_text("\n".join(lines) + "\n")


def _col(name: str) -> int:
    return CHEXPERT_LABELS.index(name)


def test_chexpert_u_ignore_masks_uncertain_labels(tmp_path):
    _write_chexpert(tmp_path / "train.csv")
    ds = read_chexpert_csv(tmp_path / "train.csv", tmp_path, uncertainty="ignore")
    assert len(ds) == 2  # the lateral view is dropped
    assert ds.patients == ("patient00001", "patient00002")
    a, e, eff = _col("Atelectasis"), _col("Edema"), _col("Effusion")
    assert ds.mask[0, a] == 0 and ds.mask[1, e] == 0 and ds.mask[1, eff] == 0
    assert ds.mask[0, e] == 1 and ds.labels[0, e] == 1
    assert ds.mask[0, eff] == 1 and ds.labels[0, eff] == 0  # not mentioned = negative
    assert ds.mask.sum() == 2 * len(CHEXPERT_LABELS) - 3


def test_chexpert_u_zeros_and_u_ones(tmp_path):
    _write_chexpert(tmp_path / "train.csv")
    zeros = read_chexpert_csv(tmp_path / "train.csv", tmp_path, uncertainty="zeros")
    ones = read_chexpert_csv(tmp_path / "train.csv", tmp_path, uncertainty="ones")
    a = _col("Atelectasis")
    assert zeros.mask.all() and ones.mask.all()
    assert zeros.labels[0, a] == 0 and ones.labels[0, a] == 1
    assert zeros.labels[1, _col("Edema")] == 0 and ones.labels[1, _col("Edema")] == 1
    assert (zeros.labels != ones.labels).sum() == 3


def test_chexpert_per_finding_policy(tmp_path):
    _write_chexpert(tmp_path / "train.csv")
    # CheXpert paper's best: U-Ones for Atelectasis and Edema, U-Zeros for the rest (here: Effusion).
    policy = "zeros,Atelectasis=ones,Edema=U-Ones"
    assert parse_uncertainty(policy)["Atelectasis"] == "ones" and parse_uncertainty(policy)["Cardiomegaly"] == "zeros"
    assert parse_uncertainty("ignore,Pleural Effusion=ones")["Effusion"] == "ones"
    ds = read_chexpert_csv(tmp_path / "train.csv", tmp_path, uncertainty=policy)
    assert ds.mask.all()
    assert ds.labels[0, _col("Atelectasis")] == 1 and ds.labels[1, _col("Edema")] == 1
    assert ds.labels[1, _col("Effusion")] == 0
    with pytest.raises(ModelError):
        parse_uncertainty("maybe")
    with pytest.raises(ModelError):
        parse_uncertainty("ignore,Unicorn=ones")


def test_u_ignore_takes_uncertain_labels_out_of_the_loss(tmp_path):
    _write_chexpert(tmp_path / "train.csv")
    ds = read_chexpert_csv(tmp_path / "train.csv", tmp_path, uncertainty="ignore")
    logits = torch.linspace(-3, 3, ds.labels.size).reshape(ds.labels.shape)
    mask = torch.from_numpy(ds.mask)
    y0 = torch.from_numpy(ds.labels).clone()
    y1 = y0.clone()
    y1[mask == 0] = 1.0 - y1[mask == 0]  # whatever the masked entries hold ...
    assert torch.allclose(masked_bce(logits, y0, mask), masked_bce(logits, y1, mask))  # ... the loss is the same
    assert not torch.allclose(masked_bce(logits, y0), masked_bce(logits, y1))
