"""Hybrid drafting (draft head + prompt lookup in one tree): the planner's calibration and draft decision without a
model, then the decode loop on tiny random targets: greedy output token-identical to plain decoding and to
`transformers` whatever the planner decides, the target's KV cache exactly the committed context, and the draft's
context passes contiguous and fed the target's own features across rounds in which it did not run."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from conftest import OracleDraft, make_decoder
from hass_deploy.config import GenerationConfig, HybridConfig, LookupConfig, TreeConfig
from hass_deploy.errors import ConfigError
from hass_deploy.runtime import hybrid
from hass_deploy.runtime.backends.torch import TorchDraft, TorchTarget
from hass_deploy.runtime.decoder import SpeculativeDecoder
from hass_deploy.runtime.hybrid import DRAFT, LOOKUP, HybridPlanner
from hass_deploy.runtime.tree import Candidates, merge_candidates
from runtime.test_decoder import CheckedTarget, hf_greedy, prompt

LOG = math.log


def chain(probabilities: list[float], first_token: int = 1) -> Candidates:
    """Candidates forming one chain under root 0 with these conditional probabilities."""
    scores, total = [0.0], 0.0
    for p in probabilities:
        total += LOG(p)
        scores.append(total)
    return Candidates([0] + list(range(first_token, first_token + len(probabilities))),
                      list(range(-1, len(probabilities))), scores)


# -------------------------------------------------------------------------------------------------------------
# The planner, without a model.

NOTHING = Candidates([0], [-1], [0.0])  # lookup found no match: the root alone


def test_a_new_planner_trusts_both_sources_half_and_tries_the_draft_where_lookup_is_unsure():
    planner = HybridPlanner(HybridConfig(draft_cost=0.5, row_cost=0.01, tokens_per_step=1.0))
    assert planner.factor(DRAFT) == planner.factor(LOOKUP) == hybrid.PRIOR_FACTOR
    assert planner.offsets() == pytest.approx([LOG(hybrid.PRIOR_FACTOR)] * 2)
    assert planner.rate == hybrid.PRIOR_RATE
    assert planner.tokens_per_step == 1.0  # the configured prior until the request's rounds say otherwise
    assert planner.wants_draft(NOTHING, 0, 100)  # 2 tokens expected for half a step
    assert planner.lookup_outlook(chain([1.0] * 7)) == pytest.approx((3.5, 0.5))  # each node 1 x 0.5
    # 0.5 * 2 = 1 token expected from the draft for half a step: worth it at 1 token a step, not at 3.
    assert planner.wants_draft(chain([1.0] * 7), 0, 100)
    lookup = chain([1.0] * 4)
    merged = merge_candidates([NOTHING, lookup], [0.0, 0.0], num_nodes=5)
    for _ in range(80):  # lookup alone got its 4 tokens accepted every round, plus the bonus: 5 tokens a step
        planner.record(merged, (0, 1, 2, 3, 4), lookup, draft_ran=False)
    assert planner.tokens_per_step == pytest.approx((10 * 5 + hybrid.PRIOR_ROUNDS * 1.0) / (10 + hybrid.PRIOR_ROUNDS),
                                                    rel=1e-3)
    planner.expected, planner.accepted = [0.0, 0.0], [0.0, 0.0]  # the calibration back at its prior
    assert not planner.wants_draft(chain([1.0] * 7), 0, 100)


def test_calibration_follows_what_each_source_gets_accepted():
    planner = HybridPlanner(HybridConfig())
    draft, lookup = chain([0.9, 0.9], first_token=1), chain([0.5, 0.5, 0.5], first_token=5)
    merged = merge_candidates([draft, lookup], [0.0, 0.0], num_nodes=6)
    assert merged.tokens == [0, 1, 2, 5, 6, 7]
    for _ in range(30):  # the draft's chain is always rejected at once; lookup's always accepted whole
        planner.record(merged, (0, 3, 4, 5), lookup, draft_ran=True)
    assert planner.factor(DRAFT) < 0.05 and planner.factor(LOOKUP) > 3.0
    assert planner.offsets()[DRAFT] < LOG(0.05) < LOG(3.0) < planner.offsets()[LOOKUP]
    assert not planner.wants_draft(lookup, 0, 100)  # lookup's first guess is always right: nothing left to add
    # The rerank now prefers lookup's nodes: with 3 nodes, both of them go to lookup's chain.
    assert merge_candidates([draft, lookup], planner.offsets(), num_nodes=3).tokens == [0, 5, 6]


def test_the_draft_rate_counts_only_tokens_lookup_did_not_propose():
    draft, lookup = chain([0.9, 0.9], first_token=1), chain([0.5], first_token=1)  # both propose token 1 first
    merged = merge_candidates([draft, lookup], [0.0, 0.0], num_nodes=4)
    assert merged.sources == [0, 0b11, 0b01]
    shared = HybridPlanner(HybridConfig())
    for _ in range(30):  # only the shared node accepted: the draft added nothing lookup did not propose
        shared.record(merged, (0, 1), lookup, draft_ran=True)
    assert shared.added == 0 and shared.rate < 0.5 * hybrid.PRIOR_RATE
    own = HybridPlanner(HybridConfig())
    for _ in range(30):  # the draft's own second token accepted too
        own.record(merged, (0, 1, 2), lookup, draft_ran=True)
    assert own.added > 5 and own.rate > hybrid.PRIOR_RATE


def test_rounds_without_the_draft_leave_its_calibration_alone_and_fade_its_evidence():
    planner = HybridPlanner(HybridConfig())
    planner.missed, planner.added = 10.0, 0.0  # evidence that the draft adds nothing
    lookup = chain([0.5, 0.5])
    merged = merge_candidates([NOTHING, lookup], [0.0, 0.0], num_nodes=4)
    for _ in range(60):
        planner.record(merged, (0,), lookup, draft_ran=False)
    assert planner.factor(DRAFT) == hybrid.PRIOR_FACTOR
    assert planner.factor(LOOKUP) < hybrid.PRIOR_FACTOR  # lookup's nodes were rejected
    assert planner.rate == pytest.approx(hybrid.PRIOR_RATE, rel=0.05)  # old evidence faded: worth trying again


@pytest.mark.parametrize("probability", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("cost", [0.0, 0.5, 100.0])
@pytest.mark.parametrize("tokens_a_round", [0, 1, 4])  # the request's history: 1, 2, 5 tokens a step
def test_the_draft_runs_when_its_tokens_per_step_beat_the_requests(probability, cost, tokens_a_round):
    """The draft's expected extra tokens over its cost against the request's own tokens per verify step: the rule
    that raises a ratio (tokens over time), whatever lookup would give this round."""
    planner = HybridPlanner(HybridConfig(draft_cost=cost))
    lookup = chain([1.0] * 5)
    merged = merge_candidates([NOTHING, lookup], [0.0, 0.0], num_nodes=6)
    for _ in range(200):
        planner.record(merged, tuple(range(tokens_a_round + 1)), lookup, draft_ran=False)
    planner.expected, planner.accepted = [0.0, 0.0], [0.0, 0.0]  # the calibration back at its prior
    rate = planner.tokens_per_step  # decayed sums worth 10 rounds, and the prior's PRIOR_ROUNDS
    prior = hybrid.PRIOR_ROUNDS * planner.config.tokens_per_step
    assert rate == pytest.approx((10 * (tokens_a_round + 1) + prior) / (10 + hybrid.PRIOR_ROUNDS), rel=1e-6)
    found = chain([probability, 1.0])
    expected, first = planner.lookup_outlook(found)
    assert first == pytest.approx(hybrid.PRIOR_FACTOR * probability)
    assert planner.wants_draft(found, 0, 100) == ((1 - first) * hybrid.PRIOR_RATE > cost * rate)
    assert planner.wants_draft(NOTHING, 0, 100) == (hybrid.PRIOR_RATE > cost * rate)


def test_the_requests_tokens_per_step_include_what_the_draft_cost():
    planner = HybridPlanner(HybridConfig(draft_cost=0.5, row_cost=0.01))
    merged = merge_candidates([chain([0.9]), NOTHING], [0.0, 0.0], num_nodes=2)
    for _ in range(200):  # 2 tokens a round; each round the verify step, the draft and 100 rows: 2.5 steps
        assert planner.wants_draft(NOTHING, 100, 10_000)
        planner.record(merged, (0, 1), NOTHING, draft_ran=True, catch_up=100)
    prior = hybrid.PRIOR_ROUNDS * planner.config.tokens_per_step
    assert planner.tokens_per_step == pytest.approx((10 * 2 + prior) / (10 * 2.5 + hybrid.PRIOR_ROUNDS), rel=1e-6)


def test_catching_up_on_skipped_rows_is_spread_over_the_draft_rounds_left():
    """1.5 verify steps of catch-up (150 rows at 0.01) against 2 tokens expected where lookup has nothing, for a
    request at 1 token a step: worth it with 100 tokens left (1.5 over 50 draft rounds), not with 1 token left; with
    nothing to catch up, worth it either way. A draft that has been running in one round of ten pays most of it."""
    planner = HybridPlanner(HybridConfig(draft_cost=0.5, row_cost=0.01, tokens_per_step=1.0))
    assert planner.wants_draft(NOTHING, 150, 100) and not planner.wants_draft(NOTHING, 150, 1)
    assert planner.wants_draft(NOTHING, 0, 1)
    # The bound exactly: 2 > 0.5 + 0.01 * rows / draft rounds left; a new request's share is 1/2, so the draft
    # rounds left are tokens left / (E_n + 1) / 2 = tokens left / 2, and at least one.
    assert planner.wants_draft(NOTHING, 149, 1) and not planner.wants_draft(NOTHING, 151, 1)
    assert planner.wants_draft(NOTHING, 299, 4) and not planner.wants_draft(NOTHING, 301, 4)
    rare = HybridPlanner(HybridConfig(draft_cost=0.5, row_cost=0.01, tokens_per_step=1.0))
    merged = merge_candidates([NOTHING, NOTHING], [0.0, 0.0], num_nodes=1)
    for round_ in range(100):  # the draft ran in every tenth round
        rare.record(merged, (0,), NOTHING, draft_ran=round_ % 10 == 9)
    assert planner.wants_draft(NOTHING, 150, 10) and not rare.wants_draft(NOTHING, 150, 10)


def test_calibration_stays_defined_over_very_long_requests():
    """The decayed sums underflow to zero after thousands of empty rounds; the prior keeps the factor defined."""
    planner = HybridPlanner(HybridConfig())
    empty = merge_candidates([NOTHING] * 2, [0.0, 0.0], num_nodes=1)
    for _ in range(10_000):
        planner.record(empty, (0,), NOTHING, draft_ran=True)
    assert planner.factor(DRAFT) == planner.factor(LOOKUP) == pytest.approx(hybrid.PRIOR_FACTOR)
    assert planner.rate > 0


# -------------------------------------------------------------------------------------------------------------
# The decode loop.

# A bar of 1 token a step (plain decoding's) so that the draft runs on these short, repetitive requests; with the
# default bar of 3, lookup's chains on them keep it off (tested above, without a model).
HYBRIDS = {
    "low bar": HybridConfig(tokens_per_step=1.0),
    "free draft": HybridConfig(tokens=10, draft_cost=0.0),
    "costly draft": HybridConfig(tokens=6, draft_cost=100.0),
    "two nodes": HybridConfig(tokens=2, tokens_per_step=1.0),
}
TREE = TreeConfig(tokens=8, depth=4, top_k=3)


def repetitive_prompt(seed: int) -> list[int]:
    return prompt(7, seed=seed) * 3


class CheckedDraft(TorchDraft):
    """Checks every context pass of the draft: it starts where the previous one ended, feeds the committed tokens
    x_{t+1} at rows t, and the target's own features f_t (a full forward of the committed sequence)."""

    def __init__(self, head, target, max_len, prompt_ids, emitted):
        super().__init__(head, target.module.lm_head, max_len)
        self.target, self.prompt_ids, self.emitted = target, prompt_ids, emitted
        self.next_row, self.passes = 0, []

    def step(self, features, input_ids, position_ids, cache_len, tree_mask, top_k):
        if tree_mask is None:  # a context pass over committed pairs
            rows = input_ids.shape[1]
            sequence = self.prompt_ids + self.emitted
            assert cache_len == self.next_row, "a context pass must continue exactly where the last one ended"
            assert input_ids[0].tolist() == sequence[cache_len + 1:cache_len + 1 + rows]
            with torch.no_grad():
                hidden = self.target.module(torch.tensor([sequence[:cache_len + rows]]),
                                            torch.arange(cache_len + rows)[None])
            torch.testing.assert_close(features, hidden[:, cache_len:], atol=1e-4, rtol=1e-4)
            self.next_row = cache_len + rows
            self.passes.append(rows)
        return super().step(features, input_ids, position_ids, cache_len, tree_mask, top_k)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("name", HYBRIDS)
