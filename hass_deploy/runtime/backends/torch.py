"""The PyTorch backend: our own modules over static KV buffers, on any torch device.

Steps run in one of `graphs.STEP_MODES` (`steps`): "eager" runs each step as its shapes come; "graphs" runs tree
and decode steps as static steps captured as CUDA graphs (`graphs.py`), so a GPU replays a step's ~500 kernels as
one launch; "static" runs the same static steps without capture (what the CPU tests check). "auto" is graphs on a
CUDA device and eager elsewhere: on a CPU nothing is launch-bound, and a static step's padding and KV block are
pure cost.
Prefill, and steps too large for a row bucket or too close to the end of the buffers, always run eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch

from hass_deploy.config import PREFILL_CHUNK
from hass_deploy.models.draft import DraftHead
from hass_deploy.models.target import PackedKV, Transformer
from hass_deploy.runtime.backends import graphs
from hass_deploy.runtime.backends.base import (DraftBackend, DraftOutput, DraftSequenceStep, SequenceStep,
                                               TargetBackend, TargetOutput, run_chunked)
from hass_deploy.runtime.kv import KVBuffers

def _kv_for(module: torch.nn.Module, num_layers: int, max_len: int) -> KVBuffers:
    config = module.config
    weight = module.embed_tokens.weight
    return KVBuffers(num_layers, config.num_kv_heads, config.head_dim, max_len, weight.dtype, weight.device)


def _static_shape(steps: int, cache_len: int, max_len: int) -> tuple[int, int] | None:
    """(padded rows, KV rows read) of a static step, or None when it must run eagerly: too many rows for a bucket,
    or padding would write past the buffers' end."""
    rows = graphs.row_bucket(steps)
    if rows is None or cache_len + rows > max_len:
        return None
    return rows, graphs.kv_rows(cache_len + rows, max_len)


def _rows(outputs: dict[str, torch.Tensor], steps: int) -> dict[str, torch.Tensor]:
    """A static step's outputs [1, T_b, ...] cut to the step's T rows, as copies: a captured graph's outputs are
    overwritten by later replays (a draft level can share a context pass's shape key), and the decoder keeps some
    across steps."""
    return {name: value[:, :steps].clone() for name, value in outputs.items()}


