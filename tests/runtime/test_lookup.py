"""Tests for hass_deploy.runtime.lookup: hand-worked histories (most recent first, longest n-gram first, the
fallback to shorter n-grams, no match), the trie merge (shared prefixes once, distinct siblings, the budget), and
properties over random histories against a brute-force rescan of the history (what the index must equal)."""

import random

import pytest
import torch

from runtime.test_tree import _assert_consistent
from hass_deploy.config import LookupConfig
from hass_deploy.errors import ConfigError
from hass_deploy.runtime.lookup import RECENT_OCCURRENCES, PromptLookup, check_tree_budget, merge_continuations


def lookup_of(history: list[int], **config) -> PromptLookup:
    lookup = PromptLookup(LookupConfig(**config))
    lookup.extend(history)
    return lookup


def tree_lists(tree) -> tuple[list[int], list[int]]:
    return tree.tokens.tolist(), tree.parents.tolist()


def test_most_recent_occurrence_first():
    # Trailing 2-gram (1, 2) occurred twice before: followed by 4 1 2 (the most recent) and by 3 1 2 4 1.
    lookup = lookup_of([1, 2, 3, 1, 2, 4, 1, 2], depth=3)
    assert list(lookup.continuations(3)) == [[4, 1, 2], [3, 1, 2]]  # the 1-gram (2) gives the same two: not repeated
    tree = lookup.propose(2, 8)
    #       2
    #      / \
    #     4   3
    #     |   |
    #     1   1
    #     |   |
    #     2   2
    assert tree_lists(tree) == ([2, 4, 1, 2, 3, 1, 2], [-1, 0, 1, 2, 0, 4, 5])
    _assert_consistent(tree)


def test_longest_ngram_first_then_shorter_ones():
    # (7, 8) occurred once, followed by 9; the single token 8 occurred more recently, followed by 6. The 2-gram
    # match is proposed first although the 1-gram one is more recent.
    lookup = lookup_of([7, 8, 9, 5, 8, 6, 7, 8], depth=2)
    assert list(lookup.continuations(2)) == [[9, 5], [6, 7]]
    assert tree_lists(lookup.propose(8, 8)) == ([8, 9, 5, 6, 7], [-1, 0, 1, 0, 3])
    # Without 1-grams only the 2-gram match is left; with only 3-grams nothing matches (the root alone).
    assert tree_lists(lookup_of([7, 8, 9, 5, 8, 6, 7, 8], depth=2, min_ngram=2).propose(8, 8)) == ([8, 9, 5],
                                                                                                [-1, 0, 1])
    assert tree_lists(lookup_of([7, 8, 9, 5, 8, 6, 7, 8], min_ngram=3).propose(8, 8)) == ([8], [-1])


def test_fallback_to_a_single_token_when_longer_ngrams_never_occurred():
    lookup = lookup_of([3, 5, 6, 4, 5])  # (4, 5) and (6, 4, 5) are new; 5 was followed by 6 4 5
    assert tree_lists(lookup.propose(5, 8)) == ([5, 6, 4, 5], [-1, 0, 1, 2])


def test_no_match_is_the_root_alone():
    for history in ([9], [1, 2, 3], [4, 4, 5]):
        tree = lookup_of(history).propose(history[-1], 8)
        assert tree.num_nodes == 1 and tree.max_depth == 0
        assert tree_lists(tree) == ([history[-1]], [-1]) and tree.mask.tolist() == [[True]]


def test_merge_counts_shared_prefixes_once_and_keeps_siblings_distinct():
    #        0
    #       / \
    #      1   6
    #     / \
    #    2   5
    #   / \
    #  3   4
    tokens, parents = merge_continuations(0, [[1, 2, 3], [1, 2, 4], [1, 5], [6], [1, 2, 3]], budget=20)
    assert tokens == [0, 1, 2, 3, 4, 5, 6] and parents == [-1, 0, 1, 2, 2, 1, 0]


@pytest.mark.parametrize("budget, nodes", [(1, 1), (2, 2), (4, 4), (5, 5), (6, 6), (7, 7), (8, 7)])
def test_merge_stops_at_the_budget_and_reads_no_further(budget, nodes):
    def continuations():
        yield from ([1, 2, 3], [1, 2, 4], [1, 5], [6])
        if budget <= 7:
            raise AssertionError("read past a full tree")

    tokens, parents = merge_continuations(0, continuations(), budget)
    assert len(tokens) == len(parents) == nodes
    assert (tokens, parents) == ([0, 1, 2, 3, 4, 5, 6][:nodes], [-1, 0, 1, 2, 2, 1, 0][:nodes])


def test_depth_and_budget_bound_the_tree():
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1]  # 1 was followed by 2 .. 9 1
    assert lookup_of(history).propose(1, 8).max_depth == 5  # the default depth
    assert tree_lists(lookup_of(history, depth=3).propose(1, 8)) == ([1, 2, 3, 4], [-1, 0, 1, 2])
    assert tree_lists(lookup_of(history, depth=7).propose(1, 3)) == ([1, 2, 3], [-1, 0, 1])  # budget - 1 deep
    assert lookup_of(history).propose(1, 1).num_nodes == 1


def test_propose_checks_its_inputs():
    lookup = lookup_of([1, 2, 1])
    with pytest.raises(ValueError, match="end with the pending root"):
        lookup.propose(2, 8)
    with pytest.raises(ValueError, match="end with the pending root"):
        PromptLookup().propose(1, 8)
    with pytest.raises(ValueError, match="budget"):
        lookup.propose(1, 0)


