"""The draft head's training losses (algorithm.md §3.5), per token; the trainer masks and normalises them.

Notation: `p` is the target's next-token distribution softmax(lm_head(f_{t+1})), `log q` the draft's
log-softmax(lm_head(g_t)). Every function returns a [B, N] per-token loss so that one normaliser (the number
of loss-masked tokens in the *global* batch) makes data-parallel training equal single-process training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_regression_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SmoothL1 (beta 1) between predicted and true next features, averaged over H: [B, N, H] x2 -> [B, N]."""
    return F.smooth_l1_loss(predicted.float(), target.float(), reduction="none", beta=1.0).mean(-1)


def soft_cross_entropy(draft_logprobs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum_v p(v) log q(v): [B, N, V] x2 -> [B, N]."""
    return -(target_probs * draft_logprobs).sum(-1)


def topk_distillation_loss(draft_logprobs: torch.Tensor, target_probs: torch.Tensor, k: int) -> torch.Tensor:
    """HASS's Top-K distillation: the soft cross-entropy restricted to the target's K most likely tokens,
    not renormalised (so it up-weights exactly the tokens a tree would propose): [B, N, V] x2 -> [B, N]."""
    top_probs, top_ids = torch.topk(target_probs, min(k, target_probs.shape[-1]), dim=-1)  # [B, N, K]
    return -(top_probs * draft_logprobs.gather(-1, top_ids)).sum(-1)


def masked_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of a [B, N] loss over the loss-masked tokens (the caller divides by the global token count)."""
    return (per_token * mask).sum()
