"""The serving scheduler on its own: a bounded FIFO queue in front of slots."""

from __future__ import annotations

import pytest

from hass_deploy.errors import HassDeployError
from hass_deploy.serving.scheduler import QueueFullError, Scheduler


def scheduler(slots: int = 3, max_queue: int = 2) -> Scheduler[str, str]:
    return Scheduler([f"slot{i}" for i in range(slots)], max_queue)


def admit_all(s: Scheduler) -> list[tuple[int, str]]:
    """Every free slot, lowest first, takes the oldest queued request (as the engine's idle slot threads do)."""
    admitted = []
    for index in range(len(s.slots)):
        if index not in s.running and s.queue:
            admitted.append((index, s.admit(index)))
    return admitted


def test_admits_in_arrival_order_into_free_slots():
    s = scheduler(slots=3, max_queue=5)
    for name in "abcde":
        s.enqueue(name)
    assert admit_all(s) == [(0, "a"), (1, "b"), (2, "c")]
    assert list(s.queue) == ["d", "e"] and admit_all(s) == []  # no free slot: nothing moves
    assert s.release(1) == "b"
    assert s.admit(1) == "d"  # the oldest waiting request takes the freed slot
    assert s.release(0) == "a" and s.release(2) == "c"
    assert s.admit(2) == "e"
    assert s.admit(0) is None  # the queue is empty
    assert s.running == {1: "d", 2: "e"} and not s.queue
    with pytest.raises(HassDeployError, match="busy"):
        s.admit(1)


def test_the_bound_is_slots_plus_queue():
    s = scheduler(slots=2, max_queue=3)
    for i in range(5):  # P + Q requests fit, whether they wait or run
        s.enqueue(f"r{i}")
    with pytest.raises(QueueFullError, match="busy"):
        s.enqueue("r5")
    admit_all(s)  # two run, three wait: still full
    assert len(s.running) == 2 and len(s.queue) == 3
    with pytest.raises(QueueFullError):
        s.enqueue("r5")
    s.release(0)  # a slot frees up: room for exactly one more
    s.enqueue("r5")
    with pytest.raises(QueueFullError):
        s.enqueue("r6")
    assert list(s.queue) == ["r2", "r3", "r4", "r5"]
    assert admit_all(s) == [(0, "r2")]


def test_no_queue_means_fail_fast_once_every_slot_is_busy():
    s = scheduler(slots=1, max_queue=0)
    s.enqueue("a")  # a free slot: accepted even with no queue
    with pytest.raises(QueueFullError):
        s.enqueue("b")
    admit_all(s)
    with pytest.raises(QueueFullError):
        s.enqueue("b")
    s.release(0)
    s.enqueue("b")


def test_remove_a_queued_request():
    s = scheduler(slots=1, max_queue=3)
    for name in "abc":
        s.enqueue(name)
    admit_all(s)
    assert s.remove("b") is True
    assert s.remove("b") is False  # no longer queued
    assert s.remove("a") is False  # running, not queued: remove leaves it alone
    assert s.running == {0: "a"} and list(s.queue) == ["c"]
    s.release(0)
    assert admit_all(s) == [(0, "c")]


def test_release_returns_the_slots_request_and_idle():
    s = scheduler(slots=2, max_queue=1)
    assert s.idle
    s.enqueue("a")
    assert not s.idle  # waiting counts
    admit_all(s)
    assert not s.idle  # running counts
    assert s.release(0) == "a"
    assert s.idle
    with pytest.raises(KeyError):
        s.release(0)  # a free slot has nothing to release


@pytest.mark.parametrize("slots, max_queue, words", [(0, 4, "at least one slot"), (2, -1, "max-queue")])
def test_bad_construction(slots, max_queue, words):
    with pytest.raises(HassDeployError, match=words):
        scheduler(slots, max_queue)
