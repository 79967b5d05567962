"""`--tree auto`: choose the draft tree's budget, depth and top-k for the most tokens per second (DESIGN D4).

Method.
    1. Cost curve (`costs.measure_cost_curve`): median latency of a target step verifying T tokens, and of a
       draft step over R rows, at a representative committed context, on this machine and backend.
    2. Acceptance, measured directly: every candidate tree decodes a calibration prompt with the real draft and
       target (a one-prompt screen), and the best few by predicted speed (`finalists`) decode the remaining
       calibration prompts too; their tau is the paper's macro average over all calibration prompts.
    3. Per-round correction: the calibration runs go through `StepTimer` proxies, which time each prefill,
       so every run gives its measured time per round; minus the steps the cost curve predicts for that round,
       this leaves the loop's own work (tree building, acceptance, compaction, Python) plus the difference
       between a step inside the loop and the same step timed in isolation (caches stay warmer in a loop:
       on this machine isolated, interleaved steps time 5-15 % slower). It is fitted as
       `base + per_level * (depth - 1)` for the draft, and as one constant for plain decoding.
    4. Prediction: a round of tree (T, D, K) costs
           target(T) + draft(tau) + (D - 1) * draft(K) + base + per_level * (D - 1)        [ms]
       (the draft's context pass runs the accepted + 1 rows of the previous round, about tau of them; each
       further level runs K rows), so steady-state tokens/s = tau / round. The finalist with the highest
       prediction wins.

Why measure tau per candidate rather than extrapolate it from one generous tree: the EAGLE-2 tree is a beam
search reranked to a budget, and a narrower beam expands nodes a wider one dropped, so the sub-trees of a
generous tree are not the trees smaller configurations build; replaying them would bias tau in a
configuration-dependent way. Greedy tau is deterministic per prompt, so one short prompt is an exact paired
comparison between candidates (all see the same text), and the finalists' re-measurement on more prompts
guards against one prompt's idiosyncrasy. Why predict tokens/s from the cost curve instead of timing the
calibration runs: those runs are short, and on shared cores their wall times are far noisier than medians of
interleaved step timings; the model separates the noisy part (timing) from the exact part (acceptance).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from hass_deploy.bench.config import BenchConfig, TreeSearchConfig
from hass_deploy.bench.costs import CostCurve, StepTimer, measure_cost_curve
from hass_deploy.bench.metrics import macro_tau
from hass_deploy.config import GenerationConfig, HybridConfig, TreeConfig
from hass_deploy.errors import ConfigError
from hass_deploy.runtime.backends.base import DraftBackend, TargetBackend
from hass_deploy.runtime.decoder import SpeculativeDecoder


def effective_tree(tree: TreeConfig) -> TreeConfig:
    """The tree the decoder actually builds: depth is capped by the budget (tokens - 1 draft nodes), and the
    budget by the candidate pool (K children of the root, then K * K per further level)."""
    depth = min(tree.depth, tree.tokens - 1)
    pool = tree.top_k + (depth - 1) * tree.top_k * tree.top_k
    return TreeConfig(tokens=min(tree.tokens, 1 + pool), depth=depth, top_k=tree.top_k)


def candidate_grid(search: TreeSearchConfig, max_tokens: int | None = None, max_top_k: int | None = None,
                   max_draft_rows: int | None = None, chains_only: bool = False) -> tuple[TreeConfig, ...]:
    """Distinct effective trees of the grid: chains of `chain_depths`, and tokens x depths x top_ks (or, with
    `chains_only`, the chains among them).

    A beam wider than the tree (top_k > tokens - 1) only adds draft cost and is left out; the limits are a
    backend's (an export's tree budget and top-k, the draft's KV rows for tree levels).
    """
    raw = [TreeConfig(tokens=d + 1, depth=d, top_k=1) for d in search.chain_depths]
    raw += [TreeConfig(tokens=n, depth=d, top_k=k) for n in search.tokens for d in search.depths
            for k in search.top_ks if n >= 2]
    grid = set()
    for tree in map(effective_tree, raw):
        if tree.top_k > tree.tokens - 1 or (chains_only and tree.top_k > 1):
            continue
        if max_tokens is not None and tree.tokens > max_tokens:
            continue
        if max_top_k is not None and tree.top_k > max_top_k:
            continue
        if max_draft_rows is not None and tree.draft_rows > max_draft_rows:
            continue
        grid.add(tree)
    return tuple(sorted(grid, key=lambda t: (t.tokens, t.depth, t.top_k)))


def grid_envelope(grid: Sequence[TreeConfig]) -> TreeConfig:
    """One tree config whose KV needs (draft rows, tree tokens, top-k) cover every tree of the grid."""
    return TreeConfig(tokens=max(t.tokens for t in grid), depth=max(t.depth for t in grid),
                      top_k=max(t.top_k for t in grid))


@dataclass(frozen=True)
class RoundOverhead:
    """Per-round time the cost curve's steps leave out (ms): base + per_level * (depth - 1) with a draft, plain_ms
    without. Measured on calibration runs, so it may be negative where steps run faster in the loop."""

    base_ms: float
    per_level_ms: float
    plain_ms: float

    def speculative(self, tree: TreeConfig) -> float:
        return self.base_ms + self.per_level_ms * (tree.depth - 1)


def fit_overhead(samples: Sequence[tuple[int, float]], plain_samples: Sequence[float]) -> RoundOverhead:
    """Fit `base + per_level * levels` to (levels, ms per round) samples, robustly.

    Samples are grouped by level count and reduced to their medians (one slow run on shared cores does not
    tilt the line); a least-squares line through the group medians, with each group weighing the same, gives
    the slope and the intercept.
    """
    plain = statistics.median(plain_samples) if plain_samples else 0.0
    if not samples:
        return RoundOverhead(base_ms=plain, per_level_ms=0.0, plain_ms=plain)
    groups: dict[int, list[float]] = {}
    for levels, ms in samples:
        groups.setdefault(levels, []).append(ms)
    xs = sorted(groups)
    ys = [statistics.median(groups[x]) for x in xs]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0
    return RoundOverhead(base_ms=mean_y - slope * mean_x, per_level_ms=slope, plain_ms=plain)


def step_ms(tree: TreeConfig | None, tau: float, curve: CostCurve) -> float:
    """The model steps of one round by the cost curve (ms); `tree=None` is a plain decoding step."""
    if tree is None:
        return curve.target(1)
    tree = effective_tree(tree)
    return curve.target(tree.tokens) + curve.draft(tau) + (tree.depth - 1) * curve.draft(tree.top_k)


def round_ms(tree: TreeConfig, tau: float, curve: CostCurve, overhead: RoundOverhead) -> float:
    """Predicted wall time of one speculative round (ms) with the tree's effective size (never below a tenth of
    its steps, whatever a noisy correction says)."""
    steps = step_ms(tree, tau, curve)
    return max(0.1 * steps, steps + overhead.speculative(effective_tree(tree)))


def predict_tokens_per_s(tree: TreeConfig | None, tau: float, curve: CostCurve, overhead: RoundOverhead) -> float:
    """Steady-state decoding speed (prefill excluded); `tree=None` is plain decoding (one token per step)."""
    if tree is None:
        return 1e3 / max(0.1 * curve.target(1), curve.target(1) + overhead.plain_ms)
    return 1e3 * tau / round_ms(tree, tau, curve, overhead)


def predict_generation_tokens_per_s(tree: TreeConfig | None, tau: float, curve: CostCurve, overhead: RoundOverhead,
                                    prompt_tokens: float, new_tokens: float) -> float:
    """Whole-generation speed as the benchmark measures it: prefill (target, and the draft's first context pass
    over the prompt) then rounds; the prefill's argmax is the first new token."""
    if tree is None:
        ms = curve.prefill(prompt_tokens) + (new_tokens - 1) * 1e3 / predict_tokens_per_s(None, 1.0, curve, overhead)
    else:
        rounds = (new_tokens - 1) / tau
        ms = curve.prefill(prompt_tokens) + curve.draft_prefill(prompt_tokens) + rounds * round_ms(tree, tau, curve, overhead)
    return 1e3 * new_tokens / ms if ms > 0 else 0.0


