"""Loading a model directory and scoring images with it."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from .cam import CamMaps, raw_cams
from .card import ModelCard, load_card
from .errors import ModelError
from .metadata import encode_many
from .metrics import LogitCalibration
from .network import CLASSIFIER_WEIGHT, load_network
from .preprocess import preprocess
from .image_io import load_image_file
from .paths import reference_radiograph_paths
from .runtime import OnnxRuntime, TorchRuntime, build_int8_runtime, build_onnx_runtime

log = logging.getLogger(__name__)

RuntimeName = Literal["auto", "torch", "onnx", "onnx-int8"]

#: The int8 runtime is used only if no reference probability moves further than this (and no decision flips).
INT8_MAX_PROBABILITY_SHIFT = 0.02


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image.

    ``probabilities`` are calibrated, in the card's label order;
    ``positive`` lists the labels at or above the card's operating threshold;
    ``cams`` maps every label to a float32 (H, W) map in [0, 1] on the input
    image's own pixel grid (None when CAMs were not requested).  It is a
    :class:`~cxr_model.cam.CamMaps`: all maps come from the one forward pass,
    each is brought to full resolution when first read; ``cams.stack()``
    gives all of them as one (C, H, W) array.
    """

    probabilities: dict[str, float]
    positive: tuple[str, ...]
    cams: Mapping[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        for k, p in self.probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise ModelError(f"probability of {k} is {p}, outside [0, 1]")
        unknown = set(self.positive) - set(self.probabilities)
        if unknown:
            raise ModelError(f"positive findings {sorted(unknown)} have no probability")

    def top(self) -> tuple[str, float]:
        """The label with the highest probability."""
        name = max(self.probabilities, key=self.probabilities.__getitem__)
        return name, self.probabilities[name]


class Backend(Protocol):
    """``forward(batch)``, or ``forward(batch, metadata)`` for a model whose card takes metadata."""

    name: str

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class Model:
    """A loaded model: its card, one inference back-end and the classifier weights used for CAMs."""

    def __init__(self, card: ModelCard, backend: Backend, classifier_weight: np.ndarray, *, batch_size: int = 8):
        if classifier_weight.shape[0] != len(card.labels):
            raise ModelError(
                f"label mismatch: card has {len(card.labels)} labels, classifier has {classifier_weight.shape[0]} rows"
            )
        if batch_size < 1:
            raise ModelError(f"batch_size must be >= 1, got {batch_size}")
        self.card = card
        self.backend = backend
        self.batch_size = batch_size
        self._weight = torch.as_tensor(np.asarray(classifier_weight, dtype=np.float32))
        self._calibration = LogitCalibration.from_entries([card.calibration.get(label, {}) for label in card.labels])
        self._warned_no_metadata = False
        self._threshold = np.asarray([card.thresholds[label] for label in card.labels], dtype=np.float64)

    @property
    def runtime(self) -> str:
        return self.backend.name

    def __repr__(self) -> str:
        return f"Model({self.card.name!r}, version={self.card.version!r}, runtime={self.runtime!r}, demo={self.card.demo})"

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities per label: sigmoid(logit / T) (temperature scaling), sigmoid(a logit + b)
        (Platt scaling), or sigmoid(logit) without calibration, as the card says."""
        z = self._calibration(logits)
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow

    def predict(self, images: Sequence[np.ndarray], cams: bool = True, metadata: Sequence[Any] | None = None
                ) -> list[Prediction]:
        """Score 2-D [0, 1] images (1 = brightest displayed); one Prediction per image, same order.

        ``metadata`` (one entry per image) matters only for a model whose card
        takes metadata (:attr:`ModelCard.takes_metadata`); an entry is the
        image's DICOM data set (PatientAge, PatientSex and ViewPosition are
        read from it), a :class:`~cxr_model.metadata.ImageMetadata`, or None
        for an image without metadata (a PNG/JPEG file), which is encoded as
        unknown.  Other models ignore it.
        """
        if isinstance(images, np.ndarray) and images.ndim == 2:
            raise ModelError("predict() takes a sequence of images; wrap a single image in a list")
        out: list[Prediction] = []
        images = list(images)
        meta_rows = self._metadata_matrix(metadata, len(images)) if self.card.takes_metadata else None
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            prepared = [preprocess(img, self.card) for img in chunk]
            batch = np.stack([x for x, _ in prepared])
            if meta_rows is None:
                logits, feats = self.backend.forward(batch)
            else:
                logits, feats = self.backend.forward(batch, meta_rows[start : start + len(chunk)])
            probs = self.probabilities(logits)
            maps = raw_cams(torch.from_numpy(feats), self._weight) if cams else None  # all labels, one matmul
            for i, (_, geo) in enumerate(prepared):
                p = {label: float(probs[i, j]) for j, label in enumerate(self.card.labels)}
                positive = tuple(label for j, label in enumerate(self.card.labels) if probs[i, j] >= self._threshold[j])
                cam_maps = CamMaps(self.card.labels, maps[i], geo) if maps is not None else None
                out.append(Prediction(probabilities=p, positive=positive, cams=cam_maps))
        return out

    def _metadata_matrix(self, metadata: Sequence[Any] | None, n: int) -> np.ndarray:
        if metadata is None:
            if not self._warned_no_metadata:
                log.warning("model %s %s takes age/sex/view metadata but none was given: scoring as unknown",
                            self.card.name, self.card.version)
                self._warned_no_metadata = True
            metadata = [None] * n
        metadata = list(metadata)
        if len(metadata) != n:
            raise ModelError(f"metadata: {len(metadata)} entries for {n} images")
        return encode_many(metadata)


def load_model(
    model_dir: str | os.PathLike[str],
    runtime: RuntimeName = "auto",
    *,
    threads: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    batch_size: int = 8,
) -> Model:
    """Load and verify a model directory.

    Checks the weights' SHA-256 against the card and the label count against
    the classifier, then builds the requested back-end:

    - ``"torch"``: eager PyTorch fp32 (on ``device``; default CPU).
    - ``"onnx"``: ONNX Runtime fp32 from a graph exported once and cached in
      ``cache_dir`` (default ``~/.cache/cxr-triage/onnx``), accepted only if its
      logits equal PyTorch's within 1e-4 on a fixed random input; raises
      ModelError otherwise.
    - ``"onnx-int8"``: the ONNX graph statically quantised to int8 (QDQ,
      per-channel weights), calibrated on the bundled reference radiographs and
      used only if, on each of them, every present/absent decision at the
      card's thresholds equals fp32's and no probability moves by more than
      ``INT8_MAX_PROBABILITY_SHIFT``; else ONNX Runtime fp32 with a logged
      warning. It is not equal to fp32 within 1e-4: results made with it say
      ``precision int8``.
    - ``"auto"`` (the default): on the CPU, ``"onnx-int8"`` as above (it ran
      3.3-3.7x eager PyTorch here, ONNX Runtime fp32 1.5x), falling back to
      ONNX Runtime fp32, then to PyTorch with a logged warning; PyTorch when
      ``device`` is a GPU.

    ``threads`` sets ONNX Runtime's intra-op threads (default: ONNX Runtime's
    own, one per physical core) and PyTorch's threads, which run the network
    for ``"torch"`` and the preprocessing and CAM mapping for every back-end.
    PyTorch's setting is process-wide; give ``threads`` when several model
    processes share the machine (e.g. ``threads=1`` per process with one
    process per core), else each would start one thread per core.
    """
    if runtime not in ("auto", "torch", "onnx", "onnx-int8"):
        raise ModelError(f"runtime must be 'auto', 'torch', 'onnx' or 'onnx-int8', got {runtime!r}")
    model_dir = Path(model_dir)
    card = load_card(model_dir)
    net = load_network(model_dir, card)
    weight = net.state_dict()[CLASSIFIER_WEIGHT].detach().cpu().numpy().copy()
    torch_rt = TorchRuntime(net, device=device)
    backend: Backend = torch_rt
    on_gpu = torch_rt.device.type != "cpu"
    if runtime in ("onnx", "onnx-int8") or (runtime == "auto" and not on_gpu):
        try:
            cpu_rt = torch_rt if not on_gpu else TorchRuntime(net, device="cpu")
            backend = build_onnx_runtime(
                net, card, torch_rt=cpu_rt, threads=threads, cache_dir=Path(cache_dir) if cache_dir else None
            )
        except Exception as exc:
            if runtime != "auto":
                raise ModelError(f"ONNX runtime unavailable for {card.name} {card.version}: {exc}") from exc
            log.warning("ONNX runtime unavailable for %s %s, using PyTorch: %s", card.name, card.version, exc)
    if threads is not None:
        torch.set_num_threads(int(threads))  # process-wide: PyTorch has no per-module setting
    if isinstance(backend, OnnxRuntime):
        if runtime in ("onnx-int8", "auto"):
            backend = _int8_if_faithful(backend, card, weight, threads=threads,
                                        cache_dir=Path(cache_dir) if cache_dir else None)
        backend.model_bytes = None  # the graph lives in the session now
    if card.demo:
        log.warning("model %s %s carries DEMO WEIGHTS: its outputs are meaningless, not for diagnostic use",
                    card.name, card.version)
    return Model(card, backend, weight, batch_size=batch_size)


def _int8_if_faithful(fp32: OnnxRuntime, card: ModelCard, weight: np.ndarray, *, threads: int | None,
                      cache_dir: Path | None) -> Backend:
    """The int8 runtime when its decisions on the reference radiographs equal fp32's, else ``fp32``."""
    images = [load_image_file(path) for path in reference_radiograph_paths()]
    if not images:
        log.warning("no reference radiographs to calibrate the int8 runtime; using ONNX Runtime fp32")
        return fp32
    calibration = np.stack([preprocess(image, card)[0] for image in images])
    try:
        int8 = build_int8_runtime(fp32, card, calibration=calibration, threads=threads, cache_dir=cache_dir)
    except Exception as exc:
        log.warning("int8 runtime unavailable for %s %s, using ONNX Runtime fp32: %s", card.name, card.version, exc)
        return fp32
    int8.name = "onnx-int8"
    unknown = [None] * len(images)
    reference = Model(card, fp32, weight).predict(images, cams=False, metadata=unknown)
    candidate = Model(card, int8, weight).predict(images, cams=False, metadata=unknown)
    shift = max(abs(a.probabilities[k] - b.probabilities[k]) for a, b in zip(reference, candidate) for k in card.labels)
    flips = sum(a.positive != b.positive for a, b in zip(reference, candidate))
    if flips or shift > INT8_MAX_PROBABILITY_SHIFT:
        log.warning("int8 runtime for %s %s refused: %d of %d reference radiographs change a decision, largest "
                    "probability shift %.4f (limit %.2f); using ONNX Runtime fp32", card.name, card.version, flips,
                    len(images), shift, INT8_MAX_PROBABILITY_SHIFT)
        return fp32
    log.info("int8 runtime for %s %s: decisions equal fp32's on %d reference radiographs, largest probability "
             "shift %.4f", card.name, card.version, len(images), shift)
    return int8
