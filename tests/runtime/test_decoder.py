"""The decode loop is lossless: greedy speculative output is token-identical to plain decoding and to
`transformers` generate, for every architecture, tree shape, prompt length and draft quality, with trees from a
draft, from prompt lookup or from both (hybrid, tests/runtime/test_hybrid.py), including generation that runs into the cache capacity; the target KV cache holds
exactly the committed context."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import ARCHITECTURES, OracleDraft, make_decoder
from hass_deploy.config import GenerationConfig, LookupConfig, SamplingConfig, TreeConfig
from hass_deploy.errors import CacheCapacityError, ConfigError, HassDeployError
from hass_deploy.runtime.backends.torch import TorchTarget
from hass_deploy.runtime.decoder import SpeculativeDecoder

TREES = {
    "chain": TreeConfig(tokens=5, depth=4, top_k=1),
    "wide": TreeConfig(tokens=12, depth=2, top_k=8),
    "deep": TreeConfig(tokens=16, depth=8, top_k=2),
    "two-nodes": TreeConfig(tokens=2, depth=3, top_k=3),
    "paper": TreeConfig(tokens=60, depth=6, top_k=10),
}


def prompt(length: int, seed: int, vocab: int = 95) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(tree: TreeConfig = TreeConfig(), max_new_tokens: int = 40, eos=(95,)) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, tree=tree, eos_token_ids=eos)


def hf_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_plain_greedy_matches_transformers(arch, targets, hf_models):
    for length in (1, 7, 30):
        ids = prompt(length, seed=length)
        result = make_decoder(targets[arch]).generate(ids, greedy(max_new_tokens=24, eos=()))
        assert result.output_ids == hf_greedy(hf_models[arch], ids, 24)
        assert result.stop_reason == "max_new_tokens"


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("shape", TREES)
def test_speculative_greedy_is_token_identical(arch, shape, targets, random_drafts, hf_models):
    target, tree = targets[arch], TREES[shape]
    for length in (3, 21):
        ids = prompt(length, seed=100 + length)
        plain = make_decoder(target).generate(ids, greedy(tree, eos=()))
        random_draft = make_decoder(target, random_drafts[arch]).generate(ids, greedy(tree, eos=()))
        oracle = make_decoder(target, OracleDraft(target, ids[0], 256 + tree.draft_rows, noise=0.3, seed=length))
        guided = oracle.generate(ids, greedy(tree, eos=()))
        assert random_draft.output_ids == plain.output_ids
        assert guided.output_ids == plain.output_ids
        assert plain.output_ids == hf_greedy(hf_models[arch], ids, 40)
        if tree.tokens > 2 and tree.depth > 1:
            assert max(guided.accept_lengths) >= 2, "the noisy oracle should get multi-token acceptances"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_runs_into_cache_capacity(arch, targets, random_drafts):
    """With S_max rows the target can emit S_max - P + 1 tokens; speculative decoding shrinks its last trees."""
    target, tree, max_len = targets[arch], TreeConfig(tokens=8, depth=4, top_k=3), 29
    ids = prompt(9, seed=3)
    config = greedy(tree, max_new_tokens=500, eos=())
    plain = make_decoder(target, max_len=max_len).generate(ids, config)
    oracle = OracleDraft(target, ids[0], max_len + tree.draft_rows, noise=0.0)
    spec = make_decoder(target, oracle, max_len=max_len).generate(ids, config)
    spec_random = make_decoder(target, random_drafts[arch], max_len=max_len).generate(ids, config)
    assert len(plain.output_ids) == max_len - len(ids) + 1
    assert spec.output_ids == plain.output_ids == spec_random.output_ids
    assert spec.stop_reason == plain.stop_reason == "cache_full"
    assert min(spec.accept_lengths[:-1]) >= 1  # a perfect draft's first proposal is always accepted


@pytest.mark.parametrize("shape", ["chain", "wide", "paper"])  # a chain reaches the deepest level every round
def test_tree_built_on_the_device_decodes_like_the_host_build(shape, targets, random_drafts):
    """A GPU builds the draft's tree without a host read (`tree.build_tree_on_device`): forced here on the CPU, the
    same tokens and the same acceptances as the host build, greedy and sampled (equal trees draw equal numbers)."""
    target, tree = targets["llama"], TREES[shape]
    ids = prompt(13, seed=5)
    sampled = GenerationConfig(max_new_tokens=40, tree=tree, eos_token_ids=(), seed=3,
                               sampling=SamplingConfig(temperature=0.8, top_p=0.9))
    # A fresh oracle per decoder (its noise has a random state); the perfect one reaches the deepest level.
    drafts = [lambda: random_drafts["llama"]] + [
        lambda noise=noise: OracleDraft(target, ids[0], 256 + tree.draft_rows, noise=noise, seed=2)
        for noise in (0.0, 0.3)]
    for draft in drafts:
        for config in (greedy(tree, eos=()), sampled):
            host = make_decoder(target, draft())
            on_device = make_decoder(target, draft())
            on_device.tree_on_device = True
            expected, result = host.generate(ids, config), on_device.generate(ids, config)
            assert result.output_ids == expected.output_ids
            assert result.accept_lengths == expected.accept_lengths
            # Every row the target computed, stale tree rows included, so a tree that differs anywhere shows here.
            assert torch.equal(on_device.target.kv.storage, host.target.kv.storage)


def test_perfect_draft_accepts_full_depth(targets):
    target, tree = targets["llama"], TreeConfig(tokens=6, depth=5, top_k=1)
    ids = prompt(5, seed=9)
    oracle = OracleDraft(target, ids[0], 256 + tree.draft_rows)
    result = make_decoder(target, oracle).generate(ids, greedy(tree, max_new_tokens=31, eos=()))
    assert result.accept_lengths[:5] == [5] * 5  # every round accepts depth tokens + 1 bonus
    assert result.tau == pytest.approx(sum(a + 1 for a in result.accept_lengths) / result.rounds)
    assert result.depth_acceptance[0] == 1.0


def test_eos_and_budget_truncate_like_plain_decoding(targets, random_drafts):
    target = targets["qwen2"]
    ids = prompt(6, seed=11)
    plain = make_decoder(target).generate(ids, greedy(max_new_tokens=30, eos=()))
    eos = plain.output_ids[7]  # pretend a token in the middle is EOS
    tree = TreeConfig(tokens=8, depth=4, top_k=2)
    oracle = OracleDraft(target, ids[0], 256 + tree.draft_rows)
    stopped = make_decoder(target, oracle).generate(ids, greedy(tree, max_new_tokens=30, eos=(eos,)))
    first = plain.output_ids.index(eos)
    assert stopped.output_ids == plain.output_ids[: first + 1] and stopped.stop_reason == "eos"
    for budget in (1, 2, 5, 13):
        cut = make_decoder(target, OracleDraft(target, ids[0], 256 + tree.draft_rows)).generate(
            ids, greedy(tree, max_new_tokens=budget, eos=()))
        assert cut.output_ids == plain.output_ids[:budget]


class CheckedTarget(TorchTarget):
    """Checks the KV invariant at every step: rows [0, cache_len) equal a fresh prefill of the committed tokens."""

    def __init__(self, module, max_len, prompt_ids, emitted):
        super().__init__(module, max_len)
        self.prompt_ids, self.emitted, self.checks = prompt_ids, emitted, 0

    def step(self, input_ids, position_ids, cache_len, tree_mask, last_only=False):
        if cache_len > 0:
            committed = (self.prompt_ids + self.emitted)[:cache_len]
            reference = TorchTarget(self.module, cache_len)
            reference.step(torch.tensor([committed]), torch.arange(cache_len)[None], 0, None)
            keys, values = self.kv.rows_in_use(cache_len)
            ref_keys, ref_values = reference.kv.rows_in_use(cache_len)
            torch.testing.assert_close(keys, ref_keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values, ref_values, atol=1e-5, rtol=1e-5)
            self.checks += 1
        return super().step(input_ids, position_ids, cache_len, tree_mask, last_only)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_kv_cache_holds_exactly_the_committed_context(arch, targets):
    target, tree = targets[arch], TreeConfig(tokens=10, depth=4, top_k=3)
    ids = prompt(8, seed=5)
    emitted: list[int] = []
    backend = CheckedTarget(target.module, 128, ids, emitted)
    from hass_deploy.runtime.decoder import SpeculativeDecoder

    decoder = SpeculativeDecoder(backend, OracleDraft(target, ids[0], 128 + tree.draft_rows, noise=0.3))
    result = decoder.generate(ids, greedy(tree, max_new_tokens=30, eos=()), on_tokens=emitted.extend)
    assert backend.checks == result.rounds
    assert any(a > 0 for a in result.accept_lengths)


def test_bad_requests_are_one_line_errors(targets):
    decoder = make_decoder(targets["llama"], max_len=16)
    with pytest.raises(HassDeployError, match="empty prompt"):
        decoder.generate([], greedy())
    with pytest.raises(CacheCapacityError, match="longer than the KV cache"):
        decoder.generate(list(range(17)), greedy())
    with pytest.raises(HassDeployError, match="outside the vocabulary"):
        decoder.generate([1, 2, 96], greedy())


LOOKUPS = {
    "default": LookupConfig(),
    "chain": LookupConfig(tokens=8, depth=7, max_ngram=4, min_ngram=2, branches=1),
    "wide": LookupConfig(tokens=12, depth=2, max_ngram=2, branches=8),
    "two-nodes": LookupConfig(tokens=2, depth=1),
}


def repetitive_prompt(seed: int) -> list[int]:
    """A phrase said three times: lookup proposes from the prompt at once, and the tiny random targets' greedy
    outputs fall into loops that lookup then copies."""
    return prompt(7, seed=seed) * 3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lookup_greedy_is_token_identical(arch, targets, hf_models):
    target = targets[arch]
    ids = repetitive_prompt(seed=5)
    plain = make_decoder(target).generate(ids, greedy(max_new_tokens=48, eos=()))
    assert plain.output_ids == hf_greedy(hf_models[arch], ids, 48)
    longest = 0
    for name, lookup in LOOKUPS.items():
        config = replace(greedy(max_new_tokens=48, eos=()), lookup=lookup)
        alone = make_decoder(target).generate(ids, config)
        assert alone.output_ids == plain.output_ids, name
        assert alone.draft_rounds == 0
        assert sum(alone.accept_lengths) > 0, f"{name}: lookup should propose and get tokens accepted"
        assert max(alone.accept_lengths) <= min(lookup.depth, lookup.tokens - 1)
        # The first token comes from the prefill, each round adds accepted + 1 (the last one cut at the budget).
        rounds = [a + 1 for a in alone.accept_lengths]
        assert 1 + sum(rounds[:-1]) < len(alone.output_ids) <= 1 + sum(rounds)
        longest = max(longest, max(alone.accept_lengths))
    assert longest >= 3, "some lookup tree should get a multi-token acceptance"


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])
def test_lookup_runs_into_cache_capacity(arch, targets):
    """Lookup trees shrink to the rows left, as draft trees do; the output is plain decoding's to the last row."""
    target, max_len = targets[arch], 40
    ids = repetitive_prompt(seed=3)
    config = replace(greedy(max_new_tokens=500, eos=()), lookup=LookupConfig(tokens=8, depth=7))
    plain = make_decoder(target, max_len=max_len).generate(ids, replace(config, lookup=None))
    spec = make_decoder(target, max_len=max_len).generate(ids, config)
    assert len(plain.output_ids) == max_len - len(ids) + 1
    assert spec.output_ids == plain.output_ids and spec.stop_reason == plain.stop_reason == "cache_full"
    assert sum(spec.accept_lengths) > 0


