"""The model card: what a model directory claims about its weights.

A model is a directory holding a weights file (a plain ``torch.save`` state
dict) and ``model_card.json``.  The card is validated when it is built, so a
:class:`ModelCard` that exists is internally consistent; whether it matches
the weights is checked by :func:`cxr_model.model.load_model`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import metadata as _metadata
from .errors import ModelError
from .labels import DEFAULT_URGENCY, UNKNOWN_LABEL_URGENCY, URGENCY_CLASSES

CARD_FILE = "model_card.json"
ARCHITECTURE = "monai.DenseNet121"
NORMALIZATIONS = ("imagenet", "xrv")
WEIGHTS_DTYPES = ("float32", "float16")
#: the parameter sets a calibration entry may hold: temperature scaling sigmoid(z / T) or Platt scaling
#: sigmoid(a z + b); an empty entry (or a label without one) means uncalibrated.
CALIBRATION_METHODS: dict[str, frozenset[str]] = {
    "temperature": frozenset({"temperature"}),
    "platt": frozenset({"platt_a", "platt_b"}),
}


@dataclass(frozen=True)
class ModelCard:
    """Validated description of one model directory (``model_card.json``)."""

    name: str
    version: str
    labels: tuple[str, ...]
    input_size: int
    in_channels: int
    normalization: str
    thresholds: dict[str, float]
    calibration: dict[str, dict[str, float]]
    evaluation: dict[str, Any]
    weights_file: str
    weights_sha256: str
    intended_use: str
    demo: bool
    architecture: str = ARCHITECTURE
    #: dtype the weights are *stored* in; they are always cast to float32 on load.
    weights_dtype: str = "float32"
    #: where the weights came from (importer, source checkpoint hash, notes).
    provenance: dict[str, Any] = field(default_factory=dict)
    #: the metadata vector the network takes beside the image (see :mod:`cxr_model.metadata`); {} = none.
    #: Absent from the JSON of a model without metadata, so older cards read (and write) unchanged.
    metadata_inputs: dict[str, Any] = field(default_factory=dict)
    #: how soon each flagged finding needs a radiologist: one of URGENCY_CLASSES per label. A card
    #: without it (or without some labels) gets DEFAULT_URGENCY, and "urgent" for labels it does not know.
    urgency: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(field_name: str, why: str) -> ModelError:
            return ModelError(f"model card field {field_name!r}: {why}")

        for name in ("name", "version", "weights_file", "intended_use"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise bad(name, f"must be a non-empty string, got {value!r}")
        if Path(self.weights_file).name != self.weights_file or self.weights_file in (".", ".."):
            raise bad("weights_file", f"must be a plain file name inside the model directory, got {self.weights_file!r}")
        labels = tuple(self.labels)
        if not labels or not all(isinstance(x, str) and x for x in labels):
            raise bad("labels", "must be a non-empty list of names")
        if len(set(labels)) != len(labels):
            raise bad("labels", f"has duplicates: {labels}")
        object.__setattr__(self, "labels", labels)
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or not 32 <= self.input_size <= 4096:
            raise bad("input_size", f"must be an integer in [32, 4096], got {self.input_size!r}")
        if self.in_channels not in (1, 3) or isinstance(self.in_channels, bool):
            raise bad("in_channels", f"must be 1 or 3, got {self.in_channels!r}")
        if self.normalization not in NORMALIZATIONS:
            raise bad("normalization", f"must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        expected_channels = 3 if self.normalization == "imagenet" else 1
        if self.in_channels != expected_channels:
            raise bad(
                "in_channels",
                f"normalization {self.normalization!r} implies {expected_channels} input channel(s), "
                f"card says {self.in_channels}",
            )
        thresholds = {str(k): float(v) for k, v in dict(self.thresholds).items()}
        if set(thresholds) != set(labels):
            raise bad(
                "thresholds",
                f"must have exactly one entry per label; missing {sorted(set(labels) - set(thresholds))}, "
                f"unknown {sorted(set(thresholds) - set(labels))}",
            )
        for k, v in thresholds.items():
            if not 0.0 <= v <= 1.0:
                raise bad("thresholds", f"{k} = {v} is not a probability")
        object.__setattr__(self, "thresholds", {k: thresholds[k] for k in labels})
        calibration: dict[str, dict[str, float]] = {}
        for k, v in dict(self.calibration).items():
            if k not in labels:
                raise bad("calibration", f"unknown label {k!r}")
            if not isinstance(v, Mapping):
                raise bad("calibration", f"{k} must be an object such as {{'temperature': 1.3}} or "
                                         "{'platt_a': 0.8, 'platt_b': -0.4}")
            entry = {str(p): float(x) for p, x in v.items()}
            if entry and set(entry) not in CALIBRATION_METHODS.values():
                raise bad("calibration", f"{k}: parameters {sorted(entry)} are neither {{'temperature'}} nor "
                                         "{'platt_a', 'platt_b'}")
            t = entry.get("temperature")
            if t is not None and not (math.isfinite(t) and t > 0):
                raise bad("calibration", f"{k}: temperature must be a positive number, got {t}")
            a, b = entry.get("platt_a"), entry.get("platt_b")
            if a is not None and not (math.isfinite(a) and a > 0):
                raise bad("calibration", f"{k}: platt_a must be a positive number (a slope that keeps the ranking), "
                                         f"got {a}")
            if b is not None and not math.isfinite(b):
                raise bad("calibration", f"{k}: platt_b must be a finite number, got {b}")
            calibration[k] = entry
        object.__setattr__(self, "calibration", calibration)
        object.__setattr__(self, "evaluation", dict(self.evaluation))
        object.__setattr__(self, "provenance", dict(self.provenance))
        sha = self.weights_sha256
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise bad("weights_sha256", f"must be 64 lower-case hex digits, got {sha!r}")
        if not isinstance(self.demo, bool):
            raise bad("demo", f"must be true or false, got {self.demo!r}")
        if self.architecture != ARCHITECTURE:
            raise bad("architecture", f"only {ARCHITECTURE!r} is supported, got {self.architecture!r}")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise bad("weights_dtype", f"must be one of {WEIGHTS_DTYPES}, got {self.weights_dtype!r}")
        if not isinstance(self.metadata_inputs, Mapping):
            raise bad("metadata_inputs", f"must be an object, got {self.metadata_inputs!r}")
        try:
            object.__setattr__(self, "metadata_inputs", _metadata.check_card_entry(self.metadata_inputs))
        except ValueError as exc:
            raise bad("metadata_inputs", str(exc)) from None
        if not isinstance(self.urgency, Mapping):
            raise bad("urgency", f"must be an object of label: class, got {self.urgency!r}")
        unknown = sorted(set(self.urgency) - set(labels))
        if unknown:
            raise bad("urgency", f"unknown label(s) {unknown}")
        for label, urgency_class in self.urgency.items():
            if urgency_class not in URGENCY_CLASSES:
                raise bad("urgency", f"{label} = {urgency_class!r} is not one of {', '.join(URGENCY_CLASSES)}")
        object.__setattr__(self, "urgency", {
            label: self.urgency.get(label) or DEFAULT_URGENCY.get(label, UNKNOWN_LABEL_URGENCY) for label in labels})

    @property
    def takes_metadata(self) -> bool:
        """Whether the network takes the metadata vector of :mod:`cxr_model.metadata` beside the image."""
        return bool(self.metadata_inputs)

    @property
    def metadata_features(self) -> int:
        """Length of the metadata vector (0 = the model takes none)."""
        return len(self.metadata_inputs.get("features", ()))

    def calibration_method(self, label: str) -> str | None:
        """'temperature', 'platt' or None (uncalibrated) for one label."""
        keys = set(self.calibration.get(label, {}))
        return next((m for m, params in CALIBRATION_METHODS.items() if keys == params), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        if not d["metadata_inputs"]:  # a model without metadata keeps the card format it always had
            del d["metadata_inputs"]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ModelError(f"model card has unknown field(s) {sorted(unknown)}")
        required = {n for n, f in cls.__dataclass_fields__.items() if f.default is MISSING and f.default_factory is MISSING}
        missing = required - set(data)
        if missing:
            raise ModelError(f"model card is missing field(s) {sorted(missing)}")
        return cls(**data)


def load_card(model_dir: str | os.PathLike[str]) -> ModelCard:
    """Read and validate ``model_card.json`` from a model directory."""
    path = Path(model_dir) / CARD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"no {CARD_FILE} in model directory {Path(model_dir)}") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path} must contain a JSON object")
    try:
        return ModelCard.from_dict(data)
    except TypeError as exc:  # wrong argument types that slipped past validation
        raise ModelError(f"{path}: {exc}") from exc
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc


def write_card(card: ModelCard, model_dir: str | os.PathLike[str]) -> Path:
    """Write ``model_card.json`` atomically (temp file + rename)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / CARD_FILE
    text = json.dumps(card.to_dict(), indent=2, sort_keys=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))
    return path


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
