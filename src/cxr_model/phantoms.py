"""Synthetic chest phantoms in the ChestX-ray14 layout: tests of the pipeline, not clinical claims.

Each image is a crude frontal chest (body, two dark lungs with texture, a
bright heart) plus, independently with probability ``prevalence``, visible
patterns standing for six findings at known places:

=================  ============================================================
Cardiomegaly       the heart drawn wider (its box is the heart)
Effusion           bright fluid filling the base of one lung
Pneumothorax       a textureless very dark cap at the apex of one lung
Mass               a large bright disc inside a lung
Nodule             a small bright disc inside a lung
Atelectasis        a thin bright horizontal band (plate) inside a lung
=================  ============================================================

The other eight ChestX-ray14 findings are never present (their AUROC is
undefined, which the metrics report as null).  Boxes of the drawn findings
on the test images are written to ``BBox_List_2017.csv`` in image pixels, as
NIH did for 880 of its test images; ``phantoms.json`` records what was drawn.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ModelError
from .labels import FINDINGS

PHANTOM_NOTE = "synthetic phantoms: tests of the pipeline, not clinical claims"
MANIFEST = "phantoms.json"
DRAWN_FINDINGS: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax")


@dataclass(frozen=True)
class PhantomSpec:
    n: int = 400
    size: int = 96
    seed: int = 0
    prevalence: float = 0.3
    test_fraction: float = 0.25
    images_per_patient: int = 2

    def __post_init__(self) -> None:
        if self.n < 8:
            raise ModelError(f"n must be >= 8, got {self.n}")
        if not 32 <= self.size <= 2048:
            raise ModelError(f"size must be in [32, 2048], got {self.size}")
        if not 0 < self.prevalence < 1 or not 0 < self.test_fraction < 1:
            raise ModelError("prevalence and test_fraction must lie in (0, 1)")
        if self.images_per_patient < 1:
            raise ModelError("images_per_patient must be >= 1")


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)


def draw_phantom(rng: np.random.Generator, size: int, findings: set[str]) -> tuple[np.ndarray, dict[str, tuple[float, float, float, float]]]:
    """One phantom (float32 (S, S) in [0, 1]) and the box (x, y, w, h) of every drawn finding."""
    s = float(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dy, dx = rng.normal(0, 0.02 * s, 2)  # patient positioning
    img = np.full((size, size), 0.08)
    img[_ellipse(yy, xx, 0.55 * s + dy, 0.5 * s + dx, 0.5 * s, 0.42 * s)] = 0.45  # body
    lungs = []
    for side in (-1, 1):
        lung = _ellipse(yy, xx, 0.47 * s + dy, 0.5 * s + dx + side * 0.19 * s, 0.3 * s, 0.14 * s)
        lungs.append(lung)
    lung_any = lungs[0] | lungs[1]
    texture = rng.normal(0, 1, (max(size // 4, 2), max(size // 4, 2)))
    texture = np.kron(texture, np.ones((4, 4)))[:size, :size] if size // 4 >= 2 else texture
    texture = np.pad(texture, ((0, size - texture.shape[0]), (0, size - texture.shape[1])), mode="edge")
    img[lung_any] = 0.2 + 0.04 * texture[lung_any]
    boxes: dict[str, tuple[float, float, float, float]] = {}
    heart_rx = (0.2 if "Cardiomegaly" in findings else 0.11) * s
    heart = _ellipse(yy, xx, 0.66 * s + dy, 0.53 * s + dx, 0.12 * s, heart_rx)
    img[heart] = 0.7
    if "Cardiomegaly" in findings:
        boxes["Cardiomegaly"] = _box_of(heart)

    def lung_point(lung: np.ndarray, margin: float) -> tuple[float, float]:
        ys, xs = np.nonzero(lung)
        cy, cx = ys.mean(), xs.mean()
        ry, rx = (ys.max() - ys.min()) / 2, (xs.max() - xs.min()) / 2
        for _ in range(50):
            py, px = cy + rng.uniform(-1, 1) * ry * 0.6, cx + rng.uniform(-1, 1) * rx * 0.6
            if lung[int(np.clip(py, 0, size - 1)), int(np.clip(px, 0, size - 1))]:
                return float(py) + 0.5, float(px) + 0.5
        return float(cy) + 0.5, float(cx) + 0.5

    if "Effusion" in findings:
        lung = lungs[rng.integers(2)]
        ys = np.nonzero(lung)[0]
        level = ys.max() - 0.3 * (ys.max() - ys.min())
        fluid = lung & (yy >= level)
        img[fluid] = 0.75
        boxes["Effusion"] = _box_of(fluid)
    if "Pneumothorax" in findings:
        lung = lungs[rng.integers(2)]
        ys = np.nonzero(lung)[0]
        cap = lung & (yy <= ys.min() + 0.35 * (ys.max() - ys.min()))
        img[cap] = 0.02
        boxes["Pneumothorax"] = _box_of(cap)
    for name, radius, min_px in (("Mass", 0.08, 4.0), ("Nodule", 0.03, 2.5)):  # min_px keeps small phantoms visible
        if name in findings:
            py, px = lung_point(lungs[rng.integers(2)], radius)
            r = max(radius * s, min_px)
            disc = _ellipse(yy, xx, py, px, r, r)
            img[disc] = 0.85
            boxes[name] = _box_of(disc)
    if "Atelectasis" in findings:
        py, px = lung_point(lungs[rng.integers(2)], 0.1)
        band = (np.abs(yy - py) <= max(0.02 * s, 1.5)) & (np.abs(xx - px) <= 0.09 * s)
        img[band] = 0.8
        boxes["Atelectasis"] = _box_of(band)
    gain = rng.uniform(0.85, 1.15)
    img = img * gain + rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32), boxes


def make_phantoms(out_dir: str | Path, spec: PhantomSpec = PhantomSpec()) -> dict[str, object]:
    """Write a phantom data set in the ChestX-ray14 layout; return the manifest (also in phantoms.json)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    n_patients = int(np.ceil(spec.n / spec.images_per_patient))
    test_patients = set(rng.permutation(n_patients)[: max(1, round(spec.test_fraction * n_patients))].tolist())
    rows, train_val, test, box_rows = [], [], [], []
    for i in range(spec.n):
        patient, follow_up = divmod(i, spec.images_per_patient)
        name = f"{patient + 1:08d}_{follow_up:03d}.png"
        findings = {f for f in DRAWN_FINDINGS if rng.random() < spec.prevalence}
        img, boxes = draw_phantom(rng, spec.size, findings)
        Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(out / "images" / name)
        labels = "|".join(f for f in FINDINGS if f in findings) or "No Finding"
        rows.append([name, labels, follow_up, patient + 1, int(rng.integers(20, 90)), "MF"[int(rng.integers(2))],
                     "PA" if rng.random() < 0.6 else "AP", spec.size, spec.size, 0.143, 0.143])
        if patient in test_patients:
            test.append(name)
            box_rows += [[name, f, *(f"{v:.1f}" for v in boxes[f])] for f in DRAWN_FINDINGS if f in boxes]
        else:
            train_val.append(name)
    with open(out / "Data_Entry_2017.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
                    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"])
        w.writerows(rows)
    with open(out / "BBox_List_2017.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        w.writerows(box_rows)
    (out / "train_val_list.txt").write_text("".join(f"{x}\n" for x in train_val), encoding="utf-8")
    (out / "test_list.txt").write_text("".join(f"{x}\n" for x in test), encoding="utf-8")
    manifest = {
        "note": PHANTOM_NOTE,
        "generator": "cxr_model.phantoms.make_phantoms",
        "n": spec.n, "size": spec.size, "seed": spec.seed, "prevalence": spec.prevalence,
        "drawn_findings": list(DRAWN_FINDINGS),
        "bbox_reference_size": spec.size,
        "train_val_images": len(train_val), "test_images": len(test), "boxes": len(box_rows),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(data_dir: str | Path) -> dict[str, object] | None:
    """The phantom manifest of a data directory, or None for real data."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