def test_lookup_statistics_are_the_loops_own(targets):
    """Accept lengths and per-depth acceptance come from the same bookkeeping as a draft's trees: a root-only
    round (no match) counts as a round with nothing tried."""
    target = targets["qwen2"]
    ids = repetitive_prompt(seed=8)
    result = make_decoder(target).generate(ids, replace(greedy(max_new_tokens=40, eos=()), lookup=LookupConfig()))
    assert result.tau == pytest.approx(sum(a + 1 for a in result.accept_lengths) / result.rounds)
    assert result.depth_attempts[0] <= result.rounds
    assert sum(result.depth_accepts) == sum(result.accept_lengths)
    for d in range(1, len(result.depth_attempts)):  # depth d is tried only after depth d - 1 was accepted
        assert result.depth_attempts[d] <= result.depth_accepts[d - 1]


def test_kv_cache_holds_exactly_the_committed_context_with_lookup(targets):
    target = targets["llama"]
    ids = repetitive_prompt(seed=5)
    emitted: list[int] = []
    backend = CheckedTarget(target.module, 128, ids, emitted)
    config = replace(greedy(max_new_tokens=30, eos=()), lookup=LookupConfig())
    result = SpeculativeDecoder(backend, None).generate(ids, config, on_tokens=emitted.extend)
    assert backend.checks == result.rounds
    assert any(a > 0 for a in result.accept_lengths)


