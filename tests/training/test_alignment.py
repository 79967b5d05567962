"""HASS alignment harmonizes training with decoding: the output of training step j at position t equals the
draft run autoregressively at decoding depth j from position t - j on its own predicted features."""

from __future__ import annotations

import pytest
import torch

from hass_deploy.models.checkpoint import init_draft
from hass_deploy.models.target import Attention, ModelConfig
from hass_deploy.runtime.kv import KVBuffers
from hass_deploy.training.alignment import HarmonizedDraft, aligned_attention


def aligned_outputs(head, features, ids, steps):
    with torch.no_grad():
        return HarmonizedDraft(head)(features, ids, steps)


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
    outputs = aligned_outputs(head, features, ids, steps=4)
    for depth in range(4):
        for t in range(depth, seq_len):
            expected = decode_at_depth(head, features, ids, t, depth)
            assert (outputs[depth][0, t] - expected).abs().max() <= 1e-5, (depth, t)


def test_padding_does_not_change_real_positions(targets):
    """A sample's outputs are the same alone and right-padded (with garbage features) in a longer batch."""
    head = init_draft(targets["llama"], seed=2).float()
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 10, head.config.hidden_size, generator=gen)
    ids = torch.randint(0, head.config.vocab_size, (2, 10), generator=gen)
    padded = aligned_outputs(head, features, ids, steps=3)
    alone = aligned_outputs(head, features[1:, :6], ids[1:, :6], steps=3)
    for step in range(3):
        assert (padded[step][1, :6] - alone[step][0]).abs().max() <= 1e-5
        assert torch.isfinite(padded[step]).all()


def test_step_zero_is_the_plain_causal_draft(targets):
    head = init_draft(targets["qwen3"], seed=3).float()
    features = torch.randn(1, 9, head.config.hidden_size)
    ids = torch.randint(0, head.config.vocab_size, (1, 9))
    (out,) = aligned_outputs(head, features, ids, steps=1)
    with torch.no_grad():
        plain = head(features, ids, torch.arange(9)[None])
    assert (out - plain).abs().max() <= 1e-5


def visible_keys(seq_len: int, step: int) -> torch.Tensor:
    """[N, N] which set query t of `step` sees at each position j (-1: none), read off `aligned_attention` itself:
    zero queries spread the weight evenly over the visible keys, and set k's value at j is the one-hot k * N + j."""
    sets = step + 1
    width = sets * seq_len
    attention = Attention(ModelConfig("LlamaForCausalLM", 8, width, 8, 1, 1, 1, width, 1e-6, 64), 0)
    with torch.no_grad():
        attention.o_proj.weight.copy_(torch.eye(width))
        keys = [torch.randn(1, 1, seq_len, width) for _ in range(sets)]
        values = [torch.eye(width)[k * seq_len : (k + 1) * seq_len][None, None] for k in range(sets)]
        out = aligned_attention(attention, torch.zeros(1, 1, seq_len, width), keys, values)[0]  # [N, (s+1)N]
    seen = out.view(seq_len, sets, seq_len) > 0
    assert (seen.sum((1, 2)) * out.max(-1).values - 1).abs().max() < 1e-6  # even weights over what is seen
    source = torch.full((seq_len, seq_len), -1)
    for k in range(sets):
        source[seen[:, k]] = k
    assert seen.sum(1).max() <= 1  # no position is seen in two sets
    return source


def test_attention_pattern_matches_the_worked_example():
    """algorithm.md §3.3, N = 6, step 2: row r sees set 0 at j <= r-2, set 1 at r-1, set 2 at r."""
    expected = torch.tensor([[2, -1, -1, -1, -1, -1],
                             [1, 2, -1, -1, -1, -1],
                             [0, 1, 2, -1, -1, -1],
                             [0, 0, 1, 2, -1, -1],
                             [0, 0, 0, 1, 2, -1],
                             [0, 0, 0, 0, 1, 2]])
    assert torch.equal(visible_keys(6, step=2), expected)


@pytest.mark.parametrize("step", [0, 1, 3, 9])
def test_attention_pattern_at_every_step(step):
    """Row t sees position j <= t in set max(0, s - (t - j)): set 0 up to t - s, then sets 1..s one position each
    up to t itself, and never a position after t (so never a right-padded one). Step 9 outruns the sequence."""
    seq_len = 7
    expected = torch.full((seq_len, seq_len), -1)
    for t in range(seq_len):
        for j in range(t + 1):
            expected[t, j] = max(0, step - (t - j))
    assert torch.equal(visible_keys(seq_len, step), expected)