def measured_hybrid(hybrid: HybridConfig, tree: TreeConfig, tau: float, curve: CostCurve,
                    overhead: RoundOverhead) -> HybridConfig:
    """`HybridConfig`'s costs from measured ones, in target steps verifying a hybrid tree: the draft work of a
    round with this tree, and a row of the draft's context pass (its prefill over the cost curve's context, per
    row). The draft's work is what a measured speculative round takes beyond its verify step and a plain round's
    own loop work (the calibration runs time it in the loop: the host side of growing a tree, reading the pool
    and ranking it, is as large as the draft steps on a few CPU cores), and at least its draft steps."""
    tree = effective_tree(tree)
    verify_ms = curve.target(hybrid.tokens)
    steps_ms = curve.draft(tau) + (tree.depth - 1) * curve.draft(tree.top_k)
    in_loop_ms = round_ms(tree, tau, curve, overhead) - curve.target(tree.tokens) - overhead.plain_ms
    draft_ms = max(steps_ms, in_loop_ms)
    return replace(hybrid, draft_cost=round(draft_ms / verify_ms, 3),
                   row_cost=round(curve.draft_prefill_ms / curve.context / verify_ms, 4))


@dataclass(frozen=True)
class Candidate:
    tree: TreeConfig
    tau: float  # macro average over the prompts it was measured on
    prompts: int  # calibration prompts it decoded (1 = screened out)
    round_ms: float  # predicted
    predicted_tokens_per_s: float  # steady state


