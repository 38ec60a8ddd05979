"""Plain functions behind ``cxr-triage model info`` and ``model predict``.

They return text (the caller prints it) and never exit the process; the
command-line parsing lives in the project's CLI.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .card import load_card
from .errors import ImageRefused, ModelError
from .image_io import load_image_file
from .model import Model, Prediction, load_model

log = logging.getLogger(__name__)

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
DEMO_NOTE = "DEMO WEIGHTS: untrained, outputs are meaningless"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

#: path -> 2-D [0, 1] image, or (image, metadata) where metadata is what Model.predict takes per image (a DICOM
#: data set, an ImageMetadata, or None); a bare image has no metadata (PNG/JPEG: age, sex and view unknown).
ImageReader = Callable[[Path], "np.ndarray | tuple[np.ndarray, Any]"]

#: (image, cam, *, finding, probability, threshold, present, summary, model_name, model_version, demo) -> RGB uint8
#: picture with its legend. cxr_model draws no pictures itself: the caller passes the service's one heatmap renderer
#: (dicom_io.render), so that `predict --heatmaps` shows what the heatmap Secondary Capture shows.
HeatmapRenderer = Callable[..., np.ndarray]


def info(model_dir: str | os.PathLike[str]) -> str:
    """A human-readable summary of a model card; the first line shouts when the weights are demo weights."""
    card = load_card(model_dir)
    lines = []
    if card.demo:
        lines.append(f"*** DEMO WEIGHTS - outputs are meaningless - {NOT_FOR_DIAGNOSTIC_USE} ***")
    lines += [
        f"name:           {card.name}",
        f"version:        {card.version}",
        f"directory:      {Path(model_dir)}",
        f"architecture:   {card.architecture}, {card.in_channels} input channel(s), {card.input_size} px",
        f"normalization:  {card.normalization}",
        f"weights:        {card.weights_file} ({card.weights_dtype}), sha256 {card.weights_sha256}",
        f"demo:           {'yes' if card.demo else 'no'}",
        f"intended use:   {card.intended_use}",
        "metadata:       " + (f"{card.metadata_inputs['encoding']}: {card.metadata_inputs.get('description', '')}"
                                if card.takes_metadata else "none (image only)"),
        "findings (threshold, calibration):",
    ]
    for label in card.labels:
        entry, method = card.calibration.get(label, {}), card.calibration_method(label)
        if method == "temperature":
            cal = f"T={entry['temperature']:g}"
        elif method == "platt":
            cal = f"Platt a={entry['platt_a']:g} b={entry['platt_b']:g}"
        else:
            cal = "uncalibrated"
        lines.append(f"  {label:<20} {card.thresholds[label]:.3f}  {cal}")
    if card.evaluation:
        lines.append("evaluation: " + json.dumps(card.evaluation, sort_keys=True))
    if card.provenance:
        lines.append("provenance: " + json.dumps(card.provenance, sort_keys=True))
    return "\n".join(lines)


def default_read_image(path: Path) -> np.ndarray:
    """PNG/JPEG reader; any other file type is skipped with a reason."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageRefused(f"unsupported file type {path.suffix or '(none)'!r}: expected PNG or JPEG")
    return load_image_file(path)


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._") or "image"


def write_heatmaps(
    image: np.ndarray, pred: Prediction, model: Model, out_dir: Path, stem: str, render: HeatmapRenderer
) -> list[Path]:
    """One overlay PNG per positive finding, or for the top finding (a summary) when none is positive."""
    from PIL import Image

    if pred.cams is None:
        raise ModelError("heat maps need a prediction made with cams=True")
    card = model.card
    summary = not pred.positive
    findings = list(pred.positive) or [pred.top()[0]]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for finding in findings:
        probability = float(pred.probabilities[finding])
        threshold = float(card.thresholds[finding])
        picture = render(
            image, pred.cams[finding], finding=finding, probability=probability, threshold=threshold,
            present=probability >= threshold, summary=summary, model_name=card.name,
            model_version=card.version, demo=card.demo,
        )
        path = out_dir / f"{stem}_{finding}.png"
        Image.fromarray(np.asarray(picture, dtype=np.uint8), mode="RGB").save(path)
        written.append(path)
    return written