def test_hybrid_greedy_is_token_identical(arch, name, targets, random_drafts, hf_models):
    target, settings = targets[arch], HYBRIDS[name]
    ids = repetitive_prompt(seed=5)
    config = GenerationConfig(max_new_tokens=48, tree=TREE, lookup=LookupConfig(), hybrid=settings)
    plain = make_decoder(target).generate(ids, replace(config, lookup=None))
    assert plain.output_ids == hf_greedy(hf_models[arch], ids, 48)
    for draft in (random_drafts[arch], OracleDraft(target, ids[0], 256 + TREE.draft_rows, noise=0.3, seed=2)):
        result = make_decoder(target, draft).generate(ids, config)
        assert result.output_ids == plain.output_ids, name
        assert result.draft_rounds <= result.rounds and (result.draft_rounds == 0) == (name == "costly draft")
        assert max(result.accept_lengths) <= settings.tokens - 1
        assert all(drafted <= settings.tokens - 1 for drafted in result.draft_lengths)


@pytest.mark.parametrize("pattern", ["planner", "every third round", "alternate"])
def test_rounds_without_the_draft_keep_both_caches_exact(pattern, targets, random_drafts, monkeypatch):
    """Whatever rounds the draft skips, its next context pass must take every committed pair since its last one
    (contiguous rows, the committed tokens, the target's features), and the target's cache stays exact."""
    if pattern != "planner":  # force the decisions, to reach every bookkeeping path whatever the policy would do
        period = 3 if pattern == "every third round" else 2
        rounds = iter(range(10_000))
        monkeypatch.setattr(HybridPlanner, "wants_draft", lambda self, *args: next(rounds) % period == 0)
    target = targets["llama"]
    ids = repetitive_prompt(seed=5)
    emitted: list[int] = []
    backend = CheckedTarget(target.module, 128, ids, emitted)
    draft = CheckedDraft(random_drafts["llama"], target, 128 + TREE.draft_rows, ids, emitted)
    config = GenerationConfig(max_new_tokens=96, tree=TREE, lookup=LookupConfig(), eos_token_ids=(),
                              hybrid=HYBRIDS["low bar"])
    result = SpeculativeDecoder(backend, draft).generate(ids, config, on_tokens=emitted.extend)
    assert backend.checks == result.rounds
    assert len(draft.passes) == result.draft_rounds
    if pattern == "planner":  # lookup soon proposes long chains on this prompt, and a random draft is not worth it
        assert 1 <= result.draft_rounds < result.rounds
    else:
        assert result.draft_rounds == len(range(0, result.rounds, period)) >= 3
        assert any(rows > 1 + max(result.accept_lengths) for rows in draft.passes[1:]), "passes after skips"


