"""Optional metadata inputs (age, sex, view position): parsing, encoding, the network, both runtimes, training.

Synthetic phantoms in the training test: tests of the pipeline, not clinical claims.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from cxr_model import (
    FINDINGS,
    ImageMetadata,
    ModelCard,
    ModelError,
    bundled_demo_path,
    load_card,
    load_model,
)
from cxr_model import metadata as md
from cxr_model.cam import raw_cams
from cxr_model.card import write_card
from cxr_model.datasets import (
    CHEXPERT_COLUMNS,
    load_chestxray14,
    read_chexpert_csv,
    split_chestxray14,
)
from cxr_model.network import (
    CLASSIFIER_BIAS,
    CLASSIFIER_WEIGHT,
    METADATA_WEIGHT,
    build_network,
)
from cxr_model.phantoms import draw_phantom
from cxr_model.preprocess import preprocess
from cxr_model.store import write_model_dir
from cxr_triage import cli
from cxr_triage.dicom_input import read_radiograph_and_metadata
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = Path(__file__).resolve().parents[1] / "data"
ENTRIES = DATA / "nih_meta" / "Data_Entry_2017_v2020.csv.gz"
SIZE = 64
M = len(md.FEATURES)


def card_fields(**over):
    fields = dict(
        name="t", version="1", labels=FINDINGS, input_size=SIZE, in_channels=3, normalization="imagenet",
        thresholds={f: 0.5 for f in FINDINGS}, calibration={}, evaluation={}, intended_use="test only", demo=False,
        metadata_inputs=md.card_entry(),
    )
    fields.update(over)
    return fields


@pytest.fixture(scope="module")
def meta_model_dir(tmp_path_factory):
    """A random DenseNet121 with metadata inputs and a clearly non-zero metadata weight."""
    d = tmp_path_factory.mktemp("meta-model")
    torch.manual_seed(11)
    net = build_network(3, len(FINDINGS), M)
    with torch.no_grad():
        net.class_layers.out.weight.normal_(0, 0.05)
        net.metadata_out.weight.normal_(0, 1.0)
    write_model_dir(d, net.state_dict(), **card_fields())
    return d


@pytest.fixture(scope="module")
def image():
    return draw_phantom(np.random.default_rng(3), SIZE, {"Effusion"})[0]


# --------------------------------------------------------------------------- parsing and encoding


def test_real_nih_metadata_reaches_every_image_and_follows_subsets(tmp_path):
    shutil.copy(ENTRIES, tmp_path / ENTRIES.name)
    ds, _ = load_chestxray14(tmp_path, require_images=False)
    assert len(ds.metadata) == len(ds) == 112_120
    assert ds.metadata[0] == ImageMetadata(57.0, "M", "PA")  # 00000001_000.png, 57, M, PA
    sexes = [m.sex for m in ds.metadata]
    views = [m.view for m in ds.metadata]
    assert (sexes.count("M"), sexes.count("F")) == (26_197 + 37_143, 18_613 + 30_167)
    assert (views.count("AP"), views.count("PA")) == (18_613 + 26_197, 30_167 + 37_143)
    x = ds.metadata_matrix()
    assert x.shape == (112_120, M) and x.dtype == np.float32
    assert (x[:, 1] == 0).all()  # v2020 has every age
    assert (x[:, 2] + x[:, 3] == 1).all() and (x[:, 4] + x[:, 5] == 1).all()
    assert 0 <= x[:, 0].min() and x[:, 0].max() <= 1.2  # (14 images say age 0)
    assert np.allclose(x[0], [0.57, 0, 1, 0, 0, 1])
    by_name = dict(zip(ds.names, ds.metadata))
    test = split_chestxray14(ds, tmp_path, "random", seed=1)["test"]
    assert all(by_name[n] == m for n, m in zip(test.names, test.metadata))  # metadata stays with its image


def test_chexpert_sex_age_and_view_columns(tmp_path):
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_COLUMNS)
    zeros = ",".join("0.0" for _ in CHEXPERT_COLUMNS)
    rows = [
        f"CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,{zeros}",
        f"CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg,Female,68,Lateral,,{zeros}",
        f"CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Male,0,Frontal,PA,{zeros}",
        f"CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,Unknown,,Frontal,LL,{zeros}",
    ]
    (tmp_path / "train.csv").write_text("\n".join([header, *rows]) + "\n")
    ds = read_chexpert_csv(tmp_path / "train.csv", tmp_path)
    assert ds.metadata == (ImageMetadata(68.0, "F", "AP"), ImageMetadata(0.0, "M", "PA"), ImageMetadata(None, "", ""))
    assert np.array_equal(ds.metadata_matrix(), np.asarray(
        [[0.68, 0, 0, 1, 1, 0], [0.0, 0, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0]], dtype=np.float32))
    # A CSV without the demographic columns gives unknown metadata, not an error.
    (tmp_path / "bare.csv").write_text("Path," + ",".join(CHEXPERT_COLUMNS) + "\n" + rows[0].split(",", 1)[0] + ","
                                       + zeros + "\n")
    assert read_chexpert_csv(tmp_path / "bare.csv", tmp_path).metadata == (ImageMetadata(),)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # the odd values are the point
@pytest.mark.parametrize(("attrs", "expected"), [
    ({"PatientAge": "045Y", "PatientSex": "M", "ViewPosition": "PA"}, (45.0, "M", "PA")),
    ({"PatientAge": "006M", "PatientSex": "F", "ViewPosition": "AP"}, (0.5, "F", "AP")),
    ({"PatientAge": "002W", "PatientSex": "O", "ViewPosition": "LL"}, (2 / 52, "", "")),
    ({"PatientAge": "010D", "PatientSex": "", "ViewPosition": ""}, (10 / 365.25, "", "")),
    ({"PatientAge": "", "PatientSex": "m ", "ViewPosition": "ap "}, (None, "M", "AP")),
    ({"PatientAge": "58", "PatientSex": "M"}, (58.0, "M", "")),  # no unit (the NIH DICOMs): years
    ({"PatientAge": "150Y"}, (None, "", "")),  # implausible: unknown, not clipped to 120
    ({"PatientAge": "old", "PatientSex": "X", "ViewPosition": "LATERAL"}, (None, "", "")),
    ({}, (None, "", "")),  # nothing at all
])
def test_dicom_attributes_with_odd_values(attrs, expected):
    ds = pydicom.Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    got = md.metadata_from_dicom(ds)
    age, sex, view = expected
    assert (got.sex, got.view) == (sex, view)
    assert got.age_years is None if age is None else got.age_years == pytest.approx(age)
    assert md.metadata_from_dicom(dict(attrs)) == got  # a keyword mapping reads the same
    vec = got.encode()
    assert vec.shape == (M,) and vec[1] == (got.age_years is None) and vec[2:4].sum() <= 1 and vec[4:].sum() <= 1


def test_real_dicom_files_bring_their_metadata():
    _, nih = read_radiograph_and_metadata(DATA / "cxr_dicom" / "nih_00000001_000_cardiomegaly.dcm")
    assert nih == ImageMetadata(58.0, "M", "")  # PatientAge '58', no ViewPosition in these files
    _, rg1 = read_radiograph_and_metadata(DATA / "cxr_dicom" / "cr_chest_pa_mono1_15bit_j2k_lossy.dcm")
    assert rg1 == ImageMetadata(None, "F", "PA")
    _, png = read_radiograph_and_metadata(DATA / "png" / "00000001_000.png")
    assert png is None and md.as_metadata(png).encode().tolist() == [0, 1, 0, 0, 0, 0]


# --------------------------------------------------------------------------- card


def test_card_records_metadata_and_old_cards_mean_none(tmp_path):
    card = ModelCard(weights_file="w.pt", weights_sha256="0" * 64, **card_fields())
    assert card.takes_metadata and card.metadata_features == M
    assert card.to_dict()["metadata_inputs"]["encoding"] == md.ENCODING
    plain = ModelCard(weights_file="w.pt", weights_sha256="0" * 64, **card_fields(metadata_inputs={}))
    assert not plain.takes_metadata and "metadata_inputs" not in plain.to_dict()
    with pytest.raises(ModelError, match="metadata_inputs.*encoding"):
        ModelCard(weights_file="w.pt", weights_sha256="0" * 64,
                  **card_fields(metadata_inputs={"encoding": "age-v9", "features": ["age"]}))
    with pytest.raises(ModelError, match="metadata_inputs.*features"):
        ModelCard(weights_file="w.pt", weights_sha256="0" * 64,
                  **card_fields(metadata_inputs={"encoding": md.ENCODING, "features": ["sex_male", "age"]}))
    # The bundled demo card (no metadata_inputs) reads and writes back byte for byte.
    demo = load_card(bundled_demo_path())
    assert not demo.takes_metadata
    write_card(demo, tmp_path)
    assert (tmp_path / "model_card.json").read_bytes() == (bundled_demo_path() / "model_card.json").read_bytes()


def test_card_and_weights_must_agree_on_metadata(meta_model_dir, tmp_path):
    no_meta = tmp_path / "no-meta"
    shutil.copytree(meta_model_dir, no_meta)
    card = json.loads((no_meta / "model_card.json").read_text())
    del card["metadata_inputs"]
    (no_meta / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="metadata inputs.*records none"):
        load_model(no_meta, "torch")
    claims = tmp_path / "claims"
    shutil.copytree(bundled_demo_path(), claims)
    card = json.loads((claims / "model_card.json").read_text())
    card["metadata_inputs"] = md.card_entry()
    (claims / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="takes 6 metadata input"):
        load_model(claims, "torch")


# --------------------------------------------------------------------------- network and inference


def test_logit_is_cam_mean_plus_metadata_term_plus_bias(meta_model_dir, image):
    model = load_model(meta_model_dir, "torch")
    state = model.backend.module.net.state_dict()
    w, b, v = state[CLASSIFIER_WEIGHT], state[CLASSIFIER_BIAS], state[METADATA_WEIGHT]
    x = preprocess(image, model.card)[0][None]
    meta = np.stack([ImageMetadata(30, "F", "PA").encode(), ImageMetadata(85, "M", "AP").encode()])
    logits, feats = model.backend.forward(np.concatenate([x, x]), meta)
    f = torch.from_numpy(feats).double()
    class_maps = torch.einsum("ck,bkhw->bchw", w.double(), f)  # the CAM before its ReLU, image columns only
    expected = class_maps.mean((-2, -1)) + b.double() + torch.from_numpy(meta).double() @ v.double().T
    assert np.abs(logits - expected.numpy()).max() < 1e-4
    assert np.array_equal(feats[0], feats[1])  # the feature map does not see the metadata
    cams = raw_cams(torch.from_numpy(feats), model._weight)  # what predict() maps: W only, never V
    assert torch.allclose(cams.double(), torch.relu(class_maps), atol=1e-5)
    assert torch.equal(cams[0], cams[1])
    assert not np.allclose(logits[0], logits[1])


def test_metadata_changes_the_probability_not_the_cam(meta_model_dir, image, caplog):
    model = load_model(meta_model_dir, "torch")
    young_woman = ImageMetadata(30, "F", "PA")
    old_man = pydicom.Dataset()
    old_man.PatientAge, old_man.PatientSex, old_man.ViewPosition = "085Y", "M", "AP"
    a, b = model.predict([image, image], metadata=[young_woman, old_man])
    diff = max(abs(a.probabilities[f] - b.probabilities[f]) for f in FINDINGS)
    assert diff > 0.01, diff
    assert np.array_equal(a.cams.stack(), b.cams.stack())
    with caplog.at_level(logging.WARNING, logger="cxr_model"):
        (none,) = model.predict([image], cams=False)  # no metadata given: all unknown, with a warning
    assert "takes age/sex/view metadata but none was given" in caplog.text
    (unknown,) = model.predict([image], cams=False, metadata=[None])
    assert none.probabilities == unknown.probabilities
    with pytest.raises(ModelError, match="metadata: 1 entries for 2 images"):
        model.predict([image, image], metadata=[None])


def test_image_only_model_ignores_metadata(image):
    model = load_model(bundled_demo_path(), "torch")
    (plain,) = model.predict([image])
    (given,) = model.predict([image], metadata=[ImageMetadata(85, "M", "AP")])
    assert plain.probabilities == given.probabilities
    assert np.array_equal(plain.cams.stack(), given.cams.stack())


# --------------------------------------------------------------------------- training with --metadata


def test_train_with_metadata_gives_a_model_both_runtimes_load(tmp_path):
    data, out = tmp_path / "data", tmp_path / "model"

    run_cli("model", "make-phantoms", str(data), "--n", "40", "--size", str(SIZE), "--seed", "2")
    log = run_cli("model", "train", "--dataset", "chestxray14", "--data-dir", str(data), "--out", str(out),
              "--image-size", str(SIZE), "--epochs", "1", "--batch-size", "8", "--split", "random", "--metadata")
    assert "metadata inputs (age, sex, view)" in log
    card = load_card(out)
    assert card.takes_metadata and card.metadata_inputs["encoding"] == md.ENCODING
    assert card.provenance["config"]["metadata"] is True
    weights = torch.load(out / card.weights_file, weights_only=True)
    assert weights[METADATA_WEIGHT].shape == (len(FINDINGS), M) and weights[METADATA_WEIGHT].abs().max() > 0
    m_torch = load_model(out, "torch")
    m_onnx = load_model(out, "onnx", cache_dir=tmp_path / "onnx", threads=1)
    assert [i.name for i in m_onnx.backend.session.get_inputs()] == ["input", "metadata"]
    rng = np.random.default_rng(9)
    images = [draw_phantom(rng, SIZE, {"Mass"})[0], draw_phantom(rng, SIZE, set())[0]]
    meta = [ImageMetadata(70, "F", "AP"), None]
    for a, b in zip(m_torch.predict(images, metadata=meta), m_onnx.predict(images, metadata=meta), strict=True):
        assert max(abs(a.probabilities[f] - b.probabilities[f]) for f in FINDINGS) < 1e-4
        assert np.abs(a.cams.stack() - b.cams.stack()).max() < 1e-4
    # calibrate and evaluate score the splits with each image's metadata (CAM localisation included).
    run_cli("model", "calibrate", "--model", str(out), "--dataset", "chestxray14", "--data-dir", str(data),
        "--split", "train")
    run_cli("model", "evaluate", "--model", str(out), "--dataset", "chestxray14", "--data-dir", str(data),
        "--split", "test", "--scheme", "official", "--out", str(tmp_path / "report"), "--bootstrap", "20")
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["ece"]["calibrated"] and metrics["localization"] is not None
    assert load_card(out).weights_sha256 == card.weights_sha256
    # Resuming a metadata run without --metadata is refused rather than silently mixing the two.
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = cli.main(["model", "train", "--dataset", "chestxray14", "--data-dir", str(data), "--out", str(out),
                       "--image-size", str(SIZE), "--epochs", "2", "--split", "random", "--resume"])
    assert rc == 2 and "--metadata" in buf.getvalue()
