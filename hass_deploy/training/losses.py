"""The draft head's training losses (algorithm.md §3.5), per token; the trainer masks and normalises them.

Notation: `p` is the target's next-token distribution softmax(lm_head(f_{t+1})), `log q` the draft's
log-softmax(lm_head(g_t)). Every loss is per token, so that one normaliser (the number of loss-masked tokens in
the *global* batch) makes data-parallel training equal single-process training.

The vocabulary-sized terms never hold a [B, N, V] tensor (8.6 GB in fp32 at V = 128k, B = 8, N = 2048):
`vocabulary_losses` walks the loss-masked positions in chunks, computes p once per chunk for every aligned
step, and takes each chunk's gradient with respect to the draft's features in closed form as it goes, so
neither the forward nor the backward keeps more than a chunk of [*, V] (and nothing is recomputed).

A reduced draft vocabulary (`vocabulary`, N target ids; models/draft.py) is trained as EAGLE-3 trains its own: q
lives on the N tokens, p is the target's distribution restricted to them and renormalised, and the vocabulary terms
skip the positions whose target argmax lies outside them (no draft of these N tokens can propose it). The top-1
count still counts those positions, as misses: it estimates acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def feature_regression_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SmoothL1 (beta 1) between predicted and true next features, averaged over H: [B, N, H] x2 -> [B, N]."""
    return F.smooth_l1_loss(predicted.float(), target.float(), reduction="none", beta=1.0).mean(-1)