@pytest.mark.parametrize("fields, message", [
    (dict(tokens=0), "--lookup-tokens"), (dict(depth=0), "--lookup-depth"),
    (dict(min_ngram=0), "n-gram"), (dict(min_ngram=3, max_ngram=2), "n-gram"),
])
def test_config_refuses_bad_sizes(fields, message):
    with pytest.raises(ConfigError, match=message):
        LookupConfig(**fields)


def reference_continuations(history: list[int], config: LookupConfig, depth: int) -> list[list[int]]:
    """The specification by brute force: rescan the whole history for each n-gram size (O(history) per n)."""
    out, seen = [], set()
    for n in range(min(config.max_ngram, len(history)), config.min_ngram - 1, -1):
        trailing = history[-n:]
        starts = [s for s in range(n, len(history)) if history[s - n:s] == trailing]
        for start in reversed(starts[-RECENT_OCCURRENCES:]):
            if start not in seen:
                seen.add(start)
                out.append(history[start:start + depth])
    return out


def reference_trie(continuations: list[list[int]], budget: int) -> list[tuple[int, ...]]:
    """The root-to-node token paths the merge must produce, in node order: every distinct prefix of the
    continuations in the order first proposed, until the budget."""
    paths: list[tuple[int, ...]] = [()]
    for continuation in continuations:
        for i in range(1, len(continuation) + 1):
            if tuple(continuation[:i]) not in paths:
                if len(paths) == budget:
                    return paths
                paths.append(tuple(continuation[:i]))
    return paths


@pytest.mark.parametrize("seed", range(12))
def test_random_histories_match_the_brute_force_specification(seed):
    rng = random.Random(seed)
    config = LookupConfig(tokens=rng.choice([2, 4, 8, 12]), depth=rng.choice([1, 3, 5, 7]),
                          max_ngram=rng.choice([1, 2, 3, 4]), min_ngram=1)
    config = LookupConfig(config.tokens, config.depth, config.max_ngram, rng.randint(1, config.max_ngram))
    vocab = rng.choice([2, 3, 5, 12])  # small vocabularies: many matches, many shared prefixes
    history = [rng.randrange(vocab) for _ in range(rng.randint(1, 120))]
    lookup = lookup_of(history, **vars(config))
    for budget in (1, 2, config.tokens):
        depth = min(config.depth, budget - 1)
        assert list(lookup.continuations(depth)) == reference_continuations(history, config, depth)
        tree = lookup.propose(history[-1], budget)
        _assert_consistent(tree)
        tokens = tree.tokens.tolist()
        assert tree.num_nodes <= budget and tree.max_depth <= depth
        paths = []
        for node in range(tree.num_nodes):
            path = [tokens[i] for i in tree.paths[node].tolist() if i >= 0][1:]
            paths.append(tuple(path))
        assert len(set(paths)) == len(paths)  # siblings distinct: no two nodes spell the same path
        # Node order is proposal order: the longest, most recent match's path first at every level.
        assert paths == reference_trie(reference_continuations(history, config, depth), budget)


@pytest.mark.parametrize("seed", range(6))
def test_incremental_extend_equals_one_rebuild(seed):
    """Rounds commit a few tokens at a time, proposing in between; the index then equals one built at once."""
    rng = random.Random(100 + seed)
    history = [rng.randrange(4) for _ in range(200)]
    config = LookupConfig(tokens=8, depth=5, max_ngram=3, min_ngram=1)
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
    assert incremental.followers == rebuilt.followers
    assert tree_lists(incremental.propose(history[-1], 8)) == tree_lists(rebuilt.propose(history[-1], 8))


def test_work_per_round_does_not_grow_with_the_history():
    """A history of one repeated token is the worst case: every n-gram occurred thousands of times. The index
    keeps the most recent occurrences only, so a proposal reads a bounded number of continuations."""
    config = LookupConfig(tokens=64, depth=7, max_ngram=3, min_ngram=1)
    lookup = lookup_of([7] * 20_000, **vars(config))
    assert max(len(starts) for starts in lookup.followers.values()) == RECENT_OCCURRENCES
    assert len(list(lookup.continuations(7))) == RECENT_OCCURRENCES  # the same positions for every n
    assert tree_lists(lookup.propose(7, 64)) == ([7] * 8, [-1, 0, 1, 2, 3, 4, 5, 6])  # one chain, depth 7


def test_tree_lives_on_the_requested_device_as_int64():
    lookup = PromptLookup(LookupConfig(), device="cpu")
    lookup.extend([1, 2, 1])
    tree = lookup.propose(1, 8)
    assert tree.tokens.device == torch.device("cpu") and tree.tokens.dtype == torch.int64
    assert tree.mask.dtype == torch.bool and tree_lists(tree) == ([1, 2, 1], [-1, 0, 1])


def test_tree_budget_of_an_export_is_checked():
    check_tree_budget(LookupConfig(tokens=8), None)  # no fixed budget (the torch backend)
    check_tree_budget(LookupConfig(tokens=8), 8)
    with pytest.raises(ConfigError, match=r"--lookup-tokens 9 is more than the artifacts' tree budget \(8\)"):
        check_tree_budget(LookupConfig(tokens=9), 8)
