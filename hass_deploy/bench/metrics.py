"""The numbers a benchmark reports (DESIGN §4), as pure functions over per-prompt records.

Definitions (the paper's evaluation protocol, algorithm.md §5):
    tau        macro average over prompts of mean_rounds(accepted + 1): every prompt weighs the same, however
               many rounds it took (HASS/EAGLE `acceptance_length.py`); not total tokens / total rounds.
    depth acc. conditional acceptance at draft depth d, aggregated over all rounds of all prompts:
               rounds that accepted a token at depth d / rounds whose tree reached depth d with all
               shallower tokens accepted (EAGLE's n-alpha).
    tokens/s   per prompt, new tokens / wall time of the whole generation (prefill included); reported as
               median and interquartile range (linear-interpolated quartiles) over prompts.
    speedup    the paper's ratio of means, mean_p(spec tok/s) / mean_p(plain tok/s) (`speed.py`), and the
               median over prompts of the paired ratio spec tok/s / plain tok/s (robust to a slow outlier).
    lossless   greedy only: every prompt's output ids equal plain decoding's, token for token.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def prompt_tau(accept_lengths: Sequence[int]) -> float | None:
    """Mean accepted + 1 per round for one prompt; None when it took no round (stopped at the first token)."""
    return sum(a + 1 for a in accept_lengths) / len(accept_lengths) if accept_lengths else None


def macro_tau(accept_lengths_per_prompt: Sequence[Sequence[int]]) -> float | None:
    """The paper's tau: the mean over prompts (with at least one round) of each prompt's mean accepted + 1."""
    taus = [t for t in map(prompt_tau, accept_lengths_per_prompt) if t is not None]
    return sum(taus) / len(taus) if taus else None


def depth_counts(per_prompt: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Elementwise sum of per-depth counts whose lengths differ between prompts (depths never reached are 0)."""
    total: list[int] = []
    for counts in per_prompt:
        total.extend([0] * (len(counts) - len(total)))
        for d, n in enumerate(counts):
            total[d] += n
    return tuple(total)


def depth_acceptance(attempts: Sequence[Sequence[int]], accepts: Sequence[Sequence[int]]) -> tuple[float, ...]:
    """Conditional acceptance per depth, pooled over rounds: sum of accepts[d] / sum of attempts[d]."""
    tried, taken = depth_counts(attempts), depth_counts(accepts)
    taken = taken + (0,) * (len(tried) - len(taken))
    return tuple(a / n if n else 0.0 for a, n in zip(taken, tried))


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default, R type 7)."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Spread:
    """Location and spread of a per-prompt quantity."""

    median: float
    q1: float  # 25th percentile
    q3: float  # 75th percentile
    mean: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        return cls(median=quantile(values, 0.5), q1=quantile(values, 0.25), q3=quantile(values, 0.75),
                   mean=sum(values) / len(values))


def speedup_of_means(spec_tokens_per_s: Sequence[float], plain_tokens_per_s: Sequence[float]) -> float:
    """The paper's speedup: mean of per-prompt speculative throughputs / mean of per-prompt plain throughputs."""
    return statistics.fmean(spec_tokens_per_s) / statistics.fmean(plain_tokens_per_s)


def median_speedup(spec_tokens_per_s: Sequence[float], plain_tokens_per_s: Sequence[float]) -> float:
    """Median over prompts of the paired ratio (the same prompt, measured back to back)."""
    if len(spec_tokens_per_s) != len(plain_tokens_per_s):
        raise ValueError("paired speedups need one plain throughput per speculative one")
    return quantile([s / p for s, p in zip(spec_tokens_per_s, plain_tokens_per_s)], 0.5)


def first_mismatch(output: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first token where `output` departs from `reference` (a length difference counts), or None."""
    for i, (a, b) in enumerate(zip(output, reference)):
        if a != b:
            return i
    return None if len(output) == len(reference) else min(len(output), len(reference))
