"""Continuous batching: the model steps of every slot that is running a round, computed together in ticks.

Each slot's request runs the one decode loop (`runtime/decoder.py`) in a thread of its own, over a `SlotTarget` and
a `SlotDraft`: backends whose steps are handed to the engine's `StepBatcher` instead of run. When every slot that has
a request has handed in a step, the last one to arrive runs a tick:

    any draft steps waiting?  -> they run as one DraftBackend.step_batch   (tree levels, context passes)
    else                      -> the target steps as one TargetBackend.step_batch   (verification, prefill pieces)
    oldest first, up to --max-batch sequences and --max-batch-rows rows; each slot wakes with its own outputs
    and goes on with its round (acceptance and KV compaction are its own)

So a tick is one forward over all the slots' rows, one product per weight for all of them, which is where batching
pays on any hardware: the weights are read once per tick instead of once per slot. Drafting goes first, so the
slots fall into step: their tree levels batched together, then their verify steps together. Steps left over by the
budget stay first in line. A slot alone runs its steps at once, in its own thread, as `step`: no hand-off, the
latency of one request unchanged.

A long prompt is handed in as pieces of the backend's `prefill_chunk` rows, one per tick, so it shares ticks with
the others' rounds instead of stalling them for the whole prompt; the backend cuts a prompt at the same rows when
it runs alone, so the request computes what it computes offline.

What a part gets is what its step alone gives (`step_batch`'s contract, checked for every backend): bit for bit
where the backend runs the parts in turn or keeps each row's arithmetic independent of its neighbours (ONNX Runtime),
and to fp32 rounding on the PyTorch CPU backend, whose GEMM rounds a row differently with the rows beside it
(~1e-7, as a tree row's against its chain row's: `TargetBackend.tree_rows_exact`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from hass_deploy.errors import HassDeployError
from hass_deploy.runtime.backends.base import (DraftBackend, DraftOutput, DraftSequenceStep, SequenceStep,
                                               TargetBackend, TargetOutput, run_chunked)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Call:
    """One slot's step, waiting for a tick."""

    part: SequenceStep | DraftSequenceStep
    output: TargetOutput | DraftOutput | None = None
    error: BaseException | None = None
    done: bool = False

    @property
    def rows(self) -> int:
        return self.part.input_ids.shape[1]


@dataclass(frozen=True)
class Tick:
    """What one tick computed (the engine's per-tick metrics)."""

    model: str  # "target" or "draft"
    sequences: int
    rows: int


class StepBatcher:
    """Gathers the running slots' steps into ticks (the module docstring). Thread-safe: slot threads call `run`."""

    def __init__(self, max_batch: int | None = None, max_rows: int | None = None,
                 on_tick: Callable[[Tick], None] | None = None):
        self.max_batch, self.max_rows, self.on_tick = max_batch, max_rows, on_tick
        self._lock = threading.Condition()
        self._members = 0  # slots running a request: each hands in at most one step at a time
        self._waiting: list[_Call] = []  # oldest first
        self._ticking = False

    @contextmanager
    def member(self) -> Iterator[None]:
        """A slot running a request: ticks wait for its step while it is inside."""
        with self._lock:
            self._members += 1
        try:
            yield
        finally:
            with self._lock:
                self._members -= 1
                self._lock.notify_all()  # the others may all be waiting now

    def run(self, part: SequenceStep | DraftSequenceStep) -> TargetOutput | DraftOutput:
        """Hand in a member's step and return its outputs once a tick has computed it."""
        call = _Call(part)
        with self._lock:
            if self._members < 1:
                raise HassDeployError("a batched step was handed in by a thread that is not a member of the batcher")
            self._waiting.append(call)
            while not call.done:
                if not self._ticking and len(self._waiting) >= self._members:
                    self._tick()
                else:
                    self._lock.wait()
        if call.error is not None:
            raise call.error
        return call.output

    def _tick(self) -> None:
        """Take the waiting steps of one model, within the budget, and compute them, the lock released meanwhile.

        Draft steps go first: a verify step waits while any slot is still drafting. So the slots fall into step
        (their tree levels batched together, then their verify steps together) instead of one verifying alone while
        another drafts, and a prompt's piece joins the next verify step.
        """
        drafting = any(not isinstance(call.part, SequenceStep) for call in self._waiting)
        taken, rows = [], 0
        for call in self._waiting:
            if isinstance(call.part, SequenceStep) == drafting:
                continue
            if taken and ((self.max_batch is not None and len(taken) >= self.max_batch)
                          or (self.max_rows is not None and rows + call.rows > self.max_rows)):
                break
            taken.append(call)
            rows += call.rows
        self._waiting = [call for call in self._waiting if call not in taken]
        self._ticking = True
        self._lock.release()
        try:
            _compute(taken, _alone_draft if drafting else _alone_target)
            if self.on_tick is not None:
                self.on_tick(Tick("draft" if drafting else "target", len(taken), rows))
        finally:
            self._lock.acquire()
            for call in taken:
                if call.output is None and call.error is None:  # the tick itself was interrupted
                    call.error = HassDeployError("a batched step was interrupted before it computed this sequence")
                call.done = True
            self._ticking = False
            self._lock.notify_all()


