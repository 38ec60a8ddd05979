"""Inference back-ends: eager PyTorch and ONNX Runtime.

Both expose ``forward(batch) -> (logits, features)`` on a (B, C, S, S)
float32 numpy batch and return numpy arrays, so the rest of the pipeline
(probabilities, CAMs) is shared and the two can be compared number for number.
A model that takes metadata is called ``forward(batch, metadata)`` with a
(B, M) float32 matrix; its ONNX graph has a second input, ``metadata``.  A
model without metadata exports, caches and runs the very graph it always did.

ONNX Runtime settings, as measured on the 2-core AMD EPYC (Zen 4) build
machine, DenseNet121 at 224, batch 1, one thread: ORT_ENABLE_ALL (its NCHWc
layout pass converts every convolution and folds conv0+norm0 and
conv1+norm2 into the convolutions, ReLU fused; the remaining pre-activation
BatchNorms cannot be folded across their ReLU and become fused depthwise
scale+ReLU kernels, 2 ms of 54) is what makes it faster than eager PyTorch;
ORT_ENABLE_EXTENDED is 30 % slower.  A static batch or spatial axis and
opset 18 instead of 17 made no measurable difference, so the graph keeps a
dynamic batch (and size).  Sequential execution, one inter-op thread.  The
graph reaches about 100 GFLOP/s on one core, at that core's measured GEMM
ceiling: fp32 has nothing left to gain there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .card import ModelCard, write_bytes_atomic
from .errors import ModelError
from .network import LogitsAndFeatures, takes_metadata

log = logging.getLogger(__name__)

#: ONNX Runtime counts as equal to PyTorch when max |logit difference| <= ONNX_TOLERANCE * max(1, max |logit|)
#: (absolute for ordinary logits; relative where float32 cannot resolve 1e-4 absolutely), same for the features.
ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 17
#: bump when the exported graph changes so that stale cache files are not reused.
_EXPORT_REVISION = "1"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "cxr-triage" / "onnx"


class TorchRuntime:
    name = "torch"

    def __init__(self, net: torch.nn.Module, *, device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.module = LogitsAndFeatures(net).to(self.device).eval()

    @torch.inference_mode()
    def forward(self, batch: np.ndarray, metadata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        if metadata is None:
            logits, feats = self.module(x)
        else:
            m = torch.from_numpy(np.ascontiguousarray(metadata, dtype=np.float32)).to(self.device)
            logits, feats = self.module(x, m)
        return logits.float().cpu().numpy(), feats.float().cpu().numpy()


class OnnxRuntime:
    name = "onnx"

    def __init__(self, model_bytes: bytes, *, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads) if threads else 0  # 0 = ORT's default (physical cores)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # ORT's pool spins after each run by default; PyTorch's threads (preprocessing, CAMs) then fight the
        # spinning threads for the cores: the CAM matmul right after a run took 10.7 ms instead of 0.3, and
        # predict() on a 2048^2 image 64 ms instead of 42 (2 threads each). Without spinning the forward
        # pass itself measured the same (36-37 ms).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        self.threads = threads
        #: the graph, kept until an int8 graph has been made from it (then dropped)
        self.model_bytes: bytes | None = model_bytes

    def forward(self, batch: np.ndarray, metadata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        feeds = {"input": np.ascontiguousarray(batch, dtype=np.float32)}
        if metadata is not None:
            feeds["metadata"] = np.ascontiguousarray(metadata, dtype=np.float32)
        logits, feats = self.session.run(["logits", "features"], feeds)
        return logits, feats


def _export_bytes(net: torch.nn.Module, in_channels: int, size: int) -> bytes:
    """Export (logits, features) with dynamic batch and spatial size; legacy exporter first.

    torch 2.13's default exporter (``dynamo=True``) needs the ``onnxscript``
    package; the TorchScript-based exporter (``dynamo=False``) needs nothing
    extra and handles DenseNet121 exactly, so it is tried first.  A network
    with metadata gets a second input ``metadata`` (batch, M).
    """
    module = LogitsAndFeatures(net).eval()
    example = torch.zeros(1, in_channels, size, size)
    args: tuple[torch.Tensor, ...] = (example,)
    input_names = ["input"]
    dynamic_axes = {"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"},
                    "features": {0: "batch", 2: "fh", 3: "fw"}}
    if takes_metadata(net):
        args = (example, torch.zeros(1, net.metadata_out.in_features))
        input_names.append("metadata")
        dynamic_axes["metadata"] = {0: "batch"}
    errors = []
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                buf,
                dynamo=False,
                input_names=input_names,
                output_names=["logits", "features"],
                dynamic_axes=dynamic_axes,
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
            )
        return buf.getvalue()
    except Exception as exc:  # legacy exporter removed or failing: try the dynamo one
        errors.append(f"legacy exporter: {exc}")
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=input_names, output_names=["logits", "features"],
            dynamic_shapes=tuple({0: batch} for _ in args), opset_version=max(ONNX_OPSET, 18),
        )
        buf = io.BytesIO()
        program.save(buf)
        return buf.getvalue()
    except Exception as exc:
        errors.append(f"dynamo exporter (needs onnxscript): {exc}")
    raise ModelError("ONNX export failed: " + "; ".join(errors))


def _verify(onnx_rt: OnnxRuntime, torch_rt: TorchRuntime, card: ModelCard) -> float:
    gen = torch.Generator().manual_seed(20240229)
    x = torch.rand(2, card.in_channels, card.input_size, card.input_size, generator=gen).numpy()
    x = (x - 0.5) * (4.0 if card.normalization == "imagenet" else 2048.0)
    m = torch.rand(2, card.metadata_features, generator=gen).numpy() if card.takes_metadata else None
    lt, ft = torch_rt.forward(x, m)
    lo, fo = onnx_rt.forward(x, m)
    if lo.shape != lt.shape or fo.shape != ft.shape:
        raise ModelError(f"ONNX output shapes {lo.shape}/{fo.shape} differ from torch {lt.shape}/{ft.shape}")
    dl = float(np.abs(lo - lt).max()) / max(1.0, float(np.abs(lt).max()))
    df = float(np.abs(fo - ft).max()) / max(1.0, float(np.abs(ft).max()))
    if not (dl <= ONNX_TOLERANCE and df <= ONNX_TOLERANCE):
        raise ModelError(f"ONNX Runtime differs from PyTorch: scaled logit diff {dl:.2e}, scaled feature diff {df:.2e}")
    return dl


def _cache_path(card: ModelCard, cache_dir: Path) -> Path:
    key = f"{torch.__version__}|{ONNX_OPSET}|{_EXPORT_REVISION}|{card.in_channels}|{len(card.labels)}"
    if card.takes_metadata:  # (only then: image-only models keep the cache names they had)
        key += f"|metadata:{card.metadata_inputs['encoding']}"
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir / f"{card.weights_sha256}-{tag}.onnx"


def build_onnx_runtime(
    net: torch.nn.Module, card: ModelCard, *, torch_rt: TorchRuntime, threads: int | None, cache_dir: Path | None
) -> OnnxRuntime:
    """Load (or export and cache) the ONNX graph and check it against PyTorch; raise ModelError if unusable."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _cached_session(
        _cache_path(card, cache), "ONNX graph", threads=threads,
        build=lambda: _export_bytes(net, card.in_channels, card.input_size),
        check=lambda rt: _verify(rt, torch_rt, card),
        built=lambda diff: log.info("exported %s %s to ONNX (scaled max logit difference vs torch %.1e)",
                                    card.name, card.version, diff),
    )