class TorchTarget(TargetBackend):
    def __init__(self, module: Transformer, max_len: int, steps: str = "auto", prefill_chunk: int = PREFILL_CHUNK):
        self.module = module
        self.device = module.embed_tokens.weight.device
        self.vocab_size = module.config.vocab_size
        self.max_len, self.mode, self.prefill_chunk = max_len, steps, prefill_chunk
        self.kv = _kv_for(module, module.config.num_layers, max_len)
        self.graphs = graphs.step_graphs(steps, self.device)

    @torch.no_grad()
    def _step(self, input_ids, position_ids, cache_len, tree_mask, last_only=False) -> TargetOutput:
        steps = input_ids.shape[1]
        shape = None if self.graphs is None or last_only else _static_shape(steps, cache_len, self.max_len)
        if shape is None:
            def run(start: int, stop: int) -> dict:
                hidden = self.module(input_ids[:, start:stop], position_ids[:, start:stop], tree_mask, self.kv,
                                     cache_len + start)  # [1, rows, H]
                wanted = not last_only or stop == steps  # a prefill's earlier pieces give no logits
                return {"hidden": hidden,
                        "logits": self.module.logits(hidden[:, -1:] if last_only else hidden) if wanted else None}

            out = run_chunked(steps, self.prefill_chunk, tree_mask is None, run)
            return TargetOutput(logits=out["logits"], hidden=out["hidden"])
        rows, kv_len = shape
        feeds = {"input_ids": graphs.pad_rows(input_ids, rows), "position_ids": graphs.pad_rows(position_ids, rows),
                 "tree_mask": graphs.pad_tree_mask(tree_mask, steps, rows, self.device),
                 "cache_len": torch.full((), cache_len, dtype=torch.int64, device=self.device)}

        def compute(static: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            hidden = self.module(static["input_ids"], static["position_ids"], static["tree_mask"], self.kv,
                                 static["cache_len"], kv_len)  # [1, T_b, H]
            return {"hidden": hidden, "logits": self.module.logits(hidden)}

        out = _rows(self.graphs.run(("target", rows, kv_len), feeds, compute), steps)
        return TargetOutput(logits=out["logits"], hidden=out["hidden"])

    @torch.no_grad()
    def _step_batch(self, batch: Sequence[SequenceStep]) -> list[TargetOutput]:
        """The sequences' rows packed into one eager forward (`PackedKV`): one product per weight for every row,
        attention per sequence over its own buffers; then one lm_head product over the rows whose logits are wanted."""
        if any(not isinstance(part.backend, TorchTarget) or part.backend.module is not self.module for part in batch):
            raise ValueError("a batched step's sequences must run on this backend or its forks (the same module)")
        sizes = [part.input_ids.shape[1] for part in batch]
        kv = PackedKV([part.backend.kv for part in batch], [part.cache_len for part in batch], sizes,
                      [part.tree_mask for part in batch])
        hidden = self.module(torch.cat([part.input_ids for part in batch], dim=1),
                             torch.cat([part.position_ids for part in batch], dim=1), None, kv)  # [1, sum T, H]
        ends = list(accumulate(sizes))
        wanted = [range(end - 1, end) if part.last_only else range(end - size, end)
                  for part, size, end in zip(batch, sizes, ends)]
        rows = torch.tensor([row for span in wanted for row in span], device=self.device)
        logits = self.module.logits(hidden[:, rows]).split([len(span) for span in wanted], dim=1)
        return [TargetOutput(logits=part_logits, hidden=part_hidden)
                for part_logits, part_hidden in zip(logits, hidden.split(sizes, dim=1))]

    def compact(self, cache_len: int, keep: torch.Tensor) -> None:
        self.kv.compact(cache_len, keep)

    def fork(self) -> "TorchTarget":
        return TorchTarget(self.module, self.max_len, self.mode, self.prefill_chunk)


class TorchDraft(DraftBackend):
    """The draft head with the target's lm_head (shared, not copied; a reduced draft vocabulary's rows of it are)."""

    def __init__(self, head: DraftHead, lm_head: torch.nn.Linear, max_len: int, steps: str = "auto",
                 prefill_chunk: int = PREFILL_CHUNK):
        self.head, self.prefill_chunk = head, prefill_chunk
        self.lm_head = lm_head
        self.scorer = head.scoring_head(lm_head)  # [V or N, H]
        self.device = head.fc.weight.device
        self.max_len, self.mode = max_len, steps
        self.kv = _kv_for(head, 1, max_len)
        self.graphs = graphs.step_graphs(steps, self.device)

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[1, T, V or N] the draft's log-probabilities over the tokens it scores."""
        return torch.log_softmax(self.scorer(hidden).float(), dim=-1)

    def _top(self, logprobs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k log-probabilities [1, T, k] and their target token ids [1, T, k]."""
        top = torch.topk(logprobs, top_k, dim=-1)
        return top.values, self.head.target_ids(top.indices)

    def _rank(self, hidden: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._top(self._logprobs(hidden), top_k)

    @torch.no_grad()
    def _step(self, features, input_ids, position_ids, cache_len, tree_mask, top_k) -> DraftOutput:
        features = features.to(self.head.fc.weight.dtype)
        steps = input_ids.shape[1]
        shape = None if self.graphs is None else _static_shape(steps, cache_len, self.max_len)
        if shape is None:
            def run(start: int, stop: int) -> dict:
                hidden = self.head(features[:, start:stop], input_ids[:, start:stop], position_ids[:, start:stop],
                                   tree_mask, self.kv, cache_len + start)  # [1, rows, H]
                logprobs, tokens = self._rank(hidden, top_k)
                return {"hidden": hidden, "logprobs": logprobs, "tokens": tokens}

            out = run_chunked(steps, self.prefill_chunk, tree_mask is None, run)
            return DraftOutput(hidden=out["hidden"], logprobs=out["logprobs"], tokens=out["tokens"])
        rows, kv_len = shape
        mask = graphs.pad_tree_mask(tree_mask, steps, rows, self.device)  # [1, T_b, M_b]
        feeds = {"features": graphs.pad_rows(features, rows), "input_ids": graphs.pad_rows(input_ids, rows),
                 "position_ids": graphs.pad_rows(position_ids, rows), "tree_mask": mask,
                 "cache_len": torch.full((), cache_len, dtype=torch.int64, device=self.device)}

        def compute(static: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            hidden = self.head(static["features"], static["input_ids"], static["position_ids"], static["tree_mask"],
                               self.kv, static["cache_len"], kv_len)  # [1, T_b, H]
            logprobs, tokens = self._rank(hidden, top_k)
            return {"hidden": hidden, "logprobs": logprobs, "tokens": tokens}

        out = _rows(self.graphs.run(("draft", rows, mask.shape[2], kv_len, top_k), feeds, compute), steps)
        return DraftOutput(hidden=out["hidden"], logprobs=out["logprobs"], tokens=out["tokens"])

    @torch.no_grad()
    def _step_batch(self, batch: Sequence[DraftSequenceStep]) -> list[DraftOutput]:
        """The sequences' rows packed into one eager forward (`PackedKV`, as `TorchTarget._step_batch`) and one
        scoring product; each sequence's top-k from its own rows."""
        if any(not isinstance(part.backend, TorchDraft) or part.backend.head is not self.head for part in batch):
            raise ValueError("a batched step's sequences must run on this backend or its forks (the same head)")
        sizes = [part.input_ids.shape[1] for part in batch]
        kv = PackedKV([part.backend.kv for part in batch], [part.cache_len for part in batch], sizes,
                      [part.tree_mask for part in batch])
        features = torch.cat([part.features for part in batch], dim=1).to(self.head.fc.weight.dtype)
        hidden = self.head(features, torch.cat([part.input_ids for part in batch], dim=1),
                           torch.cat([part.position_ids for part in batch], dim=1), None, kv)  # [1, sum T, H]
        parts = zip(batch, hidden.split(sizes, dim=1), self._logprobs(hidden).split(sizes, dim=1))
        return [DraftOutput(part_hidden, *self._top(part_logprobs, part.top_k))
                for part, part_hidden, part_logprobs in parts]

    def fork(self) -> "TorchDraft":
        return TorchDraft(self.head, self.lm_head, self.max_len, self.mode, self.prefill_chunk)