def soft_cross_entropy(draft_logprobs: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum_v p(v) log q(v): [..., V] x2 -> [...] (a fused dot product: no [..., V] temporary)."""
    return -torch.linalg.vecdot(target_probs, draft_logprobs)


def topk_distillation_loss(draft_logprobs: torch.Tensor, top_probs: torch.Tensor,
                           top_ids: torch.Tensor) -> torch.Tensor:
    """HASS's Top-K distillation: the soft cross-entropy restricted to the target's K most likely tokens
    (`top_probs`, `top_ids` [..., K] from `torch.topk(p, K)`), not renormalised (so it up-weights exactly the
    tokens a tree would propose): [..., V], [..., K] x2 -> [...]."""
    return -(top_probs * draft_logprobs.gather(-1, top_ids)).sum(-1)


def draft_log_probs(features: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """log q = log_softmax(lm_head(g)) in at least fp32: [..., H] -> [..., V].

    Under autocast the V x H matmul, where the cost is, runs in bf16; the log-softmax must not: CUDA's autocast
    runs it in fp32, but the CPU's keeps it in its input's bf16 (log-probs then carry 8 bits of mantissa).
    """
    logits = features @ lm_head.T
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


@dataclass(frozen=True)
class Teacher:
    """The target's side of a chunk of positions, shared by every aligned step."""

    probs: torch.Tensor  # [R, V or N] p, in the target features' precision whatever the autocast
    mass: torch.Tensor  # [R] sum of p: 1 up to rounding, kept so the gradient is autograd's to the last bit
    tokens: torch.Tensor  # [R] the target's greedy next token, as a column of `probs` (-1: outside the draft's N)
    keep: torch.Tensor  # [R] 1.0 where the vocabulary terms apply (0.0: the greedy token is outside the N)
    top_probs: torch.Tensor  # [R, K] the K largest p (K = 0 without a Top-K loss)
    top_ids: torch.Tensor  # [R, K]

    @classmethod
    def of(cls, target: torch.Tensor, lm_head: torch.Tensor, k: int,
           vocabulary: torch.Tensor | None = None) -> Teacher:
        with torch.autocast(target.device.type, enabled=False):  # soft labels are not rounded to bf16
            logits = target @ lm_head.T  # [R, V]
            tokens = logits.argmax(-1)  # [R]
            keep = torch.ones_like(tokens, dtype=logits.dtype)
            if vocabulary is not None:
                column = torch.full((lm_head.shape[0],), -1, dtype=torch.int64, device=logits.device)
                column[vocabulary] = torch.arange(vocabulary.numel(), device=logits.device)  # target id -> column
                tokens = column[tokens]
                keep = (tokens >= 0).to(logits.dtype)
                logits = logits[:, vocabulary]  # [R, N]: softmax over them = p restricted and renormalised
            probs = torch.softmax(logits, dim=-1)
        top_probs, top_ids = torch.topk(probs, min(k, probs.shape[-1]), dim=-1)
        return cls(probs, probs.sum(-1), tokens, keep, top_probs, top_ids)


def distillation_gradient(draft_logprobs: torch.Tensor, teacher: Teacher, ce_weight: torch.Tensor,
                          topk_weight: torch.Tensor) -> torch.Tensor:
    """d(ce_weight * soft CE + topk_weight * Top-K loss) / d logits, in closed form, per row: [R, V].

    With log q = z - logsumexp(z), d(-sum_v w_v log q_v)/dz = q * sum_v w_v - w, here for w = ce_weight * p plus
    topk_weight * p on the top K. `ce_weight`, `topk_weight`: [R] (loss weight times the row's mask).
    The gradient is written over `draft_logprobs` (one [R, V] buffer fewer at a time; the caller is done with it).
    """
    mass = ce_weight * teacher.mass + topk_weight * teacher.top_probs.sum(-1)  # [R]
    grad = draft_logprobs.exp_().mul_(mass[:, None]).addcmul_(teacher.probs, ce_weight[:, None], value=-1)
    return grad.scatter_add_(-1, teacher.top_ids, -topk_weight[:, None] * teacher.top_probs)


def _chunk_terms(features: torch.Tensor, lm_head: torch.Tensor, teacher: Teacher, ce_weight: torch.Tensor,
                 topk_weight: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step's terms on one chunk: ([3, c] soft CE, Top-K loss and top-1 match per row, [c, H] gradient or None).

    A function of its own so that its [c, V] buffers are freed on return, before the next step's exist.
    """
    logprobs = draft_log_probs(features, lm_head)  # [c, V]
    per_token = torch.stack([
        soft_cross_entropy(logprobs, teacher.probs),
        topk_distillation_loss(logprobs, teacher.top_probs, teacher.top_ids),
        (logprobs.argmax(-1) == teacher.tokens).to(logprobs.dtype),
    ])
    if not need_grad:
        return per_token, None
    # Under autocast this matmul runs as the forward's did (bf16), as autograd's backward of it would.
    return per_token, distillation_gradient(logprobs, teacher, ce_weight, topk_weight) @ lm_head


class _VocabularyLosses(torch.autograd.Function):
    """Sum over steps s and rows r of mask_r * (ce_weights[s] * CE + topk_weights[s] * TopK), chunk by chunk.

    The gradient with respect to `predicted` is computed in the forward, one chunk at a time, and is all the
    backward needs: [S, R, H], not [S, R, V].
    """

    @staticmethod
    def forward(ctx, predicted, target, lm_head, mask, ce_weights, topk_weights, k, chunk, vocabulary):
        steps, rows = predicted.shape[:2]
        scorer = lm_head if vocabulary is None else lm_head[vocabulary]  # [V or N, H]: the draft's projection
        sums = torch.zeros(3, steps, dtype=torch.float64, device=predicted.device)  # CE, Top-K, top-1 matches
        # The gradient stays in at least fp32 until the backward's scale (world / token count) is applied: scaling
        # it in bf16 would round that factor itself, a bias on every element rather than one rounding of each.
        precision = torch.promote_types(predicted.dtype, torch.float32)
        grad = torch.zeros_like(predicted, dtype=precision) if ctx.needs_input_grad[0] else None
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            # Once for every step.
            teacher = Teacher.of(target[part], lm_head, k if any(topk_weights) else 0, vocabulary)
            weight = mask[part]  # [c]
            kept = weight * teacher.keep  # [c]: the rows the vocabulary terms train on
            for s in range(steps):
                per_token, chunk_grad = _chunk_terms(predicted[s, part], scorer, teacher, ce_weights[s] * kept,
                                                     topk_weights[s] * kept, grad is not None)
                sums[:, s] += (per_token * torch.stack([kept, kept, weight])).sum(-1)
                if grad is not None:
                    grad[s, part] = chunk_grad
        ctx.save_for_backward(grad)
        weighted = (sums[0] * sums.new_tensor(ce_weights) + sums[1] * sums.new_tensor(topk_weights)).sum()
        ctx.mark_non_differentiable(sums)
        return weighted.to(precision), sums

    @staticmethod
    def backward(ctx, grad_weighted, grad_sums):
        (grad,) = ctx.saved_tensors
        return grad * grad_weighted, None, None, None, None, None, None, None, None  # autograd casts to predicted's dtype


@dataclass(frozen=True)
class VocabularyLosses:
    weighted: torch.Tensor  # scalar with gradient: sum_s ce_weights[s] * CE_s + topk_weights[s] * TopK_s
    cross_entropy: torch.Tensor  # [S] masked sums of the soft cross-entropy, detached
    topk: torch.Tensor  # [S] masked sums of the Top-K loss (0 when every Top-K weight is 0)
    top1: torch.Tensor  # [S] loss-masked tokens where the draft's argmax is the target's


def vocabulary_losses(predicted: list[torch.Tensor], target: torch.Tensor, lm_head: torch.Tensor,
                      loss_mask: torch.Tensor, ce_weights: list[float], topk_weights: list[float], k: int,
                      chunk: int, vocabulary: torch.Tensor | None = None) -> VocabularyLosses:
    """The soft cross-entropy and Top-K terms of every aligned step, `chunk` positions at a time.

    Only loss-masked positions are projected onto the vocabulary (padding and untrained tokens cost nothing).

    Args:
        predicted: S tensors [B, N, H], the steps' outputs g_t (with their graphs).
        target: [B, N, H] the true next features f_{t+1}.
        lm_head: [V, H] the target's frozen head.
        loss_mask: [B, N] float weights (1 on trained tokens).
        ce_weights, topk_weights: S weights each, applied in `weighted`.
        k: K of the Top-K loss.
        chunk: positions whose [*, V] rows exist at once.
        vocabulary: [N] the target ids a reduced draft vocabulary scores (None: all V).
    """
    rows = loss_mask.flatten().nonzero().squeeze(1)  # [R]; one host sync per batch
    stacked = torch.stack([out.flatten(0, 1)[rows] for out in predicted])  # [S, R, H]
    weighted, sums = _VocabularyLosses.apply(stacked, target.flatten(0, 1)[rows], lm_head,
                                             loss_mask.flatten()[rows], list(ce_weights), list(topk_weights), k,
                                             chunk, vocabulary)
    return VocabularyLosses(weighted, *sums)


def masked_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of a [B, N] loss over the loss-masked tokens (the caller divides by the global token count)."""
    return (per_token * mask).sum()
