"""ROC and reliability-diagram PNGs drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .metrics import auroc, reliability, roc_curve

SIZE = 640
MARGIN = 70
COLOURS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
    (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 0, 0), (0, 128, 0), (128, 128, 0),
]


def _axes(draw: ImageDraw.ImageDraw, x0: int, y0: int, side: int, xlabel: str, ylabel: str) -> None:
    draw.rectangle([x0, y0, x0 + side, y0 + side], outline=(0, 0, 0))
    for k in range(0, 11, 2):
        t = k / 10
        px, py = x0 + t * side, y0 + side - t * side
        draw.line([px, y0 + side, px, y0 + side + 4], fill=(0, 0, 0))
        draw.text((px - 8, y0 + side + 6), f"{t:.1f}", fill=(0, 0, 0))
        draw.line([x0 - 4, py, x0, py], fill=(0, 0, 0))
        draw.text((x0 - 28, py - 5), f"{t:.1f}", fill=(0, 0, 0))
    draw.text((x0 + side // 2 - 40, y0 + side + 22), xlabel, fill=(0, 0, 0))
    draw.text((4, y0 - 16), ylabel, fill=(0, 0, 0))


def _canvas(title: str, note: str, xlabel: str, ylabel: str):
    """A white image with title, note, unit-square axes and the diagonal; returns (image, draw, (x0, y0, side))."""
    img = Image.new("RGB", (SIZE + 220, SIZE), "white")
    draw = ImageDraw.Draw(img)
    side = SIZE - 2 * MARGIN
    x0, y0 = MARGIN, MARGIN
    draw.text((MARGIN, 10), title, fill=(0, 0, 0))
    draw.text((MARGIN, 26), note, fill=(180, 0, 0))
    _axes(draw, x0, y0, side, xlabel, ylabel)
    draw.line(_to_px(x0, y0, side, np.array([0, 1]), np.array([0, 1])), fill=(200, 200, 200))
    return img, draw, (x0, y0, side)


def _to_px(x0: int, y0: int, side: int, xs: np.ndarray, ys: np.ndarray) -> list[tuple[float, float]]:
    return [(x0 + float(a) * side, y0 + side - float(b) * side) for a, b in zip(xs, ys)]


def roc_png(path: str | Path, names: list[str], y: np.ndarray, mask: np.ndarray, scores: np.ndarray, *, title: str,
            note: str) -> Path:
    """One ROC curve per finding that has both classes, with its AUROC in the legend."""
    img, draw, (x0, y0, side) = _canvas(title, note, "1 - specificity", "sensitivity")
    row = 0
    for j, name in enumerate(names):
        keep = mask[:, j] > 0
        value = auroc(y[keep, j], scores[keep, j]) if keep.any() else None
        if value is None:
            continue
        fpr, tpr, _ = roc_curve(y[keep, j], scores[keep, j])
        colour = COLOURS[j % len(COLOURS)]
        draw.line(_to_px(x0, y0, side, fpr, tpr), fill=colour, width=2)
        draw.text((x0 + side + 20, y0 + 16 * row), f"{name} {value:.3f}", fill=colour)
        row += 1
    img.save(path)
    return Path(path)


def reliability_png(path: str | Path, y: np.ndarray, mask: np.ndarray, p_before: np.ndarray, p_after: np.ndarray | None,
                    *, title: str, note: str, n_bins: int = 15) -> Path:
    """Pooled reliability diagram (all findings' counted labels), before and, if calibrated, after scaling."""
    img, draw, (x0, y0, side) = _canvas(title, note, "predicted probability", "observed frequency")
    keep = mask.ravel() > 0
    curves = [("uncalibrated", p_before, (31, 119, 180))]
    if p_after is not None:
        curves.append(("temperature-scaled", p_after, (214, 39, 40)))
    for row, (label, p, colour) in enumerate(curves):
        conf, freq, count = reliability(y.ravel()[keep], p.ravel()[keep], n_bins)
        used = count > 0
        pts = _to_px(x0, y0, side, conf[used], freq[used])
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((x0 + side + 20, y0 + 16 * row), label, fill=colour)
    img.save(path)
    return Path(path)
