"""The step batcher on its own, over fake backends: who waits for whom, what a tick takes, and failures kept apart."""

from __future__ import annotations

import threading

import pytest
import torch

from hass_deploy.errors import HassDeployError
from hass_deploy.runtime.backends.base import (DraftBackend, DraftOutput, DraftSequenceStep, SequenceStep,
                                               TargetBackend, TargetOutput)
from hass_deploy.serving.batcher import SlotDraft, SlotTarget, StepBatcher


class FakeTarget(TargetBackend):
    """Logits = the input ids (as floats) at every row; `calls` logs each computation's parts ("step" alone or a
    batch's sizes); a step at cache_len 99 fails."""

    device, vocab_size, max_len, prefill_chunk = torch.device("cpu"), 8, 1000, 4

    def __init__(self, calls: list):
        self.calls = calls

    def _step(self, input_ids, position_ids, cache_len, tree_mask, last_only=False):
        self.calls.append(("step", input_ids.shape[1]))
        if cache_len == 99:
            raise RuntimeError("bad part")
        logits = input_ids.float()[..., None].expand(1, -1, self.vocab_size)
        return TargetOutput(logits[:, -1:] if last_only else logits, input_ids.float()[..., None])

    def _step_batch(self, batch):
        self.calls.append(("batch", [part.input_ids.shape[1] for part in batch]))
        if any(part.cache_len == 99 for part in batch):
            raise RuntimeError("bad part")
        return [part.backend._step(part.input_ids, part.position_ids, part.cache_len, part.tree_mask, part.last_only)
                for part in batch]

    def compact(self, cache_len, keep):
        pass

    def fork(self):
        return FakeTarget(self.calls)


class FakeDraft(DraftBackend):
    device, max_len, prefill_chunk = torch.device("cpu"), 1000, None

    def __init__(self, calls: list):
        self.calls = calls

    def _step(self, features, input_ids, position_ids, cache_len, tree_mask, top_k):
        self.calls.append(("draft", input_ids.shape[1]))
        rows = input_ids.shape[1]
        return DraftOutput(features, torch.zeros(1, rows, top_k), torch.zeros(1, rows, top_k, dtype=torch.long))

    def fork(self):
        return FakeDraft(self.calls)


def ids(*values):
    return torch.tensor([values])


def run_together(batcher: StepBatcher, jobs) -> list:
    """Run each job (a function of nothing) in a member thread of its own; returns their results (or errors)."""
    results = [None] * len(jobs)
    ready = threading.Barrier(len(jobs))

    def member(i):
        with batcher.member():
            ready.wait()  # every member has joined before any hands in a step
            try:
                results[i] = jobs[i]()
            except Exception as err:
                results[i] = err

    threads = [threading.Thread(target=member, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def test_a_lone_member_runs_its_step_as_a_plain_step():
    calls, batcher = [], StepBatcher()
    slot = SlotTarget(FakeTarget(calls), batcher)
    with batcher.member():
        out = slot.step(ids(1, 2), torch.arange(2)[None], 0, None)
    assert calls == [("step", 2)] and out.logits[0, :, 0].tolist() == [1.0, 2.0]


def test_members_steps_run_as_one_batched_step_each_getting_its_own_outputs():
    calls, batcher, ticks = [], StepBatcher(), []
    batcher.on_tick = ticks.append
    base = FakeTarget(calls)
    slots = [SlotTarget(base.fork(), batcher) for _ in range(3)]
    results = run_together(batcher, [lambda s=s, i=i: s.step(ids(i, i), torch.arange(2)[None], 0, None)
                                     for i, s in enumerate(slots)])
    assert [out.logits[0, :, 0].tolist() for out in results] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    assert calls[0] == ("batch", [2, 2, 2])
    assert [(t.model, t.sequences, t.rows) for t in ticks] == [("target", 3, 6)]


def test_draft_steps_go_before_verify_steps():
    """One member verifies while another drafts: the draft step runs first, alone; the verify step waits for it."""
    calls, batcher = [], StepBatcher()
    target, draft = SlotTarget(FakeTarget(calls), batcher), SlotDraft(FakeDraft(calls), batcher)
    run_together(batcher, [lambda: target.step(ids(1), torch.arange(1)[None], 0, None),
                           lambda: draft.step(torch.zeros(1, 1, 4), ids(1), torch.arange(1)[None], 0, None, 2)])
    assert calls == [("draft", 1), ("step", 1)]


def test_the_budget_leaves_the_rest_for_the_next_tick():
    ticks, base = [], FakeTarget([])
    batcher = StepBatcher(max_batch=2, on_tick=ticks.append)
    slots = [SlotTarget(base.fork(), batcher) for _ in range(3)]
    run_together(batcher, [lambda s=s: s.step(ids(5), torch.arange(1)[None], 0, None) for s in slots])
    assert [t.sequences for t in ticks] == [2, 1]


def test_a_long_prompt_is_handed_in_as_chunks_of_the_backends_prefill_chunk():
    calls, batcher, ticks = [], StepBatcher(), []
    batcher.on_tick = ticks.append
    slot = SlotTarget(FakeTarget(calls), batcher)
    with batcher.member():
        out = slot.step(ids(*range(10)), torch.arange(10)[None], 0, None, last_only=True)
    assert [t.rows for t in ticks] == [4, 4, 2]  # three ticks, the chunk is 4
    assert out.logits.shape == (1, 1, 8) and out.logits[0, 0, 0] == 9 and out.hidden.shape == (1, 10, 1)


def test_a_failing_part_fails_only_its_own_request():
    calls, batcher = [], StepBatcher()
    base = FakeTarget(calls)
    good, bad = SlotTarget(base.fork(), batcher), SlotTarget(base.fork(), batcher)
    results = run_together(batcher, [lambda: good.step(ids(3), torch.tensor([[10]]), 10, None),
                                     lambda: bad.step(ids(4), torch.tensor([[99]]), 99, None)])
    assert results[0].logits[0, 0, 0] == 3  # recomputed alone after the batch failed
    assert isinstance(results[1], RuntimeError) and "bad part" in str(results[1])


def test_only_members_hand_in_steps_and_slot_backends_do_not_fork():
    batcher = StepBatcher()
    slot = SlotTarget(FakeTarget([]), batcher)
    with pytest.raises(HassDeployError, match="not a member"):
        slot.step(ids(1), torch.arange(1)[None], 0, None)
    with pytest.raises(HassDeployError, match="not forked"):
        slot.fork()
    with pytest.raises(ValueError):  # the contract's checks still run in the slot's own thread
        slot.step(ids(1), torch.arange(2)[None], 0, None)
