"""The step contract every backend implements (DESIGN D2), checked in one place.

A backend owns its KV buffers (`runtime/kv.py`, allocated once, static length) and keeps them on its device; the
decode loop passes only small tensors (ids, positions, masks, accepted indices) and a host-side `cache_len`.
Torch tensors are the currency at this boundary, on the backend's `device`, so ONNX Runtime (IO binding) and
TensorRT (device buffers) implement the same contract without host copies.

As in Polygraphy's `infer`/`infer_impl`: `step()` checks the call against the contract (shapes, dtypes, the KV
capacity, an export's tree budget and top-k) and then calls the backend's `_step()`, so each backend implements
only the computation, and a new backend is held to the same checks and proven by the same contract tests
(`tests/runtime/backends/test_contract.py`). The checks read shapes only: no device synchronisation.

`step_batch` (target and draft) takes several sequences' steps at once, each over its own fork's KV buffers (a
serving slot's), so that one computation can serve them: the PyTorch backend packs their rows into one forward
(`models.target.PackedKV`: each weight's product over every row, attention per sequence); the default runs them one
after another. Either way each sequence gets what its own `step` gives, which the contract suite checks for every
backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hass_deploy.errors import CacheCapacityError, ConfigError


@dataclass(frozen=True)
class TargetOutput:
    logits: torch.Tensor  # [1, T, V] (or [1, 1, V] when the step asked for the last row only)
    hidden: torch.Tensor  # [1, T, H] post-final-norm features: the draft's input


@dataclass(frozen=True)
class DraftOutput:
    hidden: torch.Tensor  # [1, T, H] predicted next features
    logprobs: torch.Tensor  # [1, T, K] log-probabilities of the K best next tokens, descending
    tokens: torch.Tensor  # [1, T, K] their token ids


@dataclass(frozen=True)
class SequenceStep:
    """One sequence's part of a batched target step (`TargetBackend.step_batch`): `step`'s arguments, and the backend
    whose KV buffers hold the sequence (the batching backend itself or one of its forks: a serving slot)."""

    backend: "TargetBackend"
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    cache_len: int
    tree_mask: torch.Tensor | None  # [1, T, T], None: causal
    last_only: bool = False


@dataclass(frozen=True)
class DraftSequenceStep:
    """One sequence's part of a batched draft step (`DraftBackend.step_batch`): `DraftBackend.step`'s arguments and
    the backend (a fork) whose KV buffers hold the sequence."""

    backend: "DraftBackend"
    features: torch.Tensor  # [1, T, H]
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    cache_len: int
    tree_mask: torch.Tensor | None  # [1, T, M], None: causal
    top_k: int


class TargetBackend(ABC):
    device: torch.device
    vocab_size: int
    max_len: int  # rows in the static KV buffers
    max_tree_tokens: int | None = None  # the most nodes one tree step may verify (an export's budget); None: any
    # Whether a tree row's logits are plain decoding's for the same token and position, up to fp32 rounding. A row's
    # attention sums its visible keys in an order that depends on where its tree siblings sit among the step's rows,
    # so the row differs from plain decoding's (and a chain's) by ~1e-7; a flip needs a tie that close. A graph that
    # rounds activations (int8 MatMulNBits blocks) amplifies that: one tipped rounding moves SmolLM2's logits by up
    # to 0.5, and greedy output diverges (docs/RESULTS.md). Where False the decoder verifies chains, whose rows sit
    # where plain decoding's do and are its bit for bit (test_onnxruntime_fused.py).
    tree_rows_exact: bool = True
    # A causal step longer than this runs as pieces of this many rows (`run_chunked`), so a prompt's prefill costs at
    # most one chunk's step shape; the serving engine hands the pieces to separate ticks (`serving/batcher.py`), which
    # computes what a step alone computes.
    prefill_chunk: int | None = None

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_len: int,
             tree_mask: torch.Tensor | None, last_only: bool = False) -> TargetOutput:
        """Run input_ids [1, T] at position_ids [1, T], writing K/V rows cache_len..cache_len+T.

        tree_mask [1, T, T] bool says which new rows each new row sees (None: causal); every row before
        cache_len is visible. With last_only, only the last row's logits are computed (prefill).
        """
        self._check_target_step(input_ids, position_ids, cache_len, tree_mask)
        return self._step(input_ids, position_ids, cache_len, tree_mask, last_only)

    def _check_target_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_len: int,
                           tree_mask: torch.Tensor | None) -> None:
        steps = check_step(input_ids, position_ids, cache_len, tree_mask, self.max_len)
        if tree_mask is not None:
            if tree_mask.shape[2] != steps:
                raise ValueError(f"a target step's tree_mask must be [1, T, T], got {tuple(tree_mask.shape)}")
            if self.max_tree_tokens is not None and steps > self.max_tree_tokens:
                raise ConfigError(f"a tree of {steps} nodes is more than the artifacts' tree budget "
                                  f"({self.max_tree_tokens})")

    def step_batch(self, batch: Sequence[SequenceStep]) -> list[TargetOutput]:
        """Several sequences' steps, each over its own backend's KV buffers (this one or its forks), computed
        together where the backend can: each sequence's outputs and KV rows are those its `step` alone gives.

        Each part is checked as `step` checks it, and the parts must hold different KV buffers. A backend that
        batches overrides `_step_batch`; this default runs the parts one after another.
        """
        if len({id(part.backend) for part in batch}) != len(batch):
            raise ValueError("a batched step's sequences must each have their own backend (KV buffers)")
        for part in batch:
            part.backend._check_target_step(part.input_ids, part.position_ids, part.cache_len, part.tree_mask)
        return self._step_batch(batch)

    def _step_batch(self, batch: Sequence[SequenceStep]) -> list[TargetOutput]:
        return [part.backend._step(part.input_ids, part.position_ids, part.cache_len, part.tree_mask, part.last_only)
                for part in batch]

    @abstractmethod
    def _step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_len: int,
              tree_mask: torch.Tensor | None, last_only: bool) -> TargetOutput:
        """The computation of a checked step."""

    @abstractmethod
    def compact(self, cache_len: int, keep: torch.Tensor) -> None:
        """Move KV rows cache_len + keep[j] to cache_len + j (keep [n] increasing): the accepted path."""

    @abstractmethod
    def fork(self) -> "TargetBackend":
        """Another backend over the same weights (module, session, engine), with KV buffers of its own: a serving
        slot costs its KV buffers, not a copy of the model."""


class DraftBackend(ABC):
    device: torch.device
    max_len: int
    max_top_k: int | None = None  # the most children a step can rank (an export's in-graph top-k); None: any
    prefill_chunk: int | None = None  # as TargetBackend's: a longer causal step (a context pass) runs in pieces

    def step(self, features: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_len: int,
             tree_mask: torch.Tensor | None, top_k: int) -> DraftOutput:
        """Run T (feature, next token) pairs [1, T, H], [1, T]; tree_mask [1, T, M] covers the last M rows."""
        self._check_draft_step(features, input_ids, position_ids, cache_len, tree_mask, top_k)
        return self._step(features, input_ids, position_ids, cache_len, tree_mask, top_k)

    def step_batch(self, batch: Sequence[DraftSequenceStep]) -> list[DraftOutput]:
        """Several sequences' draft steps at once, each over its own fork's KV buffers (`TargetBackend.step_batch`)."""
        if len({id(part.backend) for part in batch}) != len(batch):
            raise ValueError("a batched step's sequences must each have their own backend (KV buffers)")
        for part in batch:
            part.backend._check_draft_step(part.features, part.input_ids, part.position_ids, part.cache_len,
                                           part.tree_mask, part.top_k)
        return self._step_batch(batch)

    def _step_batch(self, batch: Sequence[DraftSequenceStep]) -> list[DraftOutput]:
        return [part.backend._step(part.features, part.input_ids, part.position_ids, part.cache_len, part.tree_mask,
                                   part.top_k) for part in batch]

    def _check_draft_step(self, features: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                          cache_len: int, tree_mask: torch.Tensor | None, top_k: int) -> None:
        steps = check_step(input_ids, position_ids, cache_len, tree_mask, self.max_len)
        if features.dim() != 3 or features.shape[:2] != (1, steps):
            raise ValueError(f"draft features must be [1, T={steps}, H], got {tuple(features.shape)}")
        if tree_mask is not None and not steps <= tree_mask.shape[2] <= cache_len + steps:
            raise ValueError(f"a draft step's tree_mask must be [1, T, M] with T <= M <= cache_len + T, got "
                             f"{tuple(tree_mask.shape)} at cache_len {cache_len}")
        if top_k < 1 or (self.max_top_k is not None and top_k > self.max_top_k):
            raise ConfigError(f"top-k {top_k} is outside the draft's range (1..{self.max_top_k or 'V'})")

    @abstractmethod
    def _step(self, features: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor, cache_len: int,
              tree_mask: torch.Tensor | None, top_k: int) -> DraftOutput:
        """The computation of a checked step."""

    @abstractmethod
    def fork(self) -> "DraftBackend":
        """Another backend over the same weights, with KV buffers of its own (see TargetBackend.fork)."""


def check_step(input_ids: torch.Tensor, position_ids: torch.Tensor, cache_len: int,
               tree_mask: torch.Tensor | None, max_len: int) -> int:
    """The checks every step shares; returns T."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [1, T] with T >= 1, got {tuple(input_ids.shape)}")
    steps = input_ids.shape[1]
    if position_ids.shape != input_ids.shape:
        raise ValueError(f"position_ids must be {tuple(input_ids.shape)} like input_ids, got "
                         f"{tuple(position_ids.shape)}")
    if tree_mask is not None and (tree_mask.dtype != torch.bool or tree_mask.dim() != 3
                                  or tree_mask.shape[:2] != (1, steps)):
        raise ValueError(f"tree_mask must be a bool [1, T={steps}, M] tensor, got {tree_mask.dtype} "
                         f"{tuple(tree_mask.shape)}")
    if cache_len < 0:
        raise ValueError(f"cache_len must be >= 0, got {cache_len}")
    if cache_len + steps > max_len:
        raise CacheCapacityError(f"KV cache overflow: {cache_len + steps} rows needed, {max_len} allocated")
    return steps


def run_chunked(steps: int, chunk: int, causal: bool,
                run: Callable[[int, int], dict[str, torch.Tensor | None]]) -> dict[str, torch.Tensor]:
    """Run a step of `steps` rows as pieces of at most `chunk` rows when it is causal (a prompt: an engine's
    largest step shape is then the chunk, not the prompt); a tree step runs whole. `run(start, stop)` computes
    rows start..stop and returns named outputs [1, rows, ...] (None to drop one, e.g. logits of an earlier chunk of
    a prefill); the pieces are concatenated along the rows."""
    pieces: dict[str, list[torch.Tensor]] = {}
    bounds = [(0, steps)] if not causal or steps <= chunk else [
        (start, min(start + chunk, steps)) for start in range(0, steps, chunk)]
    for start, stop in bounds:
        for name, value in run(start, stop).items():
            if value is not None:
                pieces.setdefault(name, []).append(value)
    return {name: parts[0] if len(parts) == 1 else torch.cat(parts, dim=1) for name, parts in pieces.items()}
