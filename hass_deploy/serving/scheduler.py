"""Which request runs next: the one scheduling decision of the serving engine, kept in one place.

Today's policy is llama.cpp's without its batch: a bounded FIFO queue in front of N decoder slots, requests
admitted in arrival order into free slots, and the busy slots advanced one speculative round each, in turn.
A round is the unit of work (one draft tree, one verify step), so a long request never holds the others back by
more than one round, and its tokens are exactly what it would produce alone. Verifying several slots' trees in
one batched target step would replace `next_slot` (it would return a group of slots) without touching the
engine's delivery or the HTTP layer.

Not thread-safe on its own: the engine calls it under its lock.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from hass_deploy.errors import HassDeployError

S = TypeVar("S")  # a slot
R = TypeVar("R")  # a request


class QueueFullError(HassDeployError):
    """Every slot is busy and the waiting queue is at its bound: try again later (HTTP 429)."""


class Scheduler(Generic[S, R]):
    def __init__(self, slots: list[S], max_queue: int):
        if not slots:
            raise HassDeployError("a serving engine needs at least one slot (--parallel >= 1)")
        if max_queue < 0:
            raise HassDeployError(f"--max-queue must be >= 0, got {max_queue}")
        self.slots = slots
        self.max_queue = max_queue
        self.queue: deque[R] = deque()
        self.running: dict[int, R] = {}  # slot index -> its request
        self._turn = 0  # the slot index the round-robin looks at first

    def enqueue(self, request: R) -> None:
        """Queue a request; fails fast when it could neither start now nor wait within the bound."""
        free = len(self.slots) - len(self.running)
        if len(self.queue) >= self.max_queue + free:
            raise QueueFullError(f"the server is busy: {len(self.running)} requests running and "
                                 f"{len(self.queue)} waiting (--max-queue {self.max_queue})")
        self.queue.append(request)

    def remove(self, request: R) -> bool:
        """Take a request out of the queue (cancelled or timed out while waiting); False if it is not queued."""
        try:
            self.queue.remove(request)
            return True
        except ValueError:
            return False

    def admit(self) -> list[tuple[int, R]]:
        """Move queued requests, oldest first, into free slots; returns (slot index, request) pairs."""
        admitted = []
        for index in range(len(self.slots)):
            if not self.queue:
                break
            if index not in self.running:
                request = self.queue.popleft()
                self.running[index] = request
                admitted.append((index, request))
        return admitted

    def next_slot(self) -> int | None:
        """The busy slot whose round runs next (round robin), or None when no slot is busy."""
        for offset in range(len(self.slots)):
            index = (self._turn + offset) % len(self.slots)
            if index in self.running:
                self._turn = index + 1
                return index
        return None

    def release(self, index: int) -> R:
        return self.running.pop(index)

    @property
    def idle(self) -> bool:
        return not self.running and not self.queue
