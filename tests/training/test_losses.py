"""Golden values for the draft losses, a direct computation of the Top-K distillation loss, and the chunked
vocabulary losses against the dense [B, N, V] computation with autograd (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from hass_deploy.training import losses
from hass_deploy.training.losses import (
    Teacher,
    distillation_gradient,
    feature_regression_loss,
    masked_sum,
    soft_cross_entropy,
    topk_distillation_loss,
    vocabulary_losses,
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
    loss = topk_distillation_loss(log_q, *torch.topk(p, k))
    for b in range(2):
        for t in range(3):
            top = sorted(range(50), key=lambda v: -float(p[b, t, v]))[:k]
            direct = -sum(float(p[b, t, v]) * float(log_q[b, t, v]) for v in top)
            assert math.isclose(float(loss[b, t]), direct, rel_tol=1e-5)
    # Not renormalised, and equal to the full soft cross-entropy when K covers the vocabulary.
    assert torch.allclose(topk_distillation_loss(log_q, *torch.topk(p, 50)), soft_cross_entropy(log_q, p), atol=1e-5)
    assert (topk_distillation_loss(log_q, *torch.topk(p, 5)) < soft_cross_entropy(log_q, p)).all()


def test_masked_sum_ignores_masked_positions():
    values = torch.tensor([[1.0, 2.0, 4.0]])
    assert float(masked_sum(values, torch.tensor([[1.0, 0.0, 1.0]]))) == 5.0


def test_distillation_gradient_is_autograds():
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    lm_head = torch.randn(40, 8, generator=generator, dtype=torch.float64)
    teacher = Teacher.of(target, lm_head, k=7)
    logits = torch.randn(6, 40, generator=generator, dtype=torch.float64, requires_grad=True)
    ce_weight, topk_weight = torch.rand(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    log_q = torch.log_softmax(logits, -1)
    loss = (ce_weight * soft_cross_entropy(log_q, teacher.probs)
            + topk_weight * topk_distillation_loss(log_q, teacher.top_probs, teacher.top_ids)).sum()
    (expected,) = torch.autograd.grad(loss, logits)
    got = distillation_gradient(log_q.detach().clone(), teacher, ce_weight, topk_weight)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_vocabulary_losses_in_chunks_equal_the_dense_computation(chunk):
    """Chunked, with the gradient taken in the forward: the same sums and gradients as [B, N, V] autograd."""
    generator = torch.Generator().manual_seed(2)
    steps, batch, seq_len, hidden, vocab, k = 3, 2, 5, 8, 30, 4
    outputs = [torch.randn(batch, seq_len, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(steps)]
    target = torch.randn(batch, seq_len, hidden, generator=generator, dtype=torch.float64)
    lm_head = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
    loss_mask = (torch.rand(batch, seq_len, generator=generator) > 0.3).double()
    ce_weights, topk_weights = [0.1, 0.2, 0.3], [1.0, 0.5, 0.0]

    losses = vocabulary_losses(outputs, target, lm_head, loss_mask, ce_weights, topk_weights, k, chunk)
    losses.weighted.backward()
    chunked = [out.grad.clone() for out in outputs]

    p = torch.softmax(target @ lm_head.T, -1)  # [B, N, V]
    top_probs, top_ids = torch.topk(p, k, -1)
    expected = torch.zeros(()).double()
    for s, out in enumerate(outputs):
        out.grad = None
        log_q = torch.log_softmax(out @ lm_head.T, -1)
        cross_entropy = masked_sum(soft_cross_entropy(log_q, p), loss_mask)
        topk = masked_sum(topk_distillation_loss(log_q, top_probs, top_ids), loss_mask)
        top1 = masked_sum((log_q.argmax(-1) == p.argmax(-1)).double(), loss_mask)
        assert abs(float(losses.cross_entropy[s]) - float(cross_entropy.detach())) <= 1e-9
        assert abs(float(losses.topk[s]) - float(topk.detach())) <= 1e-9
        assert float(losses.top1[s]) == float(top1)
        expected = expected + ce_weights[s] * cross_entropy + topk_weights[s] * topk
    assert abs(float(losses.weighted.detach()) - float(expected.detach())) <= 1e-9
    expected.backward()
    for got, out in zip(chunked, outputs):
        torch.testing.assert_close(got, out.grad, atol=1e-12, rtol=1e-9)
        assert (got[loss_mask == 0] == 0).all()  # unmasked positions are never projected


@pytest.mark.parametrize("chunk", [3, 1000])
def test_a_reduced_vocabulary_trains_on_p_restricted_and_renormalised(chunk):
    """EAGLE-3's objective, dense and with autograd: q over the N tokens, p restricted to them and renormalised,
    positions whose target argmax is outside the N left out of the vocabulary terms and counted as top-1 misses."""
    generator = torch.Generator().manual_seed(3)
    steps, batch, seq_len, hidden, vocab, k = 2, 2, 7, 8, 30, 3
    outputs = [torch.randn(batch, seq_len, hidden, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(steps)]
    target = torch.randn(batch, seq_len, hidden, generator=generator, dtype=torch.float64)
    lm_head = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
    loss_mask = (torch.rand(batch, seq_len, generator=generator) > 0.2).double()
    greedy = (target @ lm_head.T).argmax(-1)  # [B, N]
    vocabulary = torch.tensor(sorted(set(greedy.flatten().tolist()[::2]) | {0, 1, 2, 3}))  # about half of them
    inside = torch.isin(greedy, vocabulary)
    assert inside.any() and (~inside & (loss_mask > 0)).any()
    ce_weights, topk_weights = [0.1, 0.3], [1.0, 0.5]

    got = vocabulary_losses(outputs, target, lm_head, loss_mask, ce_weights, topk_weights, k, chunk, vocabulary)
    got.weighted.backward()
    chunked = [out.grad.clone() for out in outputs]

    rows = lm_head[vocabulary]  # [N, H]
    p = torch.softmax(target @ rows.T, -1)  # [B, N_seq, N]: restricted, renormalised
    top_probs, top_ids = torch.topk(p, k, -1)
    kept = loss_mask * inside.double()
    expected = torch.zeros(()).double()
    for s, out in enumerate(outputs):
        out.grad = None
        log_q = torch.log_softmax(out @ rows.T, -1)
        cross_entropy = masked_sum(soft_cross_entropy(log_q, p), kept)
        topk = masked_sum(topk_distillation_loss(log_q, top_probs, top_ids), kept)
        top1 = masked_sum((vocabulary[log_q.argmax(-1)] == greedy).double(), loss_mask)
        assert abs(float(got.cross_entropy[s]) - float(cross_entropy.detach())) <= 1e-9
        assert abs(float(got.topk[s]) - float(topk.detach())) <= 1e-9
        assert float(got.top1[s]) == float(top1)
        expected = expected + ce_weights[s] * cross_entropy + topk_weights[s] * topk
    assert abs(float(got.weighted.detach()) - float(expected.detach())) <= 1e-9
    expected.backward()
    for grad, out in zip(chunked, outputs):
        torch.testing.assert_close(grad, out.grad, atol=1e-12, rtol=1e-9)


def test_vocabulary_rows_never_exceed_the_chunk(monkeypatch):
    """What bounds the memory: no [*, V] tensor has more than `chunk` rows, however many positions the batch has."""
    widest = []
    real_log_probs, real_teacher = losses.draft_log_probs, losses.Teacher.of

    def log_probs(features, lm_head):
        widest.append(features.shape[0])
        return real_log_probs(features, lm_head)

    def teacher(target, lm_head, k, vocabulary=None):
        widest.append(target.shape[0])
        return real_teacher(target, lm_head, k, vocabulary)

    monkeypatch.setattr(losses, "draft_log_probs", log_probs)
    monkeypatch.setattr(losses.Teacher, "of", teacher)
    outputs = [torch.randn(4, 50, 8, requires_grad=True) for _ in range(2)]
    result = vocabulary_losses(outputs, torch.randn(4, 50, 8), torch.randn(30, 8), torch.ones(4, 50), [1.0, 1.0],
                               [1.0, 1.0], 3, chunk=16)
    result.weighted.backward()
    assert max(widest) == 16 and len(widest) == 13 * 3  # 200 rows: 13 chunks, a teacher and 2 steps each
