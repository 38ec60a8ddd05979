"""Classification, calibration and localisation metrics in plain numpy (no scikit-learn).

Conventions: ``y`` holds 0/1 labels, ``s`` scores (probabilities or logits;
AUROC only needs their order), one finding at a time unless said otherwise.
A metric that is undefined (a finding with one class only) is ``None``,
never NaN, so that it serialises as JSON ``null``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ModelError

ECE_BINS = 15


def _check(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ModelError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ModelError("labels must be 0 or 1")
    return y, s


def _weighted_auroc(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC (ties count one half) of one finding under each row of ``weights`` (B, N) at once."""
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # tie groups
    wp = np.add.reduceat(w * y_sorted, starts, axis=1)
    wn = np.add.reduceat(w * (1.0 - y_sorted), starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    num = (wp * (below + 0.5 * wn)).sum(1)
    den = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U / (P N)); None without both classes."""
    y, s = _check(y, s)
    if y.min(initial=1.0) == y.max(initial=0.0):
        return None
    return float(_weighted_auroc(y, s, np.ones((1, y.size)))[0])


def average_precision(y: np.ndarray, s: np.ndarray) -> float | None:
    """Area under the precision-recall curve as average precision (step-wise, ties grouped)."""
    y, s = _check(y, s)
    n_pos = y.sum()
    if n_pos == 0 or n_pos == y.size:
        return None
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]  # end of each tie group
    tp = np.cumsum(y_sorted)[last]
    k = (np.arange(1, y.size + 1))[last]
    precision, recall = tp / k, tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) from the highest threshold down, starting at (0, 0)."""
    y, s = _check(y, s)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[s_sorted[1:] != s_sorted[:-1], True]
    tp = np.cumsum(y_sorted)[last]
    fp = np.cumsum(1.0 - y_sorted)[last]
    p, n = max(y.sum(), 1.0), max((1.0 - y).sum(), 1.0)
    return np.r_[0.0, fp / n], np.r_[0.0, tp / p], np.r_[np.inf, s_sorted[last]]


