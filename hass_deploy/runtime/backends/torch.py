"""The PyTorch backend: our own modules over static KV buffers, eager, on any torch device."""

from __future__ import annotations

import torch

from hass_deploy.models.draft import DraftHead
from hass_deploy.models.target import Transformer
from hass_deploy.runtime.backends.base import DraftBackend, DraftOutput, TargetBackend, TargetOutput
from hass_deploy.runtime.kv import KVBuffers


def _kv_for(module: torch.nn.Module, num_layers: int, max_len: int) -> KVBuffers:
    config = module.config
    weight = module.embed_tokens.weight
    return KVBuffers(num_layers, config.num_kv_heads, config.head_dim, max_len, weight.dtype, weight.device)


class TorchTarget(TargetBackend):
    def __init__(self, module: Transformer, max_len: int):
        self.module = module
        self.device = module.embed_tokens.weight.device
        self.vocab_size = module.config.vocab_size
        self.max_len = max_len
        self.kv = _kv_for(module, module.config.num_layers, max_len)

    @torch.no_grad()
    def _step(self, input_ids, position_ids, cache_len, tree_mask, last_only=False) -> TargetOutput:
        hidden = self.module(input_ids, position_ids, tree_mask, self.kv, cache_len)  # [1, T, H]
        logits = self.module.logits(hidden[:, -1:] if last_only else hidden)
        return TargetOutput(logits=logits, hidden=hidden)

    def compact(self, cache_len: int, keep: torch.Tensor) -> None:
        self.kv.compact(cache_len, keep)

    def fork(self) -> "TorchTarget":
        return TorchTarget(self.module, self.max_len)


class TorchDraft(DraftBackend):
    """The draft head with the target's lm_head (shared, not copied)."""

    def __init__(self, head: DraftHead, lm_head: torch.nn.Linear, max_len: int):
        self.head = head
        self.lm_head = lm_head
        self.device = head.fc.weight.device
        self.max_len = max_len
        self.kv = _kv_for(head, 1, max_len)

    @torch.no_grad()
    def _step(self, features, input_ids, position_ids, cache_len, tree_mask, top_k) -> DraftOutput:
        hidden = self.head(features.to(self.head.fc.weight.dtype), input_ids, position_ids, tree_mask, self.kv, cache_len)
        logprobs = torch.log_softmax(self.lm_head(hidden).float(), dim=-1)  # [1, T, V]
        top = torch.topk(logprobs, top_k, dim=-1)
        return DraftOutput(hidden=hidden, logprobs=top.values, tokens=top.indices)

    def fork(self) -> "TorchDraft":
        return TorchDraft(self.head, self.lm_head, self.max_len)
