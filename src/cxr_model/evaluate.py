"""Evaluating and calibrating a model directory on a data set split.

:func:`evaluate` writes ``metrics.json`` (top-level keys ``auroc``,
``auroc_ci95``, ``mean_auroc``, ``auprc``, ``operating_points``, ``ece``,
``localization`` when boxes exist, plus ``model``, ``data`` and ``notice``
saying what was measured), ``roc.png`` and ``reliability.png``.

:func:`calibrate` fits a per-finding calibration (NLL on the split) -
temperature scaling sigmoid(z / T), or Platt scaling sigmoid(a z + b) - and
operating thresholds (Youden's J, or a fixed specificity per finding) on the
*calibrated* probabilities, since that is what the service thresholds, and
writes them into the model card; the weights and their hash do not change.
:func:`evaluate` applies whichever calibration the card holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch.utils.data import DataLoader

from .cam import cams_for_image, raw_cams
from .card import ModelCard, load_card, write_card
from .datasets import SPLIT_NAMES, Box, LabelledSet, load_splits
from .errors import ModelError
from .image_io import load_image_file
from .metrics import (
    LogitCalibration,
    auroc,
    average_precision,
    bootstrap_auroc_ci,
    expected_calibration_error,
    fit_platt,
    fit_temperature,
    iobb,
    pointing_hit,
    sensitivity_specificity,
    sigmoid,
    threshold_at_specificity,
    youden_threshold,
)
from .network import CLASSIFIER_WEIGHT, LogitsAndFeatures, load_network
from .phantoms import PHANTOM_NOTE, read_manifest
from .plots import reliability_png, roc_png
from .preprocess import preprocess
from .train import ImageSet, mean_defined, predict_logits

METRICS_FILE = "metrics.json"
IOBB_LEVELS = (0.1, 0.25, 0.5)
#: NIH boxes are in the pixels of the 1024 x 1024 PNGs of the release.
NIH_BOX_REFERENCE = 1024
CAM_REGION_LEVEL = 0.5
NOT_CLINICAL = "Evaluation of a model on the given data; not a clinical validation. NOT FOR DIAGNOSTIC USE."
CALIBRATION_METHODS = ("temperature", "platt")


def _device(device: str | None) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _aligned(card: ModelCard, data: LabelledSet, logits: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Card labels present in the data, with labels/mask/logits columns in the card's order (by name)."""
    names = [label for label in card.labels if label in data.labels_names]
    if not names:
        raise ModelError(f"none of the model's labels {list(card.labels)} is in the data set {list(data.labels_names)}")
    d_idx = [data.labels_names.index(n) for n in names]
    c_idx = [card.labels.index(n) for n in names]
    return names, data.labels[:, d_idx], data.mask[:, d_idx], logits[:, c_idx]


