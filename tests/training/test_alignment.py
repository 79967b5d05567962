"""HASS alignment harmonizes training with decoding: the output of training step j at position t equals the
draft run autoregressively at decoding depth j from position t - j on its own predicted features."""

from __future__ import annotations

import pytest
import torch

from hass_deploy.models.checkpoint import init_draft
from hass_deploy.runtime.kv import KVBuffers
from hass_deploy.training.alignment import HarmonizedDraft, alignment_mask, shift_predictions


def aligned_outputs(head, features, ids, valid, steps):
    model, sets, outputs = HarmonizedDraft(head), [features], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(sets, ids, valid)
            outputs.append(out)
            sets.append(shift_predictions(sets[-1], out))
    return outputs


def decode_at_depth(head, features, ids, t, depth):
    """Run the draft as the decoder does: true pairs (f_i, x_{i+1}) for i <= t - depth, then `depth` steps
    feeding back its own output with the teacher-forced token, through its KV cache."""
    config = head.config
    kv = KVBuffers(1, config.num_kv_heads, config.head_dim, 64, torch.float32)
    start = t - depth
    with torch.no_grad():
        out = head(features[:, : start + 1], ids[:, : start + 1], torch.arange(start + 1)[None], None, kv, 0)
        g = out[:, -1:]
        for pos in range(start + 1, t + 1):
            g = head(g, ids[:, pos : pos + 1], torch.tensor([[pos]]), None, kv, pos)
    return g[0, 0]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_training_step_j_equals_decoding_depth_j(arch, targets):
    head = init_draft(targets[arch], seed=1).float()
    gen = torch.Generator().manual_seed(0)
    seq_len, hidden = 12, head.config.hidden_size
    features = torch.randn(1, seq_len, hidden, generator=gen)
    ids = torch.randint(0, head.config.vocab_size, (1, seq_len), generator=gen)
    outputs = aligned_outputs(head, features, ids, torch.ones(1, seq_len, dtype=torch.bool), steps=4)
    for depth in range(4):
        for t in range(depth, seq_len):
            expected = decode_at_depth(head, features, ids, t, depth)
            assert (outputs[depth][0, t] - expected).abs().max() <= 1e-5, (depth, t)


def test_padding_does_not_change_real_positions(targets):
    """Proper -inf masking: a sample's outputs are the same alone and right-padded in a longer batch."""
    head = init_draft(targets["llama"], seed=2).float()
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 10, head.config.hidden_size, generator=gen)
    ids = torch.randint(0, head.config.vocab_size, (2, 10), generator=gen)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    padded = aligned_outputs(head, features, ids, valid, steps=3)
    alone = aligned_outputs(head, features[1:, :6], ids[1:, :6], valid[1:, :6], steps=3)
    for step in range(3):
        assert (padded[step][1, :6] - alone[step][0]).abs().max() <= 1e-5
        assert torch.isfinite(padded[step]).all()


def test_step_zero_is_the_plain_causal_draft(targets):
    head = init_draft(targets["qwen3"], seed=3).float()
    features = torch.randn(1, 9, head.config.hidden_size)
    ids = torch.randint(0, head.config.vocab_size, (1, 9))
    (out,) = aligned_outputs(head, features, ids, torch.ones(1, 9, dtype=torch.bool), steps=1)
    with torch.no_grad():
        plain = head(features, ids, torch.arange(9)[None])
    assert (out - plain).abs().max() <= 1e-5


def test_alignment_mask_matches_the_worked_example():
    """algorithm.md §3.3, N = 6, step 2: row r sees set 0 at j <= r-2, set 1 at r-1, set 2 at r."""
    mask = alignment_mask(torch.ones(1, 6, dtype=torch.bool), step=2)[0, 0]  # [6, 18]
    source = torch.full((6, 6), -1)
    for k in range(3):
        source[mask[:, k * 6 : (k + 1) * 6]] = k
    expected = torch.tensor([[2, -1, -1, -1, -1, -1],
                             [1, 2, -1, -1, -1, -1],
                             [0, 1, 2, -1, -1, -1],
                             [0, 0, 1, 2, -1, -1],
                             [0, 0, 0, 1, 2, -1],
                             [0, 0, 0, 0, 1, 2]])
    assert torch.equal(source, expected)
    assert mask.sum(1).tolist() == [1, 2, 3, 4, 5, 6]  # every row covers columns 0..r exactly once
