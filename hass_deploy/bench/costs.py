"""What a decoding round costs on this machine: measured step latencies (the cost curve of DESIGN D4) and a
timing proxy that splits a generation's wall time into model steps and the loop's own bookkeeping.

The cost curve times the backends' `step` directly, at a representative committed context, each step size
interleaved with the others in a seeded random order and repeated, so that drift and a neighbour's load on the
shared cores spread over all sizes instead of biasing one; medians are kept.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hass_deploy.models.target import causal_tree_mask
from hass_deploy.runtime.backends.base import DraftBackend, TargetBackend


def _interpolate(points: Sequence[tuple[int, float]], x: float) -> float:
    """Piecewise-linear through (size, ms) points sorted by size; linear extrapolation past either end."""
    if len(points) == 1:
        return points[0][1]
    if x <= points[0][0]:
        (x0, y0), (x1, y1) = points[0], points[1]
    elif x >= points[-1][0]:
        (x0, y0), (x1, y1) = points[-2], points[-1]
    else:
        i = next(i for i, (size, _) in enumerate(points) if size >= x)
        (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass(frozen=True)
class CostCurve:
    """Median step latencies in milliseconds, measured with `context` committed KV rows.

    Attributes:
        target_ms: (T, ms) for a target step verifying T tree tokens.
        draft_ms: (rows, ms) for a draft step over that many rows (a tree level has top_k rows; the context
            pass after a round has accepted + 1 rows).
        prefill_ms, draft_prefill_ms: a causal pass over `context` rows (the prompt), target and draft.
    """

    context: int
    target_ms: tuple[tuple[int, float], ...]
    draft_ms: tuple[tuple[int, float], ...]
    prefill_ms: float
    draft_prefill_ms: float
    repeats: int

    def target(self, tokens: float) -> float:
        return _interpolate(self.target_ms, tokens)

    def draft(self, rows: float) -> float:
        return _interpolate(self.draft_ms, rows) if self.draft_ms else 0.0

    def prefill(self, prompt_tokens: int) -> float:
        """Target prefill of a prompt, scaled linearly from the measured one (ms)."""
        return self.prefill_ms * prompt_tokens / self.context

    def draft_prefill(self, prompt_tokens: int) -> float:
        """The draft's first context pass, over the whole prompt (ms)."""
        return self.draft_prefill_ms * prompt_tokens / self.context

    def to_dict(self) -> dict:
        return {"context": self.context, "repeats": self.repeats, "unit": "ms",
                "target_ms": {str(t): ms for t, ms in self.target_ms},
                "draft_ms": {str(r): ms for r, ms in self.draft_ms},
                "prefill_ms": self.prefill_ms, "draft_prefill_ms": self.draft_prefill_ms}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host-device sync: a timer must wait for the queued kernels


def _timed(device: torch.device, call) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = call()
    _sync(device)
    return (time.perf_counter() - start) * 1e3, out


@torch.no_grad()
def measure_cost_curve(target: TargetBackend, draft: DraftBackend | None, context: int,
                       target_sizes: Sequence[int], draft_sizes: Sequence[int], top_k: int, repeats: int,
                       seed: int = 0) -> CostCurve:
    """Time target steps of each size in `target_sizes` and draft steps of each size in `draft_sizes`.

    Args:
        target, draft: open backends; their KV rows from `context` on are overwritten (the next generation's
            prefill starts from row 0, so nothing is left behind).
        context: committed rows the steps attend over (the mid-generation context of a typical prompt).
        top_k: the draft step's top-k (its cost hardly depends on it; the graph's own K on ONNX Runtime).
        repeats: timed repeats per size, after two untimed passes (first-call allocations, IO bindings).
    """
    device = target.device
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, target.vocab_size, (1, context + max([*target_sizes, *draft_sizes, 1])),
                        generator=generator).to(device)
    positions = torch.arange(ids.shape[1], device=device)[None]  # [1, S]

    def prefill():
        return target.step(ids[:, :context], positions[:, :context], 0, None, last_only=True)

    out = prefill()
    features = out.hidden  # [1, context, H]: real target features for the draft's inputs

    def draft_prefill():
        return draft.step(features, ids[:, 1:context + 1], positions[:, :context], 0, None, top_k)

    def target_step(size: int):
        # A chain's mask: a tree of the same size costs the same (one masked T x T block).
        return target.step(ids[:, context:context + size], positions[:, context:context + size], context,
                           causal_tree_mask(size, device))

    def draft_step(size: int):
        level = features[:, -1:].expand(1, size, -1).contiguous()  # [1, R, H]
        mask = torch.eye(size, dtype=torch.bool, device=device)[None]  # [1, R, R]: one tree level's rows
        return draft.step(level, ids[:, context:context + size], positions[:, context:context + size], context,
                          mask, top_k)

    jobs = [("prefill", context)] + [("target", size) for size in sorted(set(target_sizes))]
    if draft is not None:
        draft_prefill()
        jobs += [("draft_prefill", context)] + [("draft", size) for size in sorted(set(draft_sizes))]
    run = {"target": target_step, "draft": draft_step, "prefill": lambda size: prefill(),
           "draft_prefill": lambda size: draft_prefill()}
    times: dict[tuple[str, int], list[float]] = {job: [] for job in jobs}
    order = random.Random(seed)
    for rep in range(repeats + 2):
        shuffled = list(jobs)
        order.shuffle(shuffled)
        for kind, size in shuffled:
            ms, _ = _timed(device, lambda: run[kind](size))
            if rep >= 2:
                times[(kind, size)].append(ms)
    median = {job: statistics.median(values) for job, values in times.items()}
    return CostCurve(
        context=context,
        target_ms=tuple((size, median[("target", size)]) for kind, size in jobs if kind == "target"),
        draft_ms=tuple((size, median[("draft", size)]) for kind, size in jobs if kind == "draft"),
        prefill_ms=median[("prefill", context)],
        draft_prefill_ms=median.get(("draft_prefill", context), 0.0),
        repeats=repeats,
    )


class StepTimer:
    """A backend proxy that records the wall time of each `step` call; everything else passes through.

    Wrapped around the backends of a decoder, it tells a generation's prefill from its rounds.
    """

    def __init__(self, backend):
        self.backend = backend
        self.calls: list[float] = []  # ms of each step, in call order

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def step(self, *args, **kwargs):
        ms, out = _timed(self.backend.device, lambda: self.backend.step(*args, **kwargs))
        self.calls.append(ms)
        return out
