"""Metrics, calibration, operating points, localisation scores and losses on cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr_model.losses import class_weights, focal_loss, masked_bce
from cxr_model.metrics import (
    auroc,
    average_precision,
    bootstrap_auroc_ci,
    expected_calibration_error,
    fit_temperature,
    iobb,
    pointing_hit,
    sensitivity_specificity,
    sigmoid,
    threshold_at_specificity,
    youden_threshold,
)


def _pairwise_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return float(np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])))


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(float)
    s = np.round(rng.normal(y, 1.0), 1)  # rounding creates ties
    assert auroc(y, s) == pytest.approx(_pairwise_auroc(y, s), abs=1e-12)
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    assert auroc([1, 1, 1], [0.1, 0.2, 0.3]) is None


def test_average_precision_known_case():
    # ranking: P N P N -> precision at the two positives 1 and 2/3
    assert average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0, 0], [0.1, 0.2]) is None


def test_bootstrap_ci_shape_and_sanity():
    rng = np.random.default_rng(1)
    n = 400
    y = np.stack([(rng.random(n) < 0.3), (rng.random(n) < 0.5), np.zeros(n)], 1).astype(float)
    s = np.stack([rng.normal(2 * y[:, 0], 1), rng.normal(0, 1, n), rng.normal(0, 1, n)], 1)
    ci = bootstrap_auroc_ci(y, s, n_boot=300, seed=0)
    assert len(ci) == 3 and ci[2] is None  # no positives: undefined
    for j in (0, 1):
        lo, hi = ci[j]
        assert lo < auroc(y[:, j], s[:, j]) < hi
        assert 0.0 <= lo < hi <= 1.0
    assert ci[0][0] > 0.8  # a strong signal stays clear of chance
    assert ci[1][0] < 0.5 < ci[1][1]  # noise covers chance
    assert ci == bootstrap_auroc_ci(y, s, n_boot=300, seed=0)  # seeded
    small = bootstrap_auroc_ci(y[:100], s[:100], n_boot=300, seed=0)
    assert (small[0][1] - small[0][0]) > (ci[0][1] - ci[0][0])  # fewer images, wider interval
    mask = np.ones_like(y)
    mask[:, 2] = 0
    assert bootstrap_auroc_ci(y, s, mask, n_boot=50, seed=0)[2] is None


def test_temperature_scaling_fixes_an_overconfident_model():
    rng = np.random.default_rng(2)
    true_logit = rng.normal(0, 2, 5000)
    y = (rng.random(5000) < sigmoid(true_logit)).astype(float)
    overconfident = 3.0 * true_logit
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(y, sigmoid(overconfident))
    after = expected_calibration_error(y, sigmoid(overconfident / t))
    assert after < before / 3
    assert after < 0.03
    assert fit_temperature(np.ones(10), np.arange(10.0)) is None


def test_youden_threshold_on_a_known_case():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    t = youden_threshold(y, p)
    # t = 0.7: sens 3/4, spec 4/4 (J = .75); t = 0.4: sens 1, spec 3/4 (J = .75); the higher one wins ties
    assert t == pytest.approx(0.7)
    assert sensitivity_specificity(y, p, t) == (0.75, 1.0)
    y2 = np.array([0, 0, 1, 1])
    assert youden_threshold(y2, np.array([0.1, 0.2, 0.8, 0.9])) == pytest.approx(0.8)


def test_threshold_at_fixed_specificity():
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(1000), np.ones(200)]
    p = np.r_[rng.random(1000), 0.85 + 0.15 * rng.random(200)]
    t = threshold_at_specificity(y, p, 0.9)
    sens, spec = sensitivity_specificity(y, p, t)
    assert spec >= 0.9 and spec < 0.9 + 2 / 1000
    assert sens > 0.6  # positives above ~0.9 of the negatives' quantile
    lower = p[y == 0][p[y == 0] < t].max()  # the next lower candidate breaks the specificity target
    assert sensitivity_specificity(y, p, lower)[1] < 0.9


def test_pointing_game_and_iobb_on_constructed_maps():
    cam = np.zeros((100, 100))
    cam[40:50, 60:70] = 1.0  # a blob at rows 40-49, columns 60-69
    cam[45, 65] = 2.0
    inside = (55, 35, 20, 20)  # x, y, w, h covering columns 55-74, rows 35-54
    outside = (0, 0, 30, 30)
    assert pointing_hit(cam, inside) and not pointing_hit(cam, outside)
    assert iobb(cam / cam.max(), inside, level=0.4) == pytest.approx(1.0)
    half = (60, 40, 5, 10)  # columns 60-64 of the 10 x 10 blob
    assert iobb(cam / cam.max(), half, level=0.4) == pytest.approx(0.5)
    assert iobb(cam, outside) == 0.0
    assert iobb(np.zeros((10, 10)), inside) == 0.0
    # a box edge through pixel centres: the pixel whose centre is on the edge counts as inside
    point = np.zeros((10, 10))
    point[3, 4] = 1
    assert pointing_hit(point, (4.5, 3.5, 1, 1)) and not pointing_hit(point, (5.0, 3.0, 1, 1))


def test_class_weights_from_frequency():
    w_pos, w_neg = class_weights(np.array([10, 50, 0]), np.array([90, 50, 100]))
    assert np.allclose(w_pos, [0.9, 0.5, 0.5]) and np.allclose(w_neg, [0.1, 0.5, 0.5])
    logits = torch.zeros(4, 3)
    y = torch.tensor([[1.0, 1, 0], [0, 0, 0], [0, 1, 0], [0, 0, 0]])
    loss = masked_bce(logits, y, None, torch.from_numpy(w_pos), torch.from_numpy(w_neg))
    # every entry is -log(1/2) times its weight
    expect = np.log(2) * np.mean([0.9, 0.5, 0.5, 0.1, 0.5, 0.5, 0.1, 0.5, 0.5, 0.1, 0.5, 0.5])
    assert float(loss) == pytest.approx(expect, rel=1e-6)


def test_focal_loss():
    torch.manual_seed(0)
    z = torch.randn(16, 5)
    y = (torch.rand(16, 5) < 0.3).float()
    assert torch.allclose(focal_loss(z, y, gamma=0.0), F.binary_cross_entropy_with_logits(z, y), atol=1e-6)
    assert torch.allclose(masked_bce(z, y), F.binary_cross_entropy_with_logits(z, y), atol=1e-6)
    p = torch.sigmoid(z)
    pt = torch.where(y == 1, p, 1 - p)
    manual = (-(1 - pt) ** 2 * torch.log(pt)).mean()
    assert torch.allclose(focal_loss(z, y, gamma=2.0), manual, atol=1e-6)
    easy = torch.tensor([[4.0]]), torch.tensor([[1.0]])
    hard = torch.tensor([[-4.0]]), torch.tensor([[1.0]])
    ratio_easy = focal_loss(*easy) / masked_bce(*easy)
    ratio_hard = focal_loss(*hard) / masked_bce(*hard)
    assert ratio_easy < 1e-3 < 0.9 < ratio_hard  # easy examples are down-weighted, hard ones kept
    alpha = focal_loss(z, y, gamma=2.0, alpha=0.25)
    manual_a = (-(torch.where(y == 1, 0.25, 0.75)) * (1 - pt) ** 2 * torch.log(pt)).mean()
    assert torch.allclose(alpha, manual_a, atol=1e-6)
