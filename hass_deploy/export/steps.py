"""The step modules that become ONNX graphs: our own target and draft behind the step contract (DESIGN D2, D8).

    target step: input_ids [1, T], position_ids [1, T], cache_len [1], tree_mask [1, T, T], logits_index [R],
                 past_key_i / past_value_i [1, H_kv, S, D] per layer
              -> logits [1, R, V], hidden [1, T, H], new_key_i / new_value_i [1, H_kv, T, D] per layer
    draft step:  features [1, T, H], input_ids, position_ids, cache_len, tree_mask [1, T, M],
                 past_key_0 / past_value_0
              -> hidden [1, T, H], top_logprobs [1, T, K], top_tokens [1, T, K], new_key_0 / new_value_0

The KV buffers are inputs the graph only reads (`models.target.ReadOnlyKV`): the runtime binds its static
buffers to them and writes the returned new rows itself, so a step costs no copy that grows with the context.
`logits_index` picks the rows that get logits (the last prompt row in prefill, every node in verification),
which keeps a long prefill from computing a [T, V] projection it throws away.
"""

from __future__ import annotations

import torch
from torch import nn

from hass_deploy.models.draft import DraftHead
from hass_deploy.models.target import ReadOnlyKV, Transformer


def kv_input_names(num_layers: int) -> list[str]:
    return [f"past_{kind}_{layer}" for layer in range(num_layers) for kind in ("key", "value")]


def kv_output_names(num_layers: int) -> list[str]:
    return [f"new_{kind}_{layer}" for layer in range(num_layers) for kind in ("key", "value")]


TARGET_INPUTS = ["input_ids", "position_ids", "cache_len", "tree_mask", "logits_index"]
TARGET_OUTPUTS = ["logits", "hidden"]
DRAFT_INPUTS = ["features", "input_ids", "position_ids", "cache_len", "tree_mask"]
DRAFT_OUTPUTS = ["hidden", "top_logprobs", "top_tokens"]


class _GraphKV(ReadOnlyKV):
    """`ReadOnlyKV` over the graph's KV inputs; collects the new rows as graph outputs, in layer order."""

    def __init__(self, buffers: tuple[torch.Tensor, ...]):
        self.buffers = buffers  # k0, v0, k1, v1, ... each [1, H_kv, S, D]
        self.new: list[torch.Tensor] = []

    def committed(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.buffers[2 * layer], self.buffers[2 * layer + 1]

    def emit(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.new.extend((k, v))


class TargetStep(nn.Module):
    """The target's step graph: prefill and tree verification through one contract."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, cache_len, tree_mask, logits_index, *kv_buffers):
        kv = _GraphKV(kv_buffers)
        # cache_len is [B] = [1] at the boundary (DESIGN D2); a 0-d tensor inside keeps the mask arithmetic scalar.
        hidden = self.model(input_ids, position_ids, tree_mask, kv, cache_len.reshape(()))  # [1, T, H]
        logits = self.model.logits(hidden.index_select(1, logits_index))  # [1, R, V]
        return (logits, hidden, *kv.new)


class DraftStep(nn.Module):
    """The draft head's step graph with the target's lm_head and a top-k of log-probabilities inside.

    K is a static attribute of the graph (`top_k`): the runtime takes the first k <= K columns, which are the
    top-k because TopK sorts them in descending order. With a reduced draft vocabulary the graph holds only its N
    rows of the head and maps the top-k back to target ids itself: `top_tokens` are target ids either way.
    """

    def __init__(self, head: DraftHead, lm_head: nn.Linear, top_k: int):
        super().__init__()
        self.head = head
        self.lm_head = head.scoring_head(lm_head)  # [V or N, H]
        self.top_k = top_k

    def forward(self, features, input_ids, position_ids, cache_len, tree_mask, *kv_buffers):
        kv = _GraphKV(kv_buffers)
        hidden = self.head(features, input_ids, position_ids, tree_mask, kv, cache_len.reshape(()))  # [1, T, H]
        logprobs = torch.log_softmax(self.lm_head(hidden).float(), dim=-1)  # [1, T, V or N]
        top = torch.topk(logprobs, self.top_k, dim=-1)  # [1, T, K] each, descending
        return (hidden, top.values, self.head.target_ids(top.indices), *kv.new)
