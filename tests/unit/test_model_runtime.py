"""ONNX Runtime versus PyTorch, the ONNX cache and fallback, and calibration."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cxr_model import FINDINGS, ModelError, load_model
from cxr_model import runtime as rt_module
from cxr_model.network import build_network
from cxr_model.store import write_model_dir

SIZE = 96


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(3)
    net = build_network(3, len(FINDINGS))
    with torch.no_grad():
        net.class_layers.out.weight.normal_(0, 0.05)
    write_model_dir(
        d, net.state_dict(), name="t", version="1", labels=FINDINGS, input_size=SIZE, in_channels=3,
        normalization="imagenet", thresholds={f: 0.5 for f in FINDINGS}, calibration={}, evaluation={},
        intended_use="test", demo=False,
    )
    return d


@pytest.fixture()
def images():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:90] / 60.0
    smooth = (0.5 + 0.4 * np.sin(3 * xx) * np.cos(2 * yy)).astype(np.float32)
    return [smooth, rng.random((70, 100), dtype=np.float32)]


def test_onnx_equals_torch(model_dir, images, tmp_path):
    m_torch = load_model(model_dir, "torch")
    m_onnx = load_model(model_dir, "onnx", cache_dir=tmp_path, threads=1)
    assert (m_torch.runtime, m_onnx.runtime) == ("torch", "onnx")
    preds = m_torch.predict(images)
    probs = np.array([list(p.probabilities.values()) for p in preds])
    assert ((probs > 0.01) & (probs < 0.99)).mean() > 0.5, "test model must not saturate"
    for a, b in zip(preds, m_onnx.predict(images), strict=True):
        assert a.positive == b.positive
        for f in FINDINGS:
            assert abs(a.probabilities[f] - b.probabilities[f]) < 1e-4
            assert a.cams[f].shape == b.cams[f].shape
            assert np.abs(a.cams[f] - b.cams[f]).max() < 1e-4


def test_auto_uses_int8_onnx_and_caches_both_graphs(model_dir, tmp_path, monkeypatch):
    import onnxruntime.quantization

    model = load_model(model_dir, "auto", cache_dir=tmp_path, threads=1)
    assert model.runtime == "onnx-int8"  # its decisions equalled fp32's on the reference radiographs
    cached = sorted(tmp_path.glob("*.onnx"), key=lambda p: len(p.name))
    assert len(cached) == 2 and all(p.name.startswith(model.card.weights_sha256) for p in cached)
    assert "-int8-" in cached[1].name and "-int8-" not in cached[0].name

    def no_work(*args, **kwargs):
        raise AssertionError("the cached graphs should have been reused")

    monkeypatch.setattr(rt_module, "_export_bytes", no_work)
    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", no_work)
    assert load_model(model_dir, "auto", cache_dir=tmp_path, threads=1).runtime == "onnx-int8"
    assert load_model(model_dir, "onnx", cache_dir=tmp_path, threads=1).runtime == "onnx"
    cached[0].write_bytes(b"corrupt")  # a damaged cache entry is re-exported, not trusted
    monkeypatch.undo()
    assert load_model(model_dir, "onnx", cache_dir=tmp_path, threads=1).runtime == "onnx"


def test_failed_export_falls_back_to_torch(model_dir, tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise ModelError("ONNX export failed: simulated")

    monkeypatch.setattr(rt_module, "_export_bytes", broken)
    with caplog.at_level(logging.WARNING, logger="cxr_model"):
        model = load_model(model_dir, "auto", cache_dir=tmp_path, threads=1)
    assert model.runtime == "torch"
    assert "ONNX runtime unavailable" in caplog.text and "simulated" in caplog.text
    with pytest.raises(ModelError, match="ONNX runtime unavailable.*simulated"):
        load_model(model_dir, "onnx", cache_dir=tmp_path)


def test_temperature_calibration(model_dir, images, tmp_path):
    import json
    import shutil

    cal_dir = tmp_path / "cal"
    shutil.copytree(model_dir, cal_dir)
    card = json.loads((cal_dir / "model_card.json").read_text())
    card["calibration"] = {"Mass": {"temperature": 2.0}}
    card["thresholds"]["Mass"] = 0.0  # threshold 0 -> always positive
    (cal_dir / "model_card.json").write_text(json.dumps(card))
    plain = load_model(model_dir, "torch").predict(images[:1], cams=False)[0]
    cal = load_model(cal_dir, "torch").predict(images[:1], cams=False)[0]
    logit = np.log(plain.probabilities["Mass"] / (1 - plain.probabilities["Mass"]))
    assert cal.probabilities["Mass"] == pytest.approx(1 / (1 + np.exp(-logit / 2.0)), abs=1e-6)
    assert cal.probabilities["Edema"] == pytest.approx(plain.probabilities["Edema"], abs=1e-7)
    assert "Mass" in cal.positive


def test_bad_runtime_name(model_dir):
    with pytest.raises(ModelError, match="runtime must be"):
        load_model(model_dir, "tensorrt")


def test_onnx_session_options_and_threads(model_dir, tmp_path):
    model = load_model(model_dir, "onnx", cache_dir=tmp_path, threads=1)
    opts = model.backend.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.graph_optimization_level.name == "ORT_ENABLE_ALL"
    assert opts.execution_mode.name == "ORT_SEQUENTIAL"
    assert torch.get_num_threads() == 1  # preprocessing and CAM mapping follow the same setting
    names = [o.name for o in model.backend.session.get_outputs()]
    assert names == ["logits", "features"]  # the CAM feature map comes out of the same run


def _load_in_child(model_dir: str, cache_dir: str, queue) -> None:
    import logging as child_logging

    records: list[str] = []

    class Keep(child_logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    child_logging.getLogger("cxr_model").addHandler(Keep())
    child_logging.getLogger("cxr_model").setLevel(child_logging.DEBUG)
    torch.set_num_threads(1)
    model = load_model(model_dir, "onnx", cache_dir=cache_dir, threads=1)
    queue.put((model.runtime, [m for m in records if "ONNX" in m]))


def test_processes_starting_together_export_the_graph_once(model_dir, tmp_path):
    """The worker's pool starts its model processes together: one exports, the others load the cached graph."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    children = [ctx.Process(target=_load_in_child, args=(str(model_dir), str(tmp_path), queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=180) for _ in children]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    assert [runtime for runtime, _ in results] == ["onnx", "onnx"]
    messages = [m for _, logged in results for m in logged]
    assert sum(m.startswith("exported ") for m in messages) == 1, messages
    assert sum(m.startswith("using cached ONNX graph") for m in messages) == 1, messages
    assert len(list(tmp_path.glob("*.onnx"))) == 1