def rank_candidates(taus: Mapping[TreeConfig, float], curve: CostCurve, overhead: RoundOverhead,
                    prompts: Mapping[TreeConfig, int] | None = None) -> tuple[Candidate, ...]:
    """Candidates by predicted tokens/s, best first; ties go to the cheaper tree (fewer tokens, shallower)."""
    ranked = [Candidate(tree=tree, tau=tau, prompts=(prompts or {}).get(tree, 1),
                        round_ms=round_ms(tree, tau, curve, overhead),
                        predicted_tokens_per_s=predict_tokens_per_s(tree, tau, curve, overhead))
              for tree, tau in taus.items()]
    return tuple(sorted(ranked, key=lambda c: (-c.predicted_tokens_per_s, c.tree.tokens, c.tree.depth, c.tree.top_k)))


def choose_tree(taus: Mapping[TreeConfig, float], curve: CostCurve, overhead: RoundOverhead) -> Candidate:
    """The tree with the highest predicted tokens/s given measured acceptance (tau per tree) and costs."""
    if not taus:
        raise ConfigError("--tree auto: no candidate tree fits this backend's limits")
    return rank_candidates(taus, curve, overhead)[0]


@dataclass(frozen=True)
class TreeChoice:
    """What `--tree auto` chose and everything it was chosen from (all of it goes into bench.json)."""

    tree: TreeConfig
    tau: float  # the chosen tree's calibration tau
    predicted_tokens_per_s: float  # steady state, with the draft
    plain_predicted_tokens_per_s: float  # steady state, plain decoding
    curve: CostCurve
    overhead: RoundOverhead
    finalists: tuple[Candidate, ...]  # measured on every calibration prompt, best first
    screened: tuple[Candidate, ...]  # the one-prompt screen of the whole grid, best first
    calibration_prompts: tuple[str, ...]
    calibration_overlaps_bench: bool  # True when the prompt files had no prompts beyond the benchmarked ones
    seconds: float  # wall time of the search
    at_grid_edge: tuple[str, ...] = ()  # "depth", "tokens": the choice sits at the grid's largest; a bigger may win

    @property
    def predicted_speedup(self) -> float:
        return self.predicted_tokens_per_s / self.plain_predicted_tokens_per_s

    def to_dict(self) -> dict:
        def candidate(c: Candidate) -> dict:
            return {"tokens": c.tree.tokens, "depth": c.tree.depth, "top_k": c.tree.top_k, "tau": c.tau,
                    "prompts": c.prompts, "round_ms": c.round_ms, "predicted_tokens_per_s": c.predicted_tokens_per_s}

        return {"tree": {"tokens": self.tree.tokens, "depth": self.tree.depth, "top_k": self.tree.top_k},
                "tau": self.tau, "predicted_tokens_per_s": self.predicted_tokens_per_s,
                "plain_predicted_tokens_per_s": self.plain_predicted_tokens_per_s,
                "predicted_speedup": self.predicted_speedup, "cost_curve": self.curve.to_dict(),
                "overhead_ms": {"base": self.overhead.base_ms, "per_level": self.overhead.per_level_ms,
                                "plain": self.overhead.plain_ms},
                "finalists": [candidate(c) for c in self.finalists],
                "screened": [candidate(c) for c in self.screened],
                "calibration_prompts": list(self.calibration_prompts),
                "calibration_overlaps_bench": self.calibration_overlaps_bench, "seconds": self.seconds,
                "at_grid_edge": list(self.at_grid_edge)}


