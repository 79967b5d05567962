"""Golden values for the draft losses and a direct computation of the Top-K distillation loss."""

from __future__ import annotations

import math

import torch

from hass_deploy.training.losses import (
    feature_regression_loss,
    masked_sum,
    soft_cross_entropy,
    topk_distillation_loss,
)


def test_feature_regression_is_smooth_l1_averaged_over_hidden():
    predicted = torch.tensor([[[0.0, 0.5, 3.0]]])
    target = torch.tensor([[[0.0, 0.0, 0.0]]])
    # SmoothL1(beta=1): 0.5 d^2 below 1, |d| - 0.5 above: (0 + 0.125 + 2.5) / 3
    assert torch.allclose(feature_regression_loss(predicted, target), torch.tensor([[2.625 / 3]]))


def test_soft_cross_entropy_golden():
    p = torch.tensor([[[0.5, 0.25, 0.25]]])
    log_q = torch.log(torch.tensor([[[0.25, 0.5, 0.25]]]))
    expected = -(0.5 * math.log(0.25) + 0.25 * math.log(0.5) + 0.25 * math.log(0.25))
    assert torch.allclose(soft_cross_entropy(log_q, p), torch.tensor([[expected]]))


def test_topk_loss_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 50, generator=generator), -1)
    log_q = torch.log_softmax(torch.randn(2, 3, 50, generator=generator), -1)
    k = 10
    loss = topk_distillation_loss(log_q, p, k)
    for b in range(2):
        for t in range(3):
            top = sorted(range(50), key=lambda v: -float(p[b, t, v]))[:k]
            direct = -sum(float(p[b, t, v]) * float(log_q[b, t, v]) for v in top)
            assert math.isclose(float(loss[b, t]), direct, rel_tol=1e-5)
    # Not renormalised, and equal to the full soft cross-entropy when K covers the vocabulary.
    assert torch.allclose(topk_distillation_loss(log_q, p, 50), soft_cross_entropy(log_q, p), atol=1e-5)
    assert (topk_distillation_loss(log_q, p, 5) < soft_cross_entropy(log_q, p)).all()


def test_masked_sum_ignores_masked_positions():
    values = torch.tensor([[1.0, 2.0, 4.0]])
    assert float(masked_sum(values, torch.tensor([[1.0, 0.0, 1.0]]))) == 5.0