def test_lookup_tree_larger_than_a_fixed_verify_budget_is_refused_before_any_step(targets):
    """A backend with a fixed tree budget (an export's `max_tree_tokens`) refuses a larger lookup tree up front."""
    target = targets["llama"]

    class BudgetedTarget(TorchTarget):
        max_tree_tokens = 4

        def step(self, *args, **kwargs):
            raise AssertionError("a step ran before the request was checked")

    decoder = SpeculativeDecoder(BudgetedTarget(target.module, 64), None)
    with pytest.raises(ConfigError, match="--lookup-tokens 8 .*tree budget \\(4\\)"):
        decoder.generate([1, 2, 3], replace(greedy(), lookup=LookupConfig(tokens=8)))


class RecordingTarget(TorchTarget):
    """A target that says whether its tree rows are plain decoding's (`TargetBackend.tree_rows_exact`; a quantised
    graph's are not) and counts the verify steps that were not chains (a row not seeing every row before it)."""

    def __init__(self, module, max_len, tree_rows_exact: bool):
        super().__init__(module, max_len)
        self.tree_rows_exact = tree_rows_exact
        self.steps = self.branched = 0

    def step(self, input_ids, position_ids, cache_len, tree_mask, last_only=False):
        if tree_mask is not None:
            steps = input_ids.shape[1]
            self.steps += 1
            self.branched += not torch.equal(tree_mask[0], torch.ones(steps, steps, dtype=torch.bool).tril())
        return super().step(input_ids, position_ids, cache_len, tree_mask, last_only)


