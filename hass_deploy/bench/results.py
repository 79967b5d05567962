"""A benchmark's records and summaries: one `PromptRun` per prompt and method, `MethodSummary` per prompt set
(and overall) and method, and the `BenchReport` that holds them with the settings and the machine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hass_deploy.bench.config import BenchConfig
from hass_deploy.bench.metrics import (Spread, depth_acceptance, depth_counts, macro_tau, median_speedup,
                                       speedup_of_means)
from hass_deploy.bench.tree_search import TreeChoice
from hass_deploy.config import HybridConfig, TreeConfig

PLAIN = "plain"
LOOKUP = "lookup"  # prompt lookup: speculative decoding without a draft head (`runtime/lookup.py`)
HYBRID = "hybrid"  # the draft head and prompt lookup in one tree per round (`runtime/hybrid.py`)
OVERALL = "overall"


@dataclass(frozen=True)
class Method:
    key: str  # "plain", "lookup", "hybrid", or a draft's ("draft" and "baseline" from `run_bench`)
    label: str  # what tables and plots call it, e.g. "HASS (drafts/hass)"
    path: str | None  # the draft directory (None for plain decoding and prompt lookup)


@dataclass(frozen=True)
class PromptRun:
    """One generation of the benchmark: one prompt, one method."""

    prompt_set: str
    index: int  # position among the set's benchmarked prompts
    question_id: Any
    method: str
    prompt_tokens: int
    new_tokens: int
    wall_s: float  # the whole generation, prefill included (the paper times `eagenerate` as a whole)
    accept_lengths: tuple[int, ...]  # accepted draft tokens per round
    depth_attempts: tuple[int, ...]
    depth_accepts: tuple[int, ...]
    stop_reason: str
    draft_rounds: int = 0  # rounds in which the draft head ran (hybrid: only those it was worth its cost)
    matches_plain: bool | None = None  # greedy: output ids equal plain decoding's; None when not checked
    first_mismatch: int | None = None  # index of the first differing new token

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def name(self) -> str:
        return f"{self.prompt_set}#{self.question_id}"


@dataclass(frozen=True)
class MethodSummary:
    """One method over a set of prompts (definitions in `metrics.py`)."""

    method: str
    prompts: int
    new_tokens: int
    wall_s: float
    tokens_per_s: Spread
    tau: float | None  # None for plain decoding
    rounds: int
    depth_acceptance: tuple[float, ...]
    depth_attempts: tuple[int, ...]
    speedup: float | None  # the paper's ratio of mean throughputs; None for plain decoding
    speedup_median: float | None  # median of per-prompt paired ratios
    mismatched: tuple[str, ...] | None  # prompts whose greedy output differs from plain; None = not checked
    draft_rounds: int = 0  # rounds in which the draft head ran

    @property
    def identical(self) -> bool | None:
        return None if self.mismatched is None else not self.mismatched

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tokens_per_s"] = {**asdict(self.tokens_per_s), "iqr": self.tokens_per_s.iqr}
        out["identical"] = self.identical
        return out


def summarise(runs: Sequence[PromptRun], plain: Sequence[PromptRun], method: str, checked: bool) -> MethodSummary:
    """Summary of `runs` (one method), paired prompt by prompt with the plain runs of the same prompts."""
    speculative = method != PLAIN
    spec_tps = [r.tokens_per_s for r in runs]
    plain_tps = [r.tokens_per_s for r in plain]
    paired = speculative and all(t > 0 for t in plain_tps)
    return MethodSummary(
        method=method, prompts=len(runs), new_tokens=sum(r.new_tokens for r in runs),
        wall_s=sum(r.wall_s for r in runs), tokens_per_s=Spread.of(spec_tps),
        tau=macro_tau([r.accept_lengths for r in runs]) if speculative else None,
        rounds=sum(len(r.accept_lengths) for r in runs),
        depth_acceptance=depth_acceptance([r.depth_attempts for r in runs], [r.depth_accepts for r in runs]),
        depth_attempts=depth_counts([r.depth_attempts for r in runs]),
        draft_rounds=sum(r.draft_rounds for r in runs),
        speedup=speedup_of_means(spec_tps, plain_tps) if paired else None,
        speedup_median=median_speedup(spec_tps, plain_tps) if paired else None,
        mismatched=tuple(r.name for r in runs if r.matches_plain is False) if checked and speculative else None,
    )


@dataclass(frozen=True)
class AutoOutcome:
    """`--tree auto`'s prediction next to what the benchmark then measured with the chosen tree."""

    predicted_tokens_per_s: float  # whole generations at the benchmark's mean prompt and output lengths
    predicted_with_bench_tau: float  # the same with the benchmark's tau (isolates the cost model's error)
    measured_tokens_per_s: float  # mean over prompts of per-prompt tok/s (the paper's throughput statistic)
    predicted_plain_tokens_per_s: float
    measured_plain_tokens_per_s: float

    @property
    def efficiency(self) -> float:
        """Measured over predicted speed at the benchmark's own tau: what the runtime delivers of what its step
        costs promise (1.0 = no loss to the loop, caches or the host), acceptance taken out of the comparison."""
        return self.measured_tokens_per_s / self.predicted_with_bench_tau if self.predicted_with_bench_tau else 0.0


