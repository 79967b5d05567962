"""The step contract every backend implements (DESIGN D2).

A backend owns its KV buffers (allocated once, static length) and keeps them on its device; the decode loop
passes only small tensors (ids, positions, masks, accepted indices) and a host-side `cache_len`. Torch tensors
are the currency at this boundary, on the backend's `device`, so ONNX Runtime (IO binding) and TensorRT
(device buffers) implement the same protocol without host copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class TargetOutput:
    logits: torch.Tensor  # [1, T, V] (or [1, 1, V] when the step asked for the last row only)
    hidden: torch.Tensor  # [1, T, H] post-final-norm features: the draft's input


@dataclass(frozen=True)
class DraftOutput:
    hidden: torch.Tensor  # [1, T, H] predicted next features
    logprobs: torch.Tensor  # [1, T, K] log-probabilities of the K best next tokens, descending
    tokens: torch.Tensor  # [1, T, K] their token ids


class TargetBackend(Protocol):
    device: torch.device
    vocab_size: int
    max_len: int  # rows in the static KV buffers

    def step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache_len: int,
        tree_mask: torch.Tensor | None,
        last_only: bool = False,
    ) -> TargetOutput:
        """Run input_ids [1, T] at position_ids [1, T], writing K/V rows cache_len..cache_len+T.

        tree_mask [1, T, T] bool says which new rows each new row sees (None: causal); every row before
        cache_len is visible. With last_only, only the last row's logits are computed (prefill).
        """
        ...

    def compact(self, cache_len: int, keep: torch.Tensor) -> None:
        """Move KV rows cache_len + keep[j] to cache_len + j (keep [n] increasing): the accepted path."""
        ...

    def fork(self) -> "TargetBackend":
        """Another backend over the same weights (module, session), with KV buffers of its own: a serving slot
        costs its KV buffers, not a copy of the model."""
        ...


class DraftBackend(Protocol):
    device: torch.device
    max_len: int

    def step(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache_len: int,
        tree_mask: torch.Tensor | None,
        top_k: int,
    ) -> DraftOutput:
        """Run T (feature, next token) pairs [1, T, H], [1, T]; tree_mask [1, T, M] covers the last M rows."""
        ...

    def fork(self) -> "DraftBackend":
        """Another backend over the same weights, with KV buffers of its own (see TargetBackend.fork)."""
        ...