def test_tree_config_as_a_chain():
    assert TreeConfig(tokens=60, depth=6, top_k=10).chain() == TreeConfig(tokens=7, depth=6, top_k=1)
    assert TreeConfig(tokens=4, depth=6, top_k=3).chain() == TreeConfig(tokens=4, depth=3, top_k=1)
    assert TreeConfig(tokens=1, depth=3, top_k=2).chain() == TreeConfig(tokens=1, depth=1, top_k=1)
    assert TREES["chain"].chain() == TREES["chain"]


@pytest.mark.parametrize("source", ["draft", "lookup", "hybrid"])
def test_a_target_with_inexact_tree_rows_verifies_chains_only(source, targets, random_drafts):
    """Every drafter's proposals reach such a target as chains (the draft's beam one wide, lookup one continuation
    per node, a hybrid round's best path), still accepted, still plain decoding's tokens."""
    from hass_deploy.config import HybridConfig

    target, tree = targets["llama"], TREES["wide"]
    ids = repetitive_prompt(seed=5)
    config = greedy(tree, max_new_tokens=48, eos=())
    plain = make_decoder(target).generate(ids, config).output_ids
    draft = None if source == "lookup" else OracleDraft(target, ids[0], 256 + tree.draft_rows, noise=0.3, seed=2)
    if source != "draft":
        config = replace(config, lookup=LOOKUPS["wide"], hybrid=HybridConfig(tokens=12, tokens_per_step=1.0))
    chains, trees = RecordingTarget(target.module, 256, False), RecordingTarget(target.module, 256, True)
    result = SpeculativeDecoder(chains, draft).generate(ids, config)
    assert result.output_ids == plain
    assert chains.steps == result.rounds and chains.branched == 0
    assert max(result.accept_lengths) >= 2
    if source == "hybrid":
        assert result.draft_rounds > 0
    # The same drafters on an exact target do branch, so the chains above are the target's doing.
    assert SpeculativeDecoder(trees, draft).generate(ids, config).output_ids == plain and trees.branched > 0