def bootstrap_auroc_ci(
    y: np.ndarray, s: np.ndarray, mask: np.ndarray | None = None, *, n_boot: int = 1000, seed: int = 0,
    level: float = 0.95, chunk: int = 100,
) -> list[tuple[float, float] | None]:
    """Percentile bootstrap CI of each finding's AUROC; ``y``, ``s``, ``mask`` are (N, C).

    Images are resampled (the same resamples for every finding, so the
    findings' correlation is kept); resamples where a finding lacks a class
    are dropped for that finding.  None where the AUROC is undefined or fewer
    than half the resamples are usable.
    """
    y = np.asarray(y, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    if y.ndim != 2 or y.shape != s.shape:
        raise ModelError(f"bootstrap needs (N, C) labels and scores of one shape, got {y.shape} and {s.shape}")
    m = np.ones_like(y) if mask is None else np.asarray(mask, dtype=np.float64)
    n, c = y.shape
    if n_boot < 1 or not 0 < level < 1:
        raise ModelError(f"n_boot must be >= 1 and level in (0, 1), got {n_boot}, {level}")
    rng = np.random.default_rng(seed)
    samples = np.full((n_boot, c), np.nan)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(b)]).astype(np.float64)
        for j in range(c):
            keep = m[:, j] > 0
            if not keep.any():
                continue
            samples[done : done + b, j] = _weighted_auroc(y[keep, j], s[keep, j], counts[:, keep])
        done += b
    out: list[tuple[float, float] | None] = []
    alpha = (1.0 - level) / 2.0
    for j in range(c):
        col = samples[:, j]
        col = col[np.isfinite(col)]
        if col.size < max(1, n_boot // 2):
            out.append(None)
        else:
            out.append((float(np.quantile(col, alpha)), float(np.quantile(col, 1.0 - alpha))))
    return out


# --------------------------------------------------------------------------- calibration


def sigmoid(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin of predicted probability: (mean confidence, observed frequency, count)."""
    y, p = _check(y, p)
    bins = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1.0)
    conf = np.bincount(bins, weights=p, minlength=n_bins) / safe
    freq = np.bincount(bins, weights=y, minlength=n_bins) / safe
    return conf, freq, count


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> float | None:
    """ECE = sum over bins of |bin| / N * |observed frequency - mean confidence|."""
    y, p = _check(y, p)
    if y.size == 0:
        return None
    conf, freq, count = reliability(y, p, n_bins)
    return float(np.sum(count / y.size * np.abs(freq - conf)))


def _nll(y: np.ndarray, z: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0.0, z) - y * z))  # BCE with logits, stable


def fit_temperature(y: np.ndarray, logits: np.ndarray, *, bounds: tuple[float, float] = (0.05, 20.0)) -> float | None:
    """Temperature T minimising the NLL of sigmoid(logit / T); None with one class only.

    The NLL is convex in a = 1/T, so a golden-section search over a is exact
    to its tolerance.
    """
    y, z = _check(y, logits)
    if y.size == 0 or y.min() == y.max():
        return None
    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]
    g = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = _nll(y, c * z), _nll(y, d * z)
    for _ in range(100):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = _nll(y, c * z)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = _nll(y, d * z)
        if b - a < 1e-7:
            break
    return float(1.0 / ((a + b) / 2.0))


def _solve_offset(y: np.ndarray, u: np.ndarray, tol: float = 1e-12) -> float:
    """The b minimising the NLL of sigmoid(u + b): the root of mean(sigmoid(u + b)) = mean(y).

    The mean is increasing in b, so Newton steps are kept inside a shrinking bracket (bisection where a
    step would leave it).  Needs both classes.
    """
    target = y.mean()
    lo, hi = -np.max(u) - 50.0, -np.min(u) + 50.0  # mean(sigmoid) ~ 0 at lo, ~ 1 at hi
    b = float(np.clip(np.log(target / (1.0 - target)) - np.mean(u), lo, hi))
    for _ in range(200):
        p = sigmoid(u + b)
        g = p.mean() - target
        if abs(g) <= tol:
            break
        if g > 0:
            hi = b
        else:
            lo = b
        if hi - lo <= tol:
            break
        h = float(np.mean(p * (1.0 - p)))
        step = b - g / h if h > 0 else lo - 1.0
        b = step if lo < step < hi else 0.5 * (lo + hi)
    return float(b)


def fit_platt(y: np.ndarray, logits: np.ndarray, *, bounds: tuple[float, float] = (0.05, 20.0)
              ) -> tuple[float, float] | None:
    """Platt scaling: (a, b) minimising the NLL of sigmoid(a logit + b); None with one class only.

    The NLL is jointly convex in (a, b), so its minimum over b for each a is convex in a: a golden-section
    search over a (kept in ``bounds``, the range of 1/T that :func:`fit_temperature` allows, so a perfectly
    separated split cannot send it to infinity) around an exact one-dimensional solve for b.
    """
    y, z = _check(y, logits)
    if y.size == 0 or y.min() == y.max():
        return None

    def profile(a: float) -> tuple[float, float]:
        b = _solve_offset(y, a * z)
        return _nll(y, a * z + b), b

    g = (np.sqrt(5.0) - 1.0) / 2.0
    lo, hi = bounds
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    (fc, _), (fd, _) = profile(c), profile(d)
    for _ in range(100):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc, _ = profile(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd, _ = profile(d)
        if hi - lo < 1e-7:
            break
    a = (lo + hi) / 2.0
    return float(a), profile(a)[1]


@dataclass(frozen=True)
class LogitCalibration:
    """Per-finding calibrated logit: z / T (temperature scaling) or a z + b (Platt scaling), from card entries.

    A finding without an entry keeps its logit.  Temperature-only calibrations compute exactly ``z / T``.
    """

    temperature: np.ndarray
    slope: np.ndarray | None = None
    offset: np.ndarray | None = None

    @classmethod
    def from_entries(cls, entries: Sequence[Mapping[str, float]]) -> LogitCalibration:
        """One card ``calibration`` entry per finding ({} = uncalibrated)."""
        t = np.asarray([e.get("temperature", 1.0) for e in entries], dtype=np.float64)
        if not any("platt_a" in e for e in entries):
            return cls(t)
        a = np.asarray([e.get("platt_a", 1.0) for e in entries], dtype=np.float64)
        b = np.asarray([e.get("platt_b", 0.0) for e in entries], dtype=np.float64)
        return cls(t, a, b)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        z = np.asarray(logits, dtype=np.float64) / self.temperature
        if self.slope is not None:
            z = z * self.slope + self.offset
        return z


# --------------------------------------------------------------------------- operating points


def sensitivity_specificity(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float | None, float | None]:
    """Sensitivity and specificity of ``p >= threshold``; None where a class is absent."""
    y, p = _check(y, p)
    pred = p >= threshold
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else None
    spec = float((~pred[neg]).mean()) if neg.any() else None
    return sens, spec


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float | None:
    """The threshold maximising J = sensitivity + specificity - 1 (``p >= t`` is positive).

    Among equally good thresholds the highest is taken (fewer false alarms).
    """
    y, p = _check(y, p)
    if y.min(initial=1.0) == y.max(initial=0.0):
        return None
    fpr, tpr, thr = roc_curve(y, p)
    j = tpr[1:] - fpr[1:]
    return float(thr[1:][int(np.argmax(j))])


def threshold_at_specificity(y: np.ndarray, p: np.ndarray, specificity: float) -> float | None:
    """The lowest threshold whose specificity is still >= ``specificity`` (maximal sensitivity there)."""
    if not 0.0 < specificity <= 1.0:
        raise ModelError(f"specificity must be in (0, 1], got {specificity}")
    y, p = _check(y, p)
    neg = np.sort(p[y == 0])
    if neg.size == 0 or y.sum() == 0:
        return None
    # p >= t is positive; specificity = fraction of negatives with p < t.
    k = int(np.ceil(specificity * neg.size - 1e-9))  # negatives that must fall below t
    if k >= neg.size:
        return float(min(1.0, np.nextafter(neg[-1], np.inf)))
    cand = neg[k]  # t = cand keeps exactly the k smallest below t (if no tie at cand)
    if k > 0 and neg[k - 1] == cand:  # ties: move above the tie
        cand = np.nextafter(cand, np.inf)
    return float(cand)


# --------------------------------------------------------------------------- localisation


def _box_pixels(shape: tuple[int, int], box: Sequence[float]) -> tuple[slice, slice]:
    """Pixels whose centres lie inside box (x, y, w, h) in pixel units of an image of ``shape``."""
    x, y, w, h = (float(v) for v in box)
    r0 = int(np.ceil(y - 0.5)); r1 = int(np.floor(y + h - 0.5)) + 1
    c0 = int(np.ceil(x - 0.5)); c1 = int(np.floor(x + w - 0.5)) + 1
    return slice(max(r0, 0), max(min(r1, shape[0]), 0)), slice(max(c0, 0), max(min(c1, shape[1]), 0))


def pointing_hit(cam: np.ndarray, box: Sequence[float]) -> bool:
    """Pointing game: does the map's maximum (its first occurrence) lie inside the box?"""
    cam = np.asarray(cam)
    r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
    rows, cols = _box_pixels(cam.shape, box)
    return rows.start <= r < rows.stop and cols.start <= c < cols.stop


def iobb(cam: np.ndarray, box: Sequence[float], level: float = 0.5) -> float:
    """Intersection over the detected region (Wang et al. 2017): |R & B| / |R|, R = {cam >= level * max}."""
    cam = np.asarray(cam, dtype=np.float64)
    peak = cam.max()
    if peak <= 0:
        return 0.0
    region = cam >= level * peak
    inside = np.zeros_like(region)
    rows, cols = _box_pixels(cam.shape, box)
    inside[rows, cols] = True
    return float((region & inside).sum() / region.sum())
