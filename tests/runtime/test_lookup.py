"""Tests for hass_deploy.runtime.lookup, without a model: the n-gram cache's counts and best-follower lists (hand
worked, and over random histories against a brute-force rescan of the history), best-first tree growth (hand
worked, and against a brute-force specification), limits (budget, depth, branches, work per proposal), the static
corpus, and the export tree-budget check."""

import heapq
import math
import random

import numpy
import pytest
import torch

from runtime.test_tree import _assert_consistent
from hass_deploy.config import GenerationConfig, HybridConfig, LookupConfig
from hass_deploy.errors import ConfigError, HassDeployError
from hass_deploy.runtime.lookup import NgramCache, PromptLookup, check_tree_budget


def lookup_of(history: list[int], corpus: NgramCache | None = None, **config) -> PromptLookup:
    lookup = PromptLookup(LookupConfig(**config), corpus=corpus)
    lookup.extend(history)
    return lookup


def tree_lists(tree) -> tuple[list[int], list[int]]:
    return tree.tokens.tolist(), tree.parents.tolist()


# -------------------------------------------------------------------------------------------------------------
# The cache.

def test_counts_rank_followers_by_frequency_then_recency():
    cache = NgramCache(1, 2, branches=4)
    cache.extend([5, 1, 5, 2, 5, 1, 5, 3, 5])  # 5 was followed by 1, 2, 1, 3
    assert cache.totals[(5,)] == 4 and cache.followers[(5,)] == {1: [2, 5], 2: [1, 3], 3: [1, 7]}
    assert cache.best[(5,)] == [1, 3, 2]  # 1 twice; 3 and 2 once each, 3 the more recent
    assert cache.continuations([9, 5]) == [(1, 0.5), (3, 0.25), (2, 0.25)]  # (9, 5) never occurred: back to (5,)
    assert cache.continuations([2, 5]) == [(1, 1.0)]  # (2, 5) occurred once, followed by 1
    assert cache.continuations([7]) == []
    assert (5,) not in NgramCache(2, 2, 4).followers  # n below min_ngram is not counted


def test_the_newest_follower_passes_older_ones_with_the_same_count_and_branches_cap_the_list():
    cache = NgramCache(1, 1, branches=2)
    cache.extend([0, 1, 0, 2, 0, 3])
    assert cache.best[(0,)] == [3, 2]  # all seen once: the latest first, and only two kept
    cache.extend([0, 1])  # 1 twice now: first
    assert cache.best[(0,)] == [1, 3]
    assert cache.continuations([0]) == [(1, 0.5), (3, 0.25)]


def brute_force_continuations(history: list[int], context: list[int], config: LookupConfig) -> list[tuple[int, float]]:
    """The specification: rescan the whole history for the longest n-gram of the context with a follower."""
    for n in range(min(config.max_ngram, len(context)), config.min_ngram - 1, -1):
        key = context[-n:]
        counts: dict[int, list[int]] = {}
        for start in range(len(history) - n):
            if history[start:start + n] == key:
                follower = history[start + n]
                counts.setdefault(follower, [0, 0])
                counts[follower][0] += 1
                counts[follower][1] = start + n
        if counts:
            total = sum(count for count, _ in counts.values())
            ranked = sorted(counts, key=lambda token: counts[token], reverse=True)[:config.branches]
            return [(token, counts[token][0] / total) for token in ranked]
    return []


def brute_force_candidates(history: list[int], root: int, budget: int, config: LookupConfig):
    """Best-first growth written the obvious way: every round, pick the highest path probability among all
    unexpanded children of the tree's nodes (ties: the child generated first)."""
    tokens, parents, scores, paths = [root], [-1], [0.0], [[]]
    frontier, order = [], 0

    def expand(node):
        nonlocal order
        if len(paths[node]) >= config.depth:
            return
        for token, estimate in brute_force_continuations(history, history + paths[node], config):
            order += 1
            frontier.append((scores[node] + math.log(estimate), -order, node, token))

    expand(0)
    while frontier and len(tokens) < budget:
        best = max(frontier)
        frontier.remove(best)
        score, _, parent, token = best
        tokens.append(token)
        parents.append(parent)
        scores.append(score)
        paths.append(paths[parent] + [token])
        expand(len(tokens) - 1)
    return tokens, parents, scores