def test_hybrid_runs_into_cache_capacity(targets, random_drafts):
    target, max_len = targets["mistral"], 40
    ids = repetitive_prompt(seed=3)
    config = GenerationConfig(max_new_tokens=500, tree=TREE, lookup=LookupConfig(), eos_token_ids=())
    plain = make_decoder(target, max_len=max_len).generate(ids, replace(config, lookup=None))
    spec = make_decoder(target, random_drafts["mistral"], max_len=max_len).generate(ids, config)
    assert spec.output_ids == plain.output_ids and spec.stop_reason == plain.stop_reason == "cache_full"


def test_hybrid_with_no_room_for_a_tree_from_the_first_round(targets, random_drafts):
    """A prompt one row short of the cache: the rounds are root-only, and the planner learns nothing from them."""
    target, max_len = targets["llama"], 24
    ids = prompt(max_len - 1, seed=4)
    config = GenerationConfig(max_new_tokens=10, tree=TREE, lookup=LookupConfig(), eos_token_ids=())
    plain = make_decoder(target, max_len=max_len).generate(ids, replace(config, lookup=None))
    spec = make_decoder(target, random_drafts["llama"], max_len=max_len).generate(ids, config)
    assert spec.output_ids == plain.output_ids and spec.stop_reason == "cache_full" and spec.draft_rounds == 0


def test_hybrid_tree_larger_than_a_fixed_verify_budget_is_refused_before_any_step(targets, random_drafts):
    target = targets["llama"]

    class BudgetedTarget(TorchTarget):
        max_tree_tokens = 8

        def step(self, *args, **kwargs):
            raise AssertionError("a step ran before the request was checked")

    decoder = SpeculativeDecoder(BudgetedTarget(target.module, 64),
                                 TorchDraft(random_drafts["llama"], target.module.lm_head, 64 + TREE.draft_rows))
    config = GenerationConfig(tree=TREE, lookup=LookupConfig(), hybrid=HybridConfig(tokens=12))
    with pytest.raises(ConfigError, match="--hybrid-tokens 12 .*tree budget \\(8\\)"):
        decoder.generate([1, 2, 3], config)
