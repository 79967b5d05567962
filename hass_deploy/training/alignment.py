"""Harmonized context alignment (HASS, arXiv 2408.15766 §3.2; algorithm.md §3.2–3.4), with proper masking.

At decoding depth j the draft has seen true target features up to position t-j and then its own j
predictions. HASS trains step s so that query t sees exactly that: true features f_0..f_{t-s} (set 0), then
the step-k estimate at column t-s+k for k = 1..s (set k, the draft's own step-(k-1) outputs shifted right by
one, detached). Tokens are always teacher-forced. Unlike the reference, a key that is not seen takes no softmax
mass (not a zero logit that still takes some), and a real position never sees padding, so what it sees does
not depend on the batch's padded length.

All steps run in one forward (`HarmonizedDraft`): set k's fc output and K/V are computed once, by step k, and
read by every later step (the reference recomputes every earlier set at every step). Query t of step s sees a
causal prefix of set 0 but exactly one position of each later set, so those sets are not laid out as N key
columns each, almost all masked: `aligned_attention` gives each its one score per query as an extra column of a
single causal attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hass_deploy.models.draft import DraftHead
from hass_deploy.models.target import Attention


def shift_predictions(previous_set: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """The next feature set: position j holds the prediction made at j-1; position 0 keeps the true f_0.

    [B, N, H] x2 -> [B, N, H], detached: gradients never flow through earlier steps (§3.2).
    """
    return torch.cat([previous_set[:, :1], predicted[:, :-1]], dim=1).detach()


def _delay(rows: torch.Tensor, shift: int) -> torch.Tensor:
    """[B, nKV, N, D] -> the same with row t holding row t - shift (zeros before the start, which no query sees)."""
    return F.pad(rows, (0, 0, shift, 0))[:, :, : rows.shape[2]]


def aligned_attention(attention: Attention, q: torch.Tensor, keys: list[torch.Tensor],
                      values: list[torch.Tensor]) -> torch.Tensor:
    """Step s's attention: queries of set s over set 0 and one position of each set 1..s, under one softmax.

    The keys are laid out so that a plain causal mask is the alignment pattern (§3.3): key i < s is set s - i at
    position t - i (a different row for every query t), key s + j is set 0 at position j. Query t sees exactly
    the keys i <= t: sets s, s-1, ... at t, t-1, ... down to position 0, then set 0 at j <= t - s. A right-padded
    row's real queries never reach a padded position, so no mask tensor is needed at all.

    A per-query key fits no shared key column, so each is carried by an extra coordinate: the query gets its
    score q_t . k there, the key column is the unit vector on that coordinate (its score is then exactly that
    q . k) and so is the value column, which makes the output there the column's attention weight; that weight
    then scales the per-query value. One fused causal attention over s + N columns instead of a dense mask over
    (s + 1) N, with the same O(N) memory.

    Args:
        attention: the layer's attention (its head counts and o_proj).
        q: [B, nH, N, D] queries of the newest set s, RoPE applied.
        keys, values: s + 1 tensors [B, nKV, N, D], sets 0..s (RoPE at their own position j).

    Returns:
        [B, N, H], o_proj applied.
    """
    step = len(keys) - 1
    batch, heads, seq_len, dim = q.shape
    if step == 0:
        out = F.scaled_dot_product_attention(q, keys[0], values[0], is_causal=True, enable_gqa=True)
        return attention.o_proj(out.transpose(1, 2).reshape(batch, seq_len, heads * dim))
    kv_heads = keys[0].shape[1]
    groups = heads // kv_heads  # query head h reads KV head h // groups
    later_keys = torch.stack([_delay(keys[step - i], i) for i in range(step)], dim=2)  # [B, nKV, s, N, D]
    later_values = torch.stack([_delay(values[step - i], i) for i in range(step)], dim=2)
    by_group = q.view(batch, kv_heads, groups, seq_len, dim)
    later_scores = torch.einsum("bkgnd,bkind->bkgni", by_group, later_keys)  # [B, nKV, G, N, s], unscaled q . k
    # Extra coordinates padded to a multiple of 8, the head sizes fused attention kernels take.
    extra = -(-step // 8) * 8
    columns = F.pad(torch.eye(step, extra, dtype=q.dtype, device=q.device), (dim, 0))  # [s, D + E]: key i is e_i
    columns = columns.expand(batch, kv_heads, step, dim + extra)
    q_wide = torch.cat([q, F.pad(later_scores.reshape(batch, heads, seq_len, step).to(q.dtype), (0, extra - step))],
                       dim=-1)  # [B, nH, N, D + E]
    out = F.scaled_dot_product_attention(
        q_wide, torch.cat([columns, F.pad(keys[0], (0, extra))], dim=2),
        torch.cat([columns, F.pad(values[0], (0, extra))], dim=2), is_causal=True, enable_gqa=True,
        scale=dim ** -0.5)  # [B, nH, N, D + E]
    weights = out[..., dim : dim + step].reshape(batch, kv_heads, groups, seq_len, step)  # the extra keys' weights
    mixed = out[..., :dim] + torch.einsum("bkgni,bkind->bkgnd", weights, later_values).reshape(q.shape)
    return attention.o_proj(mixed.transpose(1, 2).reshape(batch, seq_len, heads * dim))


class HarmonizedDraft(nn.Module):
    """All HASS steps of a draft head: step s takes queries from set s and keys/values from sets 0..s.

    A module (not a function) so that DistributedDataParallel can wrap it: one forward and one backward per
    batch, so DDP all-reduces once.
    """

    def __init__(self, head: DraftHead):
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Args:
            features: [B, N, H] the true (noised) features, set 0, right-padded.
            input_ids: [B, N] the teacher-forced next token x_{t+1} at each position.
            steps: aligned steps to run.

        Returns:
            `steps` tensors [B, N, H]: step s's predicted next features, each with its own graph (step s + 1 reads
            them detached, as set s + 1).
        """
        head = self.head
        layer = head.layers[0]
        attention = layer.self_attn
        batch, seq_len = input_ids.shape
        embedded = head.embed_tokens(input_ids)  # [B, N, H], the same token for every set
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        current, keys, values, outputs = features, [], [], []
        for s in range(steps):
            fused = head.fc(torch.cat([embedded, current.to(embedded.dtype)], dim=-1))  # [B, N, H], set s
            q, k, v = attention.project(layer.input_layernorm(fused), head.rotary(positions, fused.dtype))
            keys.append(k)
            values.append(v)
            hidden = fused + aligned_attention(attention, q, keys, values)
            outputs.append(hidden + layer.mlp(layer.post_attention_layernorm(hidden)))
            current = shift_predictions(current, outputs[-1])
        return outputs