@pytest.mark.parametrize("seed", range(12))
def test_random_histories_match_the_brute_force_specification(seed):
    rng = random.Random(seed)
    max_ngram = rng.choice([1, 2, 3, 4])
    config = LookupConfig(tokens=rng.choice([2, 4, 8, 12]), depth=rng.choice([1, 3, 5, 10]), max_ngram=max_ngram,
                          min_ngram=rng.randint(1, max_ngram), branches=rng.choice([1, 2, 4]))
    vocab = rng.choice([2, 3, 5, 12])  # small vocabularies: many matches, many shared prefixes
    history = [rng.randrange(vocab) for _ in range(rng.randint(1, 120))]
    lookup = lookup_of(history, **vars(config))
    for length in range(1, 6):  # the contexts deeper nodes see: the history plus drafted tokens
        context = history + [rng.randrange(vocab) for _ in range(length - 1)]
        assert lookup.cache.continuations(context) == brute_force_continuations(history, context, config)
    for budget in (1, 2, config.tokens):
        found = lookup.candidates(history[-1], budget)
        tokens, parents, scores = brute_force_candidates(history, history[-1], budget, config)
        assert (found.tokens, found.parents) == (tokens, parents)
        assert found.scores == pytest.approx(scores)
        tree = lookup.propose(history[-1], budget)
        _assert_consistent(tree)
        assert tree.num_nodes <= budget and tree.max_depth <= config.depth
        children = {}
        for node in range(1, tree.num_nodes):  # siblings distinct
            key = (found.parents[node], found.tokens[node])
            assert key not in children
            children[key] = node


@pytest.mark.parametrize("seed", range(6))
def test_incremental_extend_equals_one_rebuild(seed):
    """Rounds commit a few tokens at a time, proposing in between; the cache then equals one built at once."""
    rng = random.Random(100 + seed)
    history = [rng.randrange(4) for _ in range(200)]
    config = LookupConfig(tokens=8, max_ngram=3, branches=2)
    incremental = PromptLookup(config)
    position = rng.randint(1, 20)
    incremental.extend(history[:position])
    while position < len(history):
        incremental.propose(history[position - 1], 8)
        step = rng.randint(1, 6)
        incremental.extend(history[position:position + step])
        position += step
    rebuilt = lookup_of(history, **vars(config))
    assert incremental.history == rebuilt.history == history
    for field in ("followers", "totals", "best"):
        assert getattr(incremental.cache, field) == getattr(rebuilt.cache, field)
    assert tree_lists(incremental.propose(history[-1], 8)) == tree_lists(rebuilt.propose(history[-1], 8))


def test_work_per_proposal_does_not_grow_with_the_followers():
    """A token followed by thousands of distinct tokens (a newline in a long file): its best list stays at
    `branches`, so a proposal reads that many followers, not thousands."""
    history = []
    for follower in range(1, 5001):
        history += [0, follower]
    lookup = lookup_of(history + [0], branches=3)
    assert len(lookup.cache.followers[(0,)]) == 5000 and lookup.cache.best[(0,)] == [5000, 4999, 4998]
    found = lookup.candidates(0, 4)
    assert found.tokens == [0, 5000, 4999, 4998]  # each seen once: the most recent first, 1/5000 each
    assert found.scores[1] == pytest.approx(math.log(1 / 5000))


# -------------------------------------------------------------------------------------------------------------
# Trees.

def test_a_confident_match_becomes_a_deep_chain():
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1]  # 1 was followed by 2 .. 9 1, once: every estimate is 1
    assert tree_lists(lookup_of(history).propose(1, 8)) == ([1, 2, 3, 4, 5, 6, 7, 8], [-1, 0, 1, 2, 3, 4, 5, 6])
    assert tree_lists(lookup_of(history, depth=3).propose(1, 8)) == ([1, 2, 3, 4], [-1, 0, 1, 2])
    assert tree_lists(lookup_of(history).propose(1, 3)) == ([1, 2, 3], [-1, 0, 1])
    assert lookup_of(history).propose(1, 1).num_nodes == 1


def test_an_uncertain_match_spends_the_budget_on_alternatives():
    # 4 was followed by 1 once and by 2 once (the more recent); 1 by 7, 2 by 8, and both of those by 3.
    found = lookup_of([4, 1, 7, 3, 4, 2, 8, 3, 4], max_ngram=1).candidates(4, 7)
    #          4
    #        /   \
    #       2     1        1/2 each: 2 first (more recent)
    #       |     |
    #       8     7        1/2: each certain after its parent
    #       |     |
    #       3     3
    assert found.tokens == [4, 2, 1, 8, 7, 3, 3] and found.parents == [-1, 0, 0, 1, 2, 3, 4]
    assert [math.exp(score) for score in found.scores] == pytest.approx([1] + [0.5] * 6)
    assert found.expected_accepted == pytest.approx(3.0)


def test_longest_ngram_first():
    # (7, 8) occurred once, followed by 9; the single token 8 occurred more often, followed by 6 twice.
    lookup = lookup_of([8, 6, 7, 8, 9, 5, 8, 6, 7, 8], max_ngram=2, depth=1)
    assert tree_lists(lookup.propose(8, 8)) == ([8, 9], [-1, 0])
    assert tree_lists(lookup_of([8, 6, 7, 8, 9, 5, 8, 6, 7, 8], max_ngram=1, depth=1).propose(8, 8)) == (
        [8, 6, 9], [-1, 0, 0])
    # Without 1-grams, a new 2-gram matches nothing: the root alone.
    assert tree_lists(lookup_of([7, 8, 9, 5, 8], min_ngram=2).propose(8, 8)) == ([8], [-1])


