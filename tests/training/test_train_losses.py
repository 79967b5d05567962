"""One training step computes the same losses and gradients as the reference's per-step computation.

`train_losses` runs every aligned step in one forward (each feature set projected once, later sets as extra
attention columns) and the vocabulary terms chunk by chunk with closed-form gradients. The reference below is
the straightforward computation it replaced, kept here as the oracle: each step recomputes every feature set
over (s + 1) N dense-masked key columns, materialises [B, N, V] log-probabilities and backpropagates on its own.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hass_deploy.config import Phase, TrainConfig
from hass_deploy.models.checkpoint import init_draft
from hass_deploy.training.alignment import HarmonizedDraft, shift_predictions
from hass_deploy.training.losses import feature_regression_loss, masked_sum
from hass_deploy.training.trainer import Batch, train_losses


def dense_alignment_mask(valid: torch.Tensor, step: int) -> torch.Tensor:
    """[B, 1, N, (s+1)N]: column k*N + j is set k at position j (the reference layout, algorithm.md §3.3)."""
    seq_len = valid.shape[1]
    t = torch.arange(seq_len)[:, None]
    j = torch.arange(seq_len)[None, :]
    pattern = torch.cat([j <= t - step] + [j == t - step + k for k in range(1, step + 1)], dim=1)
    own = torch.zeros_like(pattern)
    own[torch.arange(seq_len), step * seq_len + torch.arange(seq_len)] = True
    return ((pattern[None] & valid.repeat(1, step + 1)[:, None, :]) | own)[:, None]


def reference_step(head, feature_sets: list[torch.Tensor], input_ids: torch.Tensor, valid: torch.Tensor):
    """One aligned step, every feature set recomputed: [B, N, H] predicted next features."""
    layer = head.layers[0]
    attention = layer.self_attn
    embedded = head.embed_tokens(input_ids)
    fused = [head.fc(torch.cat([embedded, features], dim=-1)) for features in feature_sets]
    positions = torch.arange(input_ids.shape[1]).expand(input_ids.shape)
    rope = head.rotary(positions, fused[-1].dtype)
    projected = [attention.project(layer.input_layernorm(h), rope) for h in fused]
    keys = torch.cat([k for _, k, _ in projected], dim=2)
    values = torch.cat([v for _, _, v in projected], dim=2)
    step = len(feature_sets) - 1
    hidden = fused[-1] + attention.attend(projected[-1][0], keys, values, dense_alignment_mask(valid, step))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def reference_train_losses(head, lm_head, batch: Batch, config: TrainConfig, phase: Phase, noise, denominator):
    """The per-step loop: [B, N, V] soft labels and log-probs, one backward per step, gradients summed."""
    target_probs = torch.softmax(batch.targets @ lm_head.T, dim=-1)
    topk_weight = config.topk_weight(phase)
    sets, logged = [batch.features + noise], {}
    for s in range(config.steps):
        out = reference_step(head, sets, batch.input_ids, batch.valid)
        log_q = torch.log_softmax(out @ lm_head.T, dim=-1)
        total = (config.feature_weight * masked_sum(feature_regression_loss(out, batch.targets), batch.loss_mask)
                 + config.ce_weight * masked_sum(-(target_probs * log_q).sum(-1), batch.loss_mask))
        if topk_weight:
            top_probs, top_ids = torch.topk(target_probs, config.topk, dim=-1)
            total = total + topk_weight * masked_sum(-(top_probs * log_q.gather(-1, top_ids)).sum(-1),
                                                     batch.loss_mask)
        (config.step_weight(s) * total / denominator).backward()
        logged[f"loss_{s}"] = float(total.detach()) / denominator
        logged[f"top1_{s}"] = float(masked_sum((log_q.argmax(-1) == target_probs.argmax(-1)).double(),
                                               batch.loss_mask)) / denominator
        sets.append(shift_predictions(sets[-1], out))
    return logged


def random_batch(head, batch: int, seq_len: int, dtype: torch.dtype, seed: int) -> tuple[Batch, torch.Tensor]:
    """Right-padded rows of different lengths (garbage features in the padding, which no real position may see),
    a loss mask with holes, and feature noise."""
    generator = torch.Generator().manual_seed(seed)
    hidden, vocab = head.config.hidden_size, head.config.vocab_size
    features = torch.randn(batch, seq_len + 1, hidden, generator=generator, dtype=dtype)
    valid = torch.arange(seq_len)[None] < torch.tensor([seq_len, seq_len - 3, 5])[:batch, None]
    loss_mask = (valid & (torch.rand(batch, seq_len, generator=generator) > 0.25)).to(dtype)
    noise = 0.1 * torch.randn(batch, seq_len, hidden, generator=generator, dtype=dtype) * valid[..., None]
    batch_ = Batch(features[:, :-1], torch.randint(0, vocab, (batch, seq_len), generator=generator),
                   features[:, 1:] * valid[..., None], loss_mask, valid)
    return batch_, noise


def gradients(head) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in head.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("arch", "recipe", "chunk"), [("llama", "hass", 7), ("qwen3", "hass", 1024),
                                                        ("qwen2", "eagle2", 5)])
def test_train_losses_equal_the_per_step_reference(targets, arch, recipe, chunk):
    """Losses, top-1 counts and every parameter's gradient, to 1e-9 (the issue asks 1e-6): in float64 only the
    algorithm, not the order of fp32 sums, could make them differ. Steps weighted unequally, Top-K on for HASS."""
    head = init_draft(targets[arch], seed=4).double().train()
    lm_head = targets[arch].lm_head.detach().double()
    config = TrainConfig(recipe=recipe, align_steps=4, topk=5, precision="fp32", loss_chunk=chunk,
                         step_weights=(1.0, 0.7, 0.5, 0.3) if recipe == "hass" else ())
    phase = Phase(epochs=1, lr=1e-3, topk_weight=0.6)
    batch, noise = random_batch(head, 3, 12, torch.float64, seed=11)
    denominator = float(batch.loss_mask.sum())

    logged = train_losses(HarmonizedDraft(head), lm_head, batch, config, phase, noise, denominator, 1,
                          torch.device("cpu"))
    new = gradients(head)
    head.zero_grad(set_to_none=True)
    expected = reference_train_losses(head, lm_head, batch, config, phase, noise, denominator)
    reference = gradients(head)

    assert logged.keys() == expected.keys() and len(logged) == 2 * config.steps
    for key, value in expected.items():
        assert abs(logged[key] - value) <= 1e-9, key
    for name, grad in reference.items():
        assert grad.abs().max() > 0, name  # every parameter is exercised
        torch.testing.assert_close(new[name], grad, atol=1e-9, rtol=1e-9, msg=name)


def test_train_losses_in_fp32_match_the_reference(targets):
    """The production precision (fp32, no autocast): the same to 1e-6 despite different summation orders."""
    head = init_draft(targets["llama"], seed=5).train()
    lm_head = targets["llama"].lm_head.detach()
    config = TrainConfig(align_steps=3, topk=5, precision="fp32", loss_chunk=8)
    phase = Phase(epochs=1, lr=1e-3, topk_weight=1.0)
    batch, noise = random_batch(head, 3, 12, torch.float32, seed=12)
    denominator = float(batch.loss_mask.sum())
    logged = train_losses(HarmonizedDraft(head), lm_head, batch, config, phase, noise, denominator, 1,
                          torch.device("cpu"))
    new = gradients(head)
    head.zero_grad(set_to_none=True)
    expected = reference_train_losses(head, lm_head, batch, config, phase, noise, denominator)
    for key, value in expected.items():
        assert abs(logged[key] - value) <= 1e-6, key
    for name, grad in gradients(head).items():
        torch.testing.assert_close(new[name], grad, atol=1e-6, rtol=0, msg=name)


def test_bf16_autocast_step_stays_close_to_fp32(targets):
    """Under bf16 autocast (the default precision) the step runs and lands near the fp32 result: the soft labels
    stay fp32 and the log-softmax is taken in fp32, so only the matmuls round."""
    head = init_draft(targets["llama"], seed=6).train()
    lm_head = targets["llama"].lm_head.detach()
    batch, noise = random_batch(head, 3, 12, torch.float32, seed=13)
    denominator = float(batch.loss_mask.sum())
    results = {}
    for precision in ("fp32", "bf16"):
        config = replace(TrainConfig(topk=5, loss_chunk=8), precision=precision)
        logged = train_losses(HarmonizedDraft(head), lm_head, batch, config, config.phases[0], noise, denominator, 1,
                              torch.device("cpu"))
        results[precision] = (logged, gradients(head))
        head.zero_grad(set_to_none=True)
    (fp32, fp32_grads), (bf16, bf16_grads) = results["fp32"], results["bf16"]
    for key in fp32:
        if key.startswith("loss"):
            assert abs(bf16[key] - fp32[key]) <= 0.02 * abs(fp32[key]), key
    for name, grad in fp32_grads.items():
        assert torch.isfinite(bf16_grads[name]).all()
        assert (bf16_grads[name] - grad).norm() <= 0.05 * grad.norm(), name