def score_split(model_dir: str | Path, data: LabelledSet, *, batch_size: int = 16, device: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> tuple[ModelCard, np.ndarray]:
    card = load_card(model_dir)
    dev = _device(device)
    net = load_network(model_dir, card).to(dev)
    loader = DataLoader(ImageSet(data, card), batch_size=batch_size, shuffle=False, num_workers=0)
    return card, predict_logits(net, loader, dev, amp=False, progress=progress)


def card_calibration(card: ModelCard, names: list[str]) -> LogitCalibration:
    """The card's calibration of the named findings, as the service applies it (cxr_model.Model.probabilities)."""
    return LogitCalibration.from_entries([card.calibration.get(n, {}) for n in names])


def classification_metrics(card: ModelCard, names: list[str], y: np.ndarray, m: np.ndarray, z: np.ndarray, *,
                           n_boot: int, seed: int) -> dict[str, Any]:
    raw_p = sigmoid(z)
    cal_p = sigmoid(card_calibration(card, names)(z))
    ci = bootstrap_auroc_ci(y, z, m, n_boot=n_boot, seed=seed)
    auc, ap, ops, ece_before, ece_after = {}, {}, {}, {}, {}
    for j, name in enumerate(names):
        keep = m[:, j] > 0
        yj, zj = y[keep, j], z[keep, j]
        auc[name] = auroc(yj, zj) if keep.any() else None
        ap[name] = average_precision(yj, zj) if keep.any() else None
        thr = card.thresholds[name]
        sens, spec = sensitivity_specificity(yj, cal_p[keep, j], thr) if keep.any() else (None, None)
        ops[name] = {"threshold": thr, "sensitivity": sens, "specificity": spec,
                     "positives": int(yj.sum()), "negatives": int((1 - yj).sum())}
        ece_before[name] = expected_calibration_error(yj, raw_p[keep, j]) if keep.any() else None
        ece_after[name] = expected_calibration_error(yj, cal_p[keep, j]) if keep.any() else None
    calibrated = bool(card.calibration)
    return {
        "auroc": auc,
        "auroc_ci95": {n: (list(c) if c is not None and auc[n] is not None else None) for n, c in zip(names, ci)},
        "mean_auroc": mean_defined(auc),
        "auprc": ap,
        "operating_points": ops,
        "ece": {"before": ece_before, "after": ece_after if calibrated else None,
                "bins": 15, "calibrated": calibrated,
                "methods": {n: card.calibration_method(n) for n in names} if calibrated else None},
        "_curves": (y, m, z, raw_p, cal_p),
    }


def localization_metrics(model_dir: str | Path, card: ModelCard, data: LabelledSet, boxes: list[Box], *,
                         reference_size: float | None, seed: int, device: str | None = None) -> dict[str, Any] | None:
    """Pointing game and IoBB hit rates of the CAMs against the boxes of the images in ``data``,
    beside the same scores for a random map (uniform noise on the CAM grid, mapped to the image the same way)."""
    position = {name: i for i, name in enumerate(data.names)}
    by_image: dict[str, list[Box]] = {}
    for b in boxes:
        if b.image in position and b.finding in card.labels:
            by_image.setdefault(b.image, []).append(b)
    if not by_image:
        return None
    dev = _device(device)
    module = LogitsAndFeatures(load_network(model_dir, card)).to(dev).eval()
    weight = module.net.state_dict()[CLASSIFIER_WEIGHT].detach().float().cpu()  # image-feature columns only
    metadata = data.metadata_matrix() if card.takes_metadata else None
    rng = torch.Generator().manual_seed(seed)
    tallies: dict[str, dict[str, list[float]]] = {}
    for name in sorted(by_image):
        image = load_image_file(data.paths[position[name]])
        x, geo = preprocess(image, card)
        m = None if metadata is None else torch.from_numpy(metadata[position[name]])[None].to(dev)
        with torch.no_grad():
            _, feats = module(torch.from_numpy(x)[None].to(dev), m)
        feats = feats.float().cpu()
        cams = cams_for_image(raw_cams(feats, weight)[0], geo)
        rand = cams_for_image(torch.rand((1,) + tuple(feats.shape[-2:]), generator=rng), geo)[0]
        scale = 1.0 if reference_size is None else image.shape[1] / reference_size
        scale_y = 1.0 if reference_size is None else image.shape[0] / reference_size
        for b in by_image[name]:
            box = (b.x * scale, b.y * scale_y, b.w * scale, b.h * scale_y)
            cam = cams[card.labels.index(b.finding)]
            t = tallies.setdefault(b.finding, {k: [] for k in ("pg", "rpg", *(f"iobb{lv}" for lv in IOBB_LEVELS),
                                                              *(f"riobb{lv}" for lv in IOBB_LEVELS), "area")})
            t["pg"].append(float(pointing_hit(cam, box)))
            t["rpg"].append(float(pointing_hit(rand, box)))
            v, rv = iobb(cam, box, CAM_REGION_LEVEL), iobb(rand, box, CAM_REGION_LEVEL)
            for lv in IOBB_LEVELS:
                t[f"iobb{lv}"].append(float(v > lv))
                t[f"riobb{lv}"].append(float(rv > lv))
            t["area"].append(box[2] * box[3] / (image.shape[0] * image.shape[1]))

    def per(key: str) -> dict[str, float]:
        return {f: float(np.mean(t[key])) for f, t in sorted(tallies.items())}

    return {
        "pointing_game": per("pg"),
        "random_pointing_game": per("rpg"),
        "iobb": {str(lv): per(f"iobb{lv}") for lv in IOBB_LEVELS},
        "random_iobb": {str(lv): per(f"riobb{lv}") for lv in IOBB_LEVELS},
        "boxes": {f: len(t["pg"]) for f, t in sorted(tallies.items())},
        "mean_box_area_fraction": per("area"),
        "method": (f"CAM argmax inside the box (pointing game); IoBB = |R & box| / |R| with R = CAM >= "
                   f"{CAM_REGION_LEVEL} x max, hit when IoBB > level; random control = uniform noise on the "
                   "CAM grid mapped to the image like the CAM"),
    }


def _model_splits(model_dir: str | Path, dataset: str, data_dir: str | Path, scheme: str | None, seed: int | None,
                  uncertainty: str, stream: TextIO
                  ) -> tuple[str, int, dict[str, LabelledSet], list[Box], dict[str, object] | None]:
    """The splits the model was trained with (scheme and seed from its card unless given), the boxes and the
    phantom manifest (None for real data); says so when the data are synthetic phantoms."""
    card = load_card(model_dir)
    trained = card.provenance.get("config", {}) if isinstance(card.provenance.get("config"), Mapping) else {}
    scheme = scheme or trained.get("split", "official")
    seed = int(seed if seed is not None else trained.get("seed", 0))
    splits, boxes = load_splits(dataset, data_dir, scheme=scheme, seed=seed, uncertainty=uncertainty)
    manifest = read_manifest(data_dir)
    if manifest is not None:
        stream.write(f"*** {PHANTOM_NOTE} ***\n")
    return scheme, seed, splits, boxes, manifest


def evaluate(model_dir: str | Path, dataset: str, data_dir: str | Path, out_dir: str | Path, *, split: str = "test",
             scheme: str | None = None, seed: int | None = None, uncertainty: str = "ignore", n_boot: int = 1000,
             batch_size: int = 16, device: str | None = None, stream: TextIO | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score ``split`` of the data with the model and write metrics.json, roc.png and reliability.png."""
    stream = stream or sys.stdout
    if split not in SPLIT_NAMES:
        raise ModelError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
    scheme, seed, splits, boxes, manifest = _model_splits(model_dir, dataset, data_dir, scheme, seed, uncertainty, stream)
    data = splits[split]
    card, logits = score_split(model_dir, data, batch_size=batch_size, device=device, progress=progress)
    names, y, m, z = _aligned(card, data, logits)
    cls = classification_metrics(card, names, y, m, z, n_boot=n_boot, seed=seed)
    curves = cls.pop("_curves")
    for label in card.labels:  # every card label gets an entry (null where the data cannot measure it)
        for key in ("auroc", "auroc_ci95", "auprc"):
            cls[key].setdefault(label, None)
    metrics: dict[str, Any] = {
        "notice": PHANTOM_NOTE if manifest is not None else NOT_CLINICAL,
        "model": {"name": card.name, "version": card.version, "weights_sha256": card.weights_sha256, "demo": card.demo},
        "data": {"dataset": dataset, "split": split, "scheme": scheme, "seed": seed, "images": len(data),
                 "synthetic_phantoms": manifest is not None, "bootstrap_resamples": n_boot},
        **cls,
    }
    if boxes:
        ref = manifest.get("bbox_reference_size") if manifest else NIH_BOX_REFERENCE
        metrics["localization"] = localization_metrics(model_dir, card, data, boxes, reference_size=ref, seed=seed,
                                                       device=device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    y_, m_, z_, raw_p, cal_p = curves
    title = f"{card.name} {card.version} - {dataset} {split}"
    note = PHANTOM_NOTE if manifest is not None else "not a clinical validation"
    roc_png(out / "roc.png", names, y_, m_, z_, title=title, note=note)
    reliability_png(out / "reliability.png", y_, m_, raw_p, cal_p if card.calibration else None, title=title, note=note)
    stream.write(summary_text(metrics) + "\n")
    if manifest is not None:
        stream.write(f"*** {PHANTOM_NOTE} ***\n")
    return metrics


def summary_text(metrics: Mapping[str, Any]) -> str:
    fmt = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"{metrics['notice']}",
             f"model {metrics['model']['name']} {metrics['model']['version']} on {metrics['data']['dataset']} "
             f"{metrics['data']['split']} ({metrics['data']['images']} images)",
             f"mean AUROC {fmt(metrics['mean_auroc'])}"]
    for name, v in metrics["auroc"].items():
        if v is None:
            continue
        ci = metrics["auroc_ci95"].get(name)
        op = metrics["operating_points"].get(name, {})
        lines.append(f"  {name:<20} AUROC {fmt(v)} [{fmt(ci[0]) if ci else ' n/a'}, {fmt(ci[1]) if ci else 'n/a'}] "
                     f"AUPRC {fmt(metrics['auprc'].get(name))} sens {fmt(op.get('sensitivity'))} "
                     f"spec {fmt(op.get('specificity'))} @ {op.get('threshold', float('nan')):.3f}")
    loc = metrics.get("localization")
    if loc:
        lines.append("localisation (pointing game, model vs random map; IoBB>0.1/0.25/0.5 hit rates):")
        for f, pg in loc["pointing_game"].items():
            iob = "/".join(fmt(loc["iobb"][str(lv)][f]) for lv in IOBB_LEVELS)
            lines.append(f"  {f:<20} {fmt(pg)} vs {fmt(loc['random_pointing_game'][f])}  IoBB {iob}  "
                         f"({loc['boxes'][f]} boxes)")
    return "\n".join(lines)


def parse_specificity(spec: str | Mapping[str, float] | None, labels: tuple[str, ...]) -> dict[str, float]:
    """'0.9' (all findings) or 'Nodule=0.95,Mass=0.9' -> fixed specificity per finding (others: Youden)."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, Mapping):
        items = [(k, float(v)) for k, v in spec.items()]
    else:
        items = []
        for part in (p.strip() for p in str(spec).split(",") if p.strip()):
            k, _, v = part.rpartition("=")
            items.append((k.strip() or None, float(v)))
    out: dict[str, float] = {}
    for k, v in items:
        if not 0.0 < v <= 1.0:
            raise ModelError(f"specificity must be in (0, 1], got {v}")
        if k is None:
            out.update({label: v for label in labels})
        elif k not in labels:
            raise ModelError(f"specificity for unknown finding {k!r}")
        else:
            out[k] = v
    return out


#: Fewest positive and negative images per finding for a threshold by Youden's J; a fixed specificity s
#: wants MIN_CASES / (1 - s) negatives (10 false positives' worth: 100 for 0.9, 200 for 0.95).
MIN_CASES = 10


def split_too_small(positives: int, negatives: int, specificity: float | None, threshold: float) -> str:
    """Why a split cannot place an operating point reliably, or '' (the check behind calibrate's warning)."""
    problems = []
    if positives < MIN_CASES:
        problems.append(f"{positives} positive image(s) (fewer than {MIN_CASES})")
    wanted = MIN_CASES if specificity is None or specificity >= 1 else math.ceil(MIN_CASES / (1 - specificity))
    if negatives < wanted:
        target = "" if specificity is None else f" for specificity {specificity:g}"
        problems.append(f"{negatives} negative image(s) (fewer than {wanted}{target})")
    if not 0.001 < threshold < 0.999:
        problems.append(f"the threshold landed at the end of the scale ({threshold:.3f})")
    return "; ".join(problems)


def calibrate(model_dir: str | Path, dataset: str, data_dir: str | Path, *, split: str = "val", scheme: str | None = None,
              seed: int | None = None, uncertainty: str = "ignore", specificity: str | Mapping[str, float] | None = None,
              method: str = "temperature", batch_size: int = 16, device: str | None = None,
              stream: TextIO | None = None, progress: Callable[[int, int], None] | None = None,
              warn: Callable[[str], None] | None = None) -> ModelCard:
    """Fit a calibration per finding (``method``: 'temperature' = T of sigmoid(z / T), 'platt' = a, b of
    sigmoid(a z + b), both by NLL on ``split``) and thresholds, and write them into the model card."""
    stream = stream or sys.stdout
    if method not in CALIBRATION_METHODS:
        raise ModelError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    scheme, seed, splits, _, manifest = _model_splits(model_dir, dataset, data_dir, scheme, seed, uncertainty, stream)
    data = splits[split]
    card, logits = score_split(model_dir, data, batch_size=batch_size, device=device, progress=progress)
    names, y, m, z = _aligned(card, data, logits)
    warn = warn or (lambda message: sys.stderr.write(f"warning: {message}\n"))
    too_small: list[str] = []
    fixed_spec = parse_specificity(specificity, card.labels)
    calibration = dict(card.calibration)
    thresholds = dict(card.thresholds)
    report: dict[str, Any] = {}
    for j, name in enumerate(names):
        keep = m[:, j] > 0
        yj, zj = y[keep, j], z[keep, j]
        if method == "platt":
            ab = fit_platt(yj, zj)
            entry = None if ab is None else {"platt_a": ab[0], "platt_b": ab[1]}
        else:
            t = fit_temperature(yj, zj)
            entry = None if t is None else {"temperature": t}
        if entry is None:
            report[name] = {"skipped": "needs positive and negative images"}
            stream.write(f"  {name:<20} skipped: the {split} split lacks positives or negatives\n")
            continue
        p_before, p_after = sigmoid(zj), sigmoid(LogitCalibration.from_entries([entry])(zj[:, None])[:, 0])
        if name in fixed_spec:
            thr, rule = threshold_at_specificity(yj, p_after, fixed_spec[name]), f"specificity >= {fixed_spec[name]}"
        else:
            thr, rule = youden_threshold(yj, p_after), "Youden's J"
        calibration[name] = entry
        if thr is not None:
            thresholds[name] = float(min(max(thr, 0.0), 1.0))
        problem = split_too_small(int(yj.sum()), int((1 - yj).sum()), fixed_spec.get(name), thresholds[name])
        if problem:
            warn(f"{name}: {problem} in the {split} split ({len(data)} images): the threshold "
                 f"{thresholds[name]:.3f} ({rule}) is not to be trusted; calibrate on a larger split")
            too_small.append(f"{name}: {problem}")
        sens, spec = sensitivity_specificity(yj, p_after, thresholds[name])
        report[name] = {**entry, "threshold": thresholds[name], "rule": rule,
                        "ece_before": expected_calibration_error(yj, p_before),
                        "ece_after": expected_calibration_error(yj, p_after),
                        "sensitivity": sens, "specificity": spec, "images": int(keep.sum())}
        fitted = (f"a={entry['platt_a']:.3f} b={entry['platt_b']:+.3f}" if method == "platt"
                  else f"T={entry['temperature']:.3f}")
        stream.write(f"  {name:<20} {fitted} threshold={thresholds[name]:.3f} ({rule}) ECE "
                     f"{report[name]['ece_before']:.4f} -> {report[name]['ece_after']:.4f}\n")
    evaluation = dict(card.evaluation)
    what = "temperature scaling" if method == "temperature" else "Platt scaling sigmoid(a logit + b)"
    evaluation["calibration"] = {
        "method": f"per-finding {what} (NLL); thresholds on calibrated probabilities",
        "dataset": dataset, "split": split, "scheme": scheme, "seed": seed, "images": len(data), "findings": report,
    }
    if too_small:
        evaluation["calibration"]["warnings"] = too_small
    if manifest is not None:
        evaluation["calibration"]["note"] = PHANTOM_NOTE
    provenance = dict(card.provenance)
    provenance["thresholds"] = f"fitted by cxr_model.evaluate.calibrate on {dataset} {split}"
    new = dataclasses.replace(card, thresholds=thresholds, calibration=calibration, evaluation=evaluation,
                              provenance=provenance)
    write_card(new, model_dir)
    load_card(model_dir)  # the card written must read back
    if manifest is not None:
        stream.write(f"*** {PHANTOM_NOTE} ***\n")
    return new