def test_no_match_is_the_root_alone():
    for history in ([9], [1, 2, 3], [4, 4, 5]):
        tree = lookup_of(history).propose(history[-1], 8)
        assert tree.num_nodes == 1 and tree.max_depth == 0
        assert tree_lists(tree) == ([history[-1]], [-1]) and tree.mask.tolist() == [[True]]


def test_propose_checks_its_inputs():
    lookup = lookup_of([1, 2, 1])
    with pytest.raises(ValueError, match="end with the pending root"):
        lookup.propose(2, 8)
    with pytest.raises(ValueError, match="end with the pending root"):
        PromptLookup().propose(1, 8)
    with pytest.raises(ValueError, match="budget"):
        lookup.propose(1, 0)


@pytest.mark.parametrize("fields, message", [
    (dict(tokens=0), "--lookup-tokens"), (dict(depth=0), "--lookup-depth"), (dict(branches=0), "--lookup-branches"),
    (dict(min_ngram=0), "n-gram"), (dict(min_ngram=3, max_ngram=2), "n-gram"),
])
def test_config_refuses_bad_sizes(fields, message):
    with pytest.raises(ConfigError, match=message):
        LookupConfig(**fields)


def test_tree_lives_on_the_requested_device_as_int64():
    lookup = PromptLookup(LookupConfig(), device="cpu")
    lookup.extend([1, 2, 1])
    tree = lookup.propose(1, 8)
    assert tree.tokens.device == torch.device("cpu") and tree.tokens.dtype == torch.int64
    assert tree.mask.dtype == torch.bool and tree_lists(tree) == ([1, 2] * 4, list(range(-1, 7)))  # 1 2 1 2 ... repeats


# -------------------------------------------------------------------------------------------------------------
# The static corpus.

def test_the_corpus_is_read_only_where_the_history_has_no_match(tmp_path):
    numpy.save(tmp_path / "ids.npy", numpy.array([3, 4, 5, 6, 9, 1], dtype=numpy.int32))
    corpus = NgramCache.from_file(tmp_path / "ids.npy", LookupConfig())
    assert corpus.tokens == [3, 4, 5, 6, 9, 1]
    assert tree_lists(lookup_of([7, 3], corpus=corpus).propose(3, 8)) == ([3, 4, 5, 6, 9, 1], [-1, 0, 1, 2, 3, 4])
    # The history's own match wins: 3 was followed by 2 in this generation.
    assert tree_lists(lookup_of([3, 2, 3], corpus=corpus, depth=1).propose(3, 8)) == ([3, 2], [-1, 0])
    (tmp_path / "ids.txt").write_text("3 4 5\n6 9 1\n")
    assert NgramCache.from_file(tmp_path / "ids.txt", LookupConfig()).followers == corpus.followers


@pytest.mark.parametrize("write, message", [
    (lambda path: None, "no such file"),
    (lambda path: path.write_text("1 2 x"), "not token ids"),
    (lambda path: numpy.save(path, numpy.zeros((2, 3), dtype=numpy.int64)), "1-D array"),
    (lambda path: numpy.save(path, numpy.array([0.5, 1.0])), "integer"),
    (lambda path: numpy.save(path, numpy.array([3, -1])), "non-negative"),
])
def test_a_bad_corpus_is_one_clear_error(tmp_path, write, message):
    path = tmp_path / ("ids.txt" if "token ids" in message else "ids.npy")
    write(path)
    with pytest.raises(HassDeployError, match=message):
        NgramCache.from_file(path, LookupConfig())


# -------------------------------------------------------------------------------------------------------------
# Exports fix the verify step's size.

def test_tree_budget_of_an_export_is_checked():
    lookup = GenerationConfig(lookup=LookupConfig(tokens=8), hybrid=HybridConfig(tokens=12))
    check_tree_budget(lookup, with_draft=True, tree_budget=None)  # no fixed budget (the torch backend)
    check_tree_budget(lookup, with_draft=False, tree_budget=8)
    check_tree_budget(GenerationConfig(hybrid=HybridConfig(tokens=12)), with_draft=True, tree_budget=8)  # no lookup
    with pytest.raises(ConfigError, match=r"--lookup-tokens 9 is more than the artifacts' tree budget \(8\)"):
        check_tree_budget(GenerationConfig(lookup=LookupConfig(tokens=9)), with_draft=False, tree_budget=8)
    with pytest.raises(ConfigError, match=r"--hybrid-tokens 12 is more than the artifacts' tree budget \(8\)"):
        check_tree_budget(lookup, with_draft=True, tree_budget=8)