def search_tree(target: TargetBackend, draft: DraftBackend, prompts: Sequence[list[int]], labels: Sequence[str],
                config: BenchConfig, eos_token_ids: tuple[int, ...], context: int, overlaps_bench: bool,
                log: Callable[[str], None] = lambda line: None) -> TreeChoice:
    """Measure the cost curve and the candidates' acceptance on `prompts`, and choose (method: module docstring).

    Args:
        target, draft: open backends; the draft's KV must have rows for the grid's deepest, widest tree.
        prompts, labels: calibration prompt ids and their names ("set#question_id").
        context: committed rows at which the cost curve is measured.
    """
    started = time.perf_counter()
    search = config.search
    # A target whose tree rows are not plain decoding's verifies chains only (`TargetBackend.tree_rows_exact`).
    grid = candidate_grid(search, getattr(target, "max_tree_tokens", None), getattr(draft, "max_top_k", None),
                          draft.max_len - target.max_len, chains_only=not target.tree_rows_exact)
    if not grid:
        raise ConfigError("--tree auto: no candidate tree fits this backend's limits (tree budget, top-k)")
    log(f"tree auto: measuring step costs at a {context}-token context")
    curve = measure_cost_curve(
        target, draft, context, target_sizes=sorted({1} | {t.tokens for t in grid}),
        draft_sizes=sorted(set(range(1, max(t.depth for t in grid) + 2)) | {t.top_k for t in grid}),
        top_k=max(t.top_k for t in grid), repeats=search.repeats, seed=config.seed)
    timed_target, timed_draft = StepTimer(target), StepTimer(draft)
    speculative, plain = SpeculativeDecoder(timed_target, timed_draft), SpeculativeDecoder(timed_target, None)

    def decode(decoder: SpeculativeDecoder, ids: list[int], tree: TreeConfig, seed: int) -> tuple[list[int], float]:
        """Accept lengths and the per-round correction (ms) of one calibration generation."""
        gen = GenerationConfig(max_new_tokens=min(search.max_new_tokens, config.max_new_tokens),
                               sampling=config.sampling, tree=tree, seed=seed, eos_token_ids=eos_token_ids)
        first_target, first_draft = len(timed_target.calls), len(timed_draft.calls)
        result = decoder.generate(ids, gen)
        # The first target step is the prefill, the draft's first the context pass over the prompt.
        prefill = timed_target.calls[first_target] + sum(timed_draft.calls[first_draft:first_draft + 1])
        per_round = (1e3 * result.wall_s - prefill) / max(result.rounds, 1)
        tau = macro_tau([result.accept_lengths]) or 1.0
        return result.accept_lengths, per_round - step_ms(tree if decoder is speculative else None, tau, curve)

    decode(speculative, prompts[0], grid[0], config.seed)  # warm-up: first-call allocations
    plain_overheads = [decode(plain, ids, grid[0], config.seed + i)[1] for i, ids in enumerate(prompts)]
    log(f"tree auto: screening {len(grid)} trees on 1 prompt, the best {search.finalists} on {len(prompts)}")
    accepts: dict[TreeConfig, list[list[int]]] = {}
    samples: list[tuple[int, float]] = []
    for tree in grid:
        lengths, overhead_ms = decode(speculative, prompts[0], tree, config.seed)
        accepts[tree] = [lengths]
        samples.append((tree.depth - 1, overhead_ms))
    overhead = fit_overhead(samples, plain_overheads)
    screened = rank_candidates({t: macro_tau(a) or 1.0 for t, a in accepts.items()}, curve, overhead)
    finalists = [c.tree for c in screened[: search.finalists]]
    for i, ids in enumerate(prompts[1:], start=1):
        for tree in finalists:
            lengths, overhead_ms = decode(speculative, ids, tree, config.seed + i)
            accepts[tree].append(lengths)
            samples.append((tree.depth - 1, overhead_ms))
    overhead = fit_overhead(samples, plain_overheads)
    taus = {tree: macro_tau(accepts[tree]) or 1.0 for tree in finalists}
    ranked = rank_candidates(taus, curve, overhead, {t: len(accepts[t]) for t in finalists})
    best = ranked[0]
    edge = tuple(name for name, value, largest in (("depth", best.tree.depth, max(t.depth for t in grid)),
                                                    ("tokens", best.tree.tokens, max(t.tokens for t in grid)))
                 if value == largest)
    return TreeChoice(tree=best.tree, tau=best.tau, predicted_tokens_per_s=best.predicted_tokens_per_s,
                      plain_predicted_tokens_per_s=predict_tokens_per_s(None, 1.0, curve, overhead), curve=curve,
                      overhead=overhead, finalists=ranked,
                      screened=rank_candidates({t: macro_tau(a[:1]) or 1.0 for t, a in accepts.items()}, curve,
                                               overhead),
                      calibration_prompts=tuple(labels), calibration_overlaps_bench=overlaps_bench,
                      seconds=time.perf_counter() - started, at_grid_edge=edge)
