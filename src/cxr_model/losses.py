"""Multi-label losses with a mask (0 = label unknown, e.g. CheXpert U-Ignore) and class-imbalance handling."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ModelError

LOSSES = ("bce", "weighted-bce", "focal")


def class_weights(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CheXNet's per-class weights: w+ = |N| / (|P| + |N|), w- = |P| / (|P| + |N|).

    Rare findings thus weigh their positives up and their negatives down.  A
    class with no positives or no negatives (nothing to balance) gets
    w+ = w- = 0.5, i.e. plain BCE at the same scale as a balanced class.
    """
    p = np.asarray(positives, dtype=np.float64)
    n = np.asarray(negatives, dtype=np.float64)
    if p.shape != n.shape or (p < 0).any() or (n < 0).any():
        raise ModelError("class counts must be non-negative and of one shape")
    total = p + n
    degenerate = (p == 0) | (n == 0)
    safe = np.where(total > 0, total, 1.0)
    w_pos = np.where(degenerate, 0.5, n / safe)
    w_neg = np.where(degenerate, 0.5, p / safe)
    return w_pos.astype(np.float32), w_neg.astype(np.float32)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def masked_bce(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
    w_pos: torch.Tensor | None = None, w_neg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the counted entries of -w+ y log p - w- (1 - y) log (1 - p); weights are per class."""
    mask = torch.ones_like(target) if mask is None else mask
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    pos = target * log_p
    neg = (1.0 - target) * log_not_p
    if w_pos is not None:
        pos = pos * w_pos
    if w_neg is not None:
        neg = neg * w_neg
    return _masked_mean(-(pos + neg), mask)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
    gamma: float = 2.0, alpha: float | None = None,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): -alpha_t (1 - p_t)^gamma log p_t, mean over counted entries.

    gamma = 0 and alpha = None is plain BCE.
    """
    if gamma < 0:
        raise ModelError(f"focal gamma must be >= 0, got {gamma}")
    mask = torch.ones_like(target) if mask is None else mask
    log_pt = target * F.logsigmoid(logits) + (1.0 - target) * F.logsigmoid(-logits)
    loss = -((1.0 - log_pt.exp()) ** gamma) * log_pt
    if alpha is not None:
        loss = loss * (target * alpha + (1.0 - target) * (1.0 - alpha))
    return _masked_mean(loss, mask)