def _cached_session(path: Path, what: str, *, threads: int | None, build: Callable[[], bytes],
                    check: Callable[[OnnxRuntime], object], built: Callable[[object], None]) -> OnnxRuntime:
    """A session of the graph cached at ``path`` if it passes ``check``, else of ``build()``'s graph, which must
    pass ``check`` (``built`` gets its result) and is then cached.

    Processes that start together (the worker's pool) take turns on the cache
    file, so one builds the graph and the others load it.
    """
    with _cache_lock(path):
        if path.is_file():
            try:
                rt = OnnxRuntime(path.read_bytes(), threads=threads)
                check(rt)
                log.debug("using cached %s %s", what, path)
                return rt
            except Exception as exc:
                log.warning("cached %s %s is unusable (%s); making it again", what, path, exc)
        data = build()
        rt = OnnxRuntime(data, threads=threads)
        built(check(rt))
        try:
            write_bytes_atomic(path, data)
        except OSError as exc:  # read-only home etc.: keep the in-memory graph
            log.warning("cannot cache %s at %s (%s); using it from memory", what, path, exc)
        return rt


@contextlib.contextmanager
def _cache_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock beside ``path``; no lock where the directory cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def build_int8_runtime(
    fp32: OnnxRuntime, card: ModelCard, *, calibration: np.ndarray, threads: int | None, cache_dir: Path | None
) -> OnnxRuntime:
    """An ONNX Runtime session of ``fp32``'s graph statically quantised to int8 (QDQ, per-channel weights).

    Activation ranges come from ``calibration``, a (N, C, S, S) batch of
    prepared radiographs; the graph is cached beside the fp32 one, keyed by
    the calibration data. The caller decides whether its answers are close
    enough (:func:`cxr_model.model.load_model` compares decisions).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    calibration = np.ascontiguousarray(calibration, dtype=np.float32)
    tag = hashlib.sha256(calibration.tobytes()).hexdigest()[:12]
    base = _cache_path(card, cache)
    return _cached_session(
        base.with_name(f"{base.stem}-int8-{tag}.onnx"), "int8 graph", threads=threads,
        build=lambda: _quantize(fp32, card, calibration),
        check=lambda rt: None,
        built=lambda _: log.info("quantised %s %s to int8 (calibrated on %d reference radiographs)", card.name,
                                 card.version, len(calibration)),
    )


def _quantize(fp32: OnnxRuntime, card: ModelCard, calibration: np.ndarray) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if fp32.model_bytes is None:
        raise ModelError("the fp32 graph is no longer at hand to quantise")
    metadata = np.zeros((1, card.metadata_features), dtype=np.float32) if card.takes_metadata else None

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._rows = iter(range(len(calibration)))

        def get_next(self):
            i = next(self._rows, None)
            if i is None:
                return None
            feeds = {"input": calibration[i : i + 1]}
            if metadata is not None:
                feeds["metadata"] = metadata
            return feeds

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser warns once per BatchNorm about per-channel axes
    try:
        with tempfile.TemporaryDirectory(prefix="cxr-int8-") as tmp:
            src, pre, out = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
            src.write_bytes(fp32.model_bytes)
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            return out.read_bytes()
    finally:
        root.setLevel(level)
