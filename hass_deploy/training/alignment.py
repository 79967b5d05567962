"""Harmonized context alignment (HASS, arXiv 2408.15766 §3.2; algorithm.md §3.2–3.4), with proper masking.

At decoding depth j the draft has seen true target features up to position t-j and then its own j
predictions. HASS trains step s so that query t sees exactly that: true features f_0..f_{t-s} (set 0), then
the step-k estimate at column t-s+k for k = 1..s (set k, the draft's own step-(k-1) outputs shifted right by
one, detached). Tokens are always teacher-forced. Unlike the reference, masked entries are -inf (not a zero
logit that still takes softmax mass) and padded keys are masked, so what a position sees does not depend on
the batch's padded length.

Keys of all sets are laid side by side: column k*N + j holds set k at position j (RoPE position j).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from hass_deploy.models.draft import DraftHead


@lru_cache(maxsize=64)
def _alignment_pattern(seq_len: int, step: int, device: torch.device) -> torch.Tensor:
    """[N, (step+1)*N] bool: which (set, position) keys query t sees at HASS step `step` (§3.3)."""
    t = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    blocks = [j <= t - step] + [j == t - step + k for k in range(1, step + 1)]
    return torch.cat(blocks, dim=1)


def alignment_mask(valid: torch.Tensor, step: int) -> torch.Tensor:
    """The attention mask of HASS step `step` for a right-padded batch.

    Args:
        valid: [B, N] bool, True at real (non-padding) positions.
        step: s, with s + 1 feature sets.

    Returns:
        [B, 1, N, (s+1)*N] bool, True = attend.
    """
    batch, seq_len = valid.shape
    pattern = _alignment_pattern(seq_len, step, valid.device)  # [N, (s+1)N]
    keys_valid = valid.repeat(1, step + 1)  # [B, (s+1)N]
    mask = pattern[None] & keys_valid[:, None, :]
    # A padded query may see no valid key at all; let every query see its own newest-set column so the softmax
    # stays finite. Real queries already see it (the newest set at column t is always in their pattern).
    own = torch.zeros(seq_len, (step + 1) * seq_len, dtype=torch.bool, device=valid.device)
    own[torch.arange(seq_len), step * seq_len + torch.arange(seq_len)] = True
    return (mask | own)[:, None]


def shift_predictions(previous_set: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """The next feature set: position j holds the prediction made at j-1; position 0 keeps the true f_0.

    [B, N, H] x2 -> [B, N, H], detached: gradients never flow through earlier steps (§3.2).
    """
    return torch.cat([previous_set[:, :1], predicted[:, :-1]], dim=1).detach()


class HarmonizedDraft(nn.Module):
    """One HASS step of a draft head: queries from the newest feature set, keys/values from all of them.

    A module (not a function) so that DistributedDataParallel can wrap it.
    """

    def __init__(self, head: DraftHead):
        super().__init__()
        self.head = head

    def forward(self, feature_sets: list[torch.Tensor], input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Args:
            feature_sets: s + 1 tensors [B, N, H]: the true (noised) features, then the shifted step predictions.
            input_ids: [B, N] the teacher-forced next token x_{t+1} at each position.
            valid: [B, N] bool.

        Returns:
            [B, N, H] predicted next features of step s.
        """
        head = self.head
        layer = head.layers[0]
        attention = layer.self_attn
        batch, seq_len = input_ids.shape
        step = len(feature_sets) - 1
        embedded = head.embed_tokens(input_ids)  # [B, N, H], the same token for every set
        fused = [head.fc(torch.cat([embedded, features.to(embedded.dtype)], dim=-1)) for features in feature_sets]
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        rope = head.rotary(positions, fused[-1].dtype)
        projected = [attention.project(layer.input_layernorm(h), rope) for h in fused]
        keys = torch.cat([k for _, k, _ in projected], dim=2)  # [B, nKV, (s+1)N, D]
        values = torch.cat([v for _, _, v in projected], dim=2)
        hidden = fused[-1] + attention.attend(projected[-1][0], keys, values, alignment_mask(valid, step))
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