def predict_records(
    paths: Iterable[str | os.PathLike[str]],
    model: Model,
    *,
    heatmaps_dir: str | os.PathLike[str] | None = None,
    read_image: ImageReader | None = None,
    render_heatmap: HeatmapRenderer | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Score files one by one; a file that cannot be read is reported, never fatal.

    With `heatmaps_dir`, `render_heatmap` draws the heatmap PNGs (required then).
    ``progress(done, total)`` is called after each file.
    """
    if heatmaps_dir is not None and render_heatmap is None:
        raise ModelError("heat maps need a renderer (render_heatmap)")
    reader = read_image or default_read_image
    card = model.card
    model_info = {"name": card.name, "version": card.version, "demo": card.demo, "runtime": model.runtime}
    records = []
    paths = list(paths)
    for index, raw in enumerate(paths):
        if progress is not None and index:
            progress(index, len(paths))
        path = Path(raw)
        rec: dict[str, Any] = {
            "file": str(path), "status": "ok", "reason": None, "model": model_info,
            "probabilities": None, "positive": None,
        }
        try:
            image, metadata = _split_read(reader(path))
            pred = model.predict([image], cams=heatmaps_dir is not None, metadata=[metadata])[0]
            rec["probabilities"] = pred.probabilities
            rec["positive"] = list(pred.positive)
            if heatmaps_dir is not None:
                written = write_heatmaps(np.asarray(image, dtype=np.float32), pred, model, Path(heatmaps_dir),
                                         _safe_stem(path), render_heatmap)
                rec["heatmaps"] = [str(p) for p in written]
        except ImageRefused as exc:
            rec.update(status="skipped", reason=exc.reason)
        except Exception as exc:  # one bad file must not stop the batch
            log.warning("failed to score %s: %s", path, exc)
            rec.update(status="error", reason=f"{type(exc).__name__}: {exc}")
        records.append(rec)
    if progress is not None and paths:
        progress(len(paths), len(paths))
    return records


def _split_read(result: Any) -> tuple[np.ndarray, Any]:
    if isinstance(result, tuple):
        image, metadata = result
        return image, metadata
    return result, None


def format_records(records: list[dict[str, Any]], *, demo: bool) -> str:
    lines = []
    if demo:
        lines.append(f"*** {DEMO_NOTE} - {NOT_FOR_DIAGNOSTIC_USE} ***")
    for rec in records:
        if rec["status"] != "ok":
            lines.append(f"{rec['file']}: {rec['status'].upper()} - {rec['reason']}")
            continue
        probs = rec["probabilities"]
        top = sorted(probs.items(), key=lambda kv: -kv[1])[:3]
        pos = ", ".join(rec["positive"]) or "none"
        lines.append(f"{rec['file']}: positive: {pos}; top: " + ", ".join(f"{k} {v:.3f}" for k, v in top))
        for h in rec.get("heatmaps", []):
            lines.append(f"  heat map: {h}")
    return "\n".join(lines)


def predict_files(
    paths: Iterable[str | os.PathLike[str]],
    model_dir: str | os.PathLike[str],
    heatmaps_dir: str | os.PathLike[str] | None = None,
    as_json: bool = False,
    read_image: ImageReader | None = None,
    *,
    runtime: str = "auto",
    model: Model | None = None,
    render_heatmap: HeatmapRenderer | None = None,
) -> str:
    """Score image files with the model in ``model_dir``; return JSON or a human-readable report.

    ``read_image(path)`` returns a 2-D [0, 1] array or raises: :class:`ImageRefused`
    makes the file ``"skipped"`` with its reason, any other exception makes it
    ``"error"``.  The default reads PNG/JPEG.  JSON is a list with one object
    per file: file, status, reason, model {name, version, demo},
    probabilities, positive (and heatmaps when written).
    """
    model = model or load_model(model_dir, runtime)  # type: ignore[arg-type]
    records = predict_records(paths, model, heatmaps_dir=heatmaps_dir, read_image=read_image,
                              render_heatmap=render_heatmap)
    if as_json:
        return json.dumps(records, indent=2)
    return format_records(records, demo=model.card.demo)