@dataclass(frozen=True)
class BenchReport:
    config: BenchConfig
    sources: dict  # target, drafts, prompt files, artifacts
    methods: tuple[Method, ...]
    tree: TreeConfig  # used by every draft (prompt lookup's is `config.lookup`)
    hybrid: HybridConfig | None  # as run (with --tree auto, its draft cost measured); None without the method
    tree_choice: TreeChoice | None  # with --tree auto
    auto_outcome: AutoOutcome | None
    prompt_sets: tuple[str, ...]
    prompt_encoding: str  # "tokenizer", "chat template", or "bytes" for a target without a tokenizer
    truncated_prompts: int  # prompts cut from the left to fit the KV cache with max_new_tokens
    runs: tuple[PromptRun, ...]
    summaries: dict[str, dict[str, MethodSummary]]  # prompt set (and "overall") -> method key -> summary
    machine: dict
    seconds: float

    @property
    def greedy(self) -> bool:
        return self.config.sampling.greedy

    @property
    def lossless(self) -> bool | None:
        """Greedy: True when every speculative output equals plain decoding's; None for sampling (not checked)."""
        if not self.greedy:
            return None
        return all(r.matches_plain is not False for r in self.runs)

    @property
    def mismatches(self) -> tuple[PromptRun, ...]:
        return tuple(r for r in self.runs if r.matches_plain is False)

    def label(self, key: str) -> str:
        return next(m.label for m in self.methods if m.key == key)

    @property
    def drafts(self) -> tuple[str, ...]:
        """The draft methods' keys, in order: the first is the one `--tree auto` and hybrid drafting ran."""
        return tuple(m.key for m in self.methods if m.path is not None)

    def lossless_line(self) -> str:
        if self.lossless is None:
            return ("lossless check: not applicable at temperature > 0 (sampling is exact in distribution, "
                    "checked statistically by the test suite)")
        checked = sum(1 for r in self.runs if r.matches_plain is not None)
        if self.lossless:
            return f"lossless check: PASSED, greedy outputs identical to plain decoding on all {checked} runs"
        bad = self.mismatches
        first = bad[0]
        return (f"LOSSLESS CHECK FAILED: {len(bad)} of {checked} greedy runs differ from plain decoding "
                f"(first: {self.label(first.method)} on {first.name} at new token {first.first_mismatch})")

    def to_dict(self) -> dict:
        config = asdict(self.config)
        return {
            "config": config, "sources": self.sources, "machine": self.machine, "seconds": self.seconds,
            "methods": [asdict(m) for m in self.methods],
            "tree": asdict(self.tree), "hybrid": None if self.hybrid is None else asdict(self.hybrid), "tree_auto": None if self.tree_choice is None else {
                **self.tree_choice.to_dict(),
                "outcome": None if self.auto_outcome is None else {**asdict(self.auto_outcome),
                                                                    "efficiency": self.auto_outcome.efficiency}},
            "prompt_sets": list(self.prompt_sets), "prompt_encoding": self.prompt_encoding,
            "truncated_prompts": self.truncated_prompts,
            "lossless": self.lossless, "lossless_check": self.lossless_line(),
            "summaries": {name: {key: s.to_dict() for key, s in by_method.items()}
                          for name, by_method in self.summaries.items()},
            "runs": [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in self.runs],
        }
