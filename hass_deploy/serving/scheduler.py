"""Which request gets a slot: a bounded FIFO queue in front of N decoder slots, kept in one place.

Requests are admitted in arrival order into free slots (llama.cpp's server and vLLM's policy); every busy slot then
advances at once, its steps batched with the others' (`batcher.py`: which steps a tick computes is decided there),
so a long request never holds the others back and its tokens are exactly what it would produce alone.

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

    def admit(self, index: int) -> R | None:
        """Move the oldest queued request into free slot `index`; None when nothing is queued."""
        if index in self.running:
            raise HassDeployError(f"slot {index} is busy")
        if not self.queue:
            return None
        request = self.queue.popleft()
        self.running[index] = request
        return request

    def release(self, index: int) -> R:
        return self.running.pop(index)

    @property
    def idle(self) -> bool:
        return not self.running and not self.queue