def _compute(calls: list[_Call], alone: Callable) -> None:
    """Every call's outputs: one part runs as its own `step` (a slot alone pays nothing for batching), several as one
    `step_batch` of the first one's backend; if that fails, each part alone, so that one bad part fails only its own
    request."""
    if len(calls) > 1:
        try:
            outputs = calls[0].part.backend.step_batch([c.part for c in calls])
        except Exception:
            log.warning("a batched step failed; its %d sequences run one at a time", len(calls), exc_info=True)
        else:
            for call, output in zip(calls, outputs, strict=True):
                call.output = output
            return
    for call in calls:
        try:
            call.output = alone(call.part)
        except Exception as err:
            call.error = err


def _alone_target(part: SequenceStep) -> TargetOutput:
    return part.backend.step(part.input_ids, part.position_ids, part.cache_len, part.tree_mask, part.last_only)


def _alone_draft(part: DraftSequenceStep) -> DraftOutput:
    return part.backend.step(part.features, part.input_ids, part.position_ids, part.cache_len, part.tree_mask,
                             part.top_k)


class SlotTarget(TargetBackend):
    """A slot's target backend (a fork) whose steps run in the batcher's ticks; compaction is the slot's own."""

    def __init__(self, backend: TargetBackend, batcher: StepBatcher):
        self.backend, self.batcher = backend, batcher
        self.device, self.vocab_size, self.max_len = backend.device, backend.vocab_size, backend.max_len
        self.max_tree_tokens, self.tree_rows_exact = backend.max_tree_tokens, backend.tree_rows_exact
        self.prefill_chunk = backend.prefill_chunk

    def _step(self, input_ids, position_ids, cache_len, tree_mask, last_only=False) -> TargetOutput:
        steps = input_ids.shape[1]

        def run(start: int, stop: int) -> dict:
            # A piece of a prompt asks for its last row's logits (the backend drops an earlier piece's), as the
            # backend's own chunking does.
            out = self.batcher.run(SequenceStep(self.backend, input_ids[:, start:stop], position_ids[:, start:stop],
                                                cache_len + start, tree_mask, last_only))
            return {"hidden": out.hidden, "logits": out.logits if not last_only or stop == steps else None}

        out = run_chunked(steps, self.prefill_chunk or steps, tree_mask is None, run)
        return TargetOutput(logits=out["logits"], hidden=out["hidden"])

    def compact(self, cache_len: int, keep: torch.Tensor) -> None:
        self.backend.compact(cache_len, keep)

    def fork(self) -> "SlotTarget":
        raise HassDeployError("a slot's backend is not forked: fork the backend it wraps")


class SlotDraft(DraftBackend):
    """A slot's draft backend (a fork) whose steps run in the batcher's ticks."""

    def __init__(self, backend: DraftBackend, batcher: StepBatcher):
        self.backend, self.batcher = backend, batcher
        self.device, self.max_len, self.max_top_k = backend.device, backend.max_len, backend.max_top_k
        self.prefill_chunk = backend.prefill_chunk

    def _step(self, features, input_ids, position_ids, cache_len, tree_mask, top_k) -> DraftOutput:
        def run(start: int, stop: int) -> dict:
            out = self.batcher.run(DraftSequenceStep(self.backend, features[:, start:stop], input_ids[:, start:stop],
                                                     position_ids[:, start:stop], cache_len + start, tree_mask, top_k))
            return {"hidden": out.hidden, "logprobs": out.logprobs, "tokens": out.tokens}

        steps = input_ids.shape[1]
        out = run_chunked(steps, self.prefill_chunk or steps, tree_mask is None, run)
        return DraftOutput(hidden=out["hidden"], logprobs=out["logprobs"], tokens=out["tokens"])

    def fork(self) -> "SlotDraft":
        raise HassDeployError("a slot's backend is not forked: fork the backend it wraps")
