"""Tests for hass_deploy.runtime.sampling: HF-exact warping, greedy acceptance, and lossless sampling acceptance."""

import functools
import itertools
import math
import random

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hass_deploy.config import LookupConfig, SamplingConfig
from hass_deploy.runtime import sampling
from hass_deploy.runtime.lookup import PromptLookup
from hass_deploy.runtime.sampling import (
    accept_greedy,
    accept_sampling,
    sample_token,
    target_probs,
    warp_logits,
)
from hass_deploy.runtime.tree import (Candidates, DraftTree, build_tree, merge_candidates, root_only, tree_from_lists,
                                     tree_from_parents)

P_VALUE_THRESHOLD = 1e-3


# --------------------------------------------------------------------------------------------------------------
# SamplingConfig and warping


@pytest.mark.parametrize("arguments", [
    {"temperature": -0.1},
    {"temperature": float("nan")},
    {"temperature": float("inf")},
    {"top_p": 0.0},
    {"top_p": 1.5},
    {"top_k": -1},
    {"top_k": 2.5},
])
def test_sampling_config_rejects_bad_values(arguments):
    with pytest.raises(ValueError):
        SamplingConfig(**arguments)


def test_sampling_config_greedy():
    assert SamplingConfig().greedy
    assert not SamplingConfig(temperature=0.7).greedy


def _hf_warpers(config: SamplingConfig) -> LogitsProcessorList:
    """The warper chain transformers' `generate` builds for do_sample=True, batch 1 beam."""
    warpers = LogitsProcessorList()
    if config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    return warpers


def _logits_with_ties(seed: int, rows: int, vocabulary: int) -> torch.Tensor:
    """Random logits rounded to a coarse grid so that many values tie, plus one all-equal row."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocabulary, generator=generator) * 2).round() / 2  # [rows, V]
    logits[0] = 1.0
    return logits


@pytest.mark.parametrize("temperature, top_k, top_p", list(itertools.product(
    [0.3, 1.0, 1.7], [0, 1, 3, 20, 64, 100], [1.0, 0.95, 0.5, 0.05],
)))
def test_warp_logits_equals_hf_warpers(temperature, top_k, top_p):
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    logits = _logits_with_ties(seed=top_k * 7 + int(top_p * 100), rows=8, vocabulary=64)
    expected = _hf_warpers(config)(torch.zeros(8, 1, dtype=torch.int64), logits.clone())
    warped = warp_logits(logits, config)
    assert warped.dtype == torch.float32
    assert torch.equal(warped, expected)


def test_warp_logits_any_leading_shape_and_dtype():
    config = SamplingConfig(temperature=0.6, top_k=5, top_p=0.8)
    logits = _logits_with_ties(seed=3, rows=6, vocabulary=16)
    flat = warp_logits(logits, config)  # [6, 16]
    assert torch.equal(warp_logits(logits.reshape(2, 3, 16), config), flat.reshape(2, 3, 16))
    assert torch.equal(warp_logits(logits[4], config), flat[4])
    # Half-precision logits are warped in float32, as HF's generate casts them first.
    half = logits.to(torch.bfloat16)
    expected = _hf_warpers(config)(torch.zeros(6, 1, dtype=torch.int64), half.float())
    assert torch.equal(warp_logits(half, config), expected)


def test_greedy_warp_keeps_only_the_first_argmax():
    logits = torch.tensor([[0.0, 2.0, -1.0, 2.0], [5.0, 1.0, 5.0, 5.0]])
    probs = target_probs(logits, SamplingConfig())
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_target_probs_are_normalised_with_exact_zeros():
    config = SamplingConfig(temperature=0.9, top_k=3)
    probs = target_probs(torch.randn(4, 10, generator=torch.Generator().manual_seed(5)), config)  # no ties
    assert probs.dtype == torch.float32
    assert torch.allclose(probs.sum(-1), torch.ones(4))
    assert (probs > 0).sum(-1).tolist() == [3, 3, 3, 3]


def test_sample_token_shapes_and_distribution():
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3])
    assert sample_token(probs, generator).shape == ()
    assert sample_token(probs.expand(2, 3, 4), generator).shape == (2, 3)
    draws = sample_token(probs.expand(20000, 4), generator)  # [20000]
    counts = torch.bincount(draws, minlength=4)
    assert counts[1] == 0
    kept = [0, 2, 3]
    assert _chi_square_p_value(counts[kept].double(), 20000 * probs[kept].double()) > P_VALUE_THRESHOLD


def test_chi_square_p_value_matches_known_quantiles():
    # Two bins of expectation 50, off by 9.8: statistic 3.8416, the 95% quantile of chi2 with 1 degree of freedom.
    two_bins = _chi_square_p_value(torch.tensor([59.8, 40.2], dtype=torch.float64),
                                   torch.tensor([50.0, 50.0], dtype=torch.float64))
    assert abs(two_bins - 0.05) < 1e-4
    # Five bins of expectation 100, two off by sqrt(663.8352): statistic 13.2767, the 99% quantile with 4.
    offset = 663.8352 ** 0.5
    five_bins = _chi_square_p_value(torch.tensor([100 + offset, 100 - offset, 100, 100, 100], dtype=torch.float64),
                                    torch.full((5,), 100.0, dtype=torch.float64))
    assert abs(five_bins - 0.01) < 1e-5


# --------------------------------------------------------------------------------------------------------------
# Greedy acceptance on a hand-drawn tree:      0 (50)
#                                            /      \
#                                       1 (11)      2 (12)
#                                        /   \          \
#                                   3 (13)  4 (14)     6 (16)
#                                     |
#                                   5 (15)

SEVEN = tree_from_parents(torch.tensor([50, 11, 12, 13, 14, 15, 16]), torch.tensor([-1, 0, 0, 1, 1, 3, 2]))


@pytest.mark.parametrize("target_tokens, path, tokens", [
    # The target wants 99 after the root: nothing accepted, 99 is the bonus.
    ([99, 11, 12, 13, 14, 15, 16], [0], [50, 99]),
    # 11 -> 13 -> 15 all agree: the full deepest path, bonus = target after node 5.
    ([11, 13, 0, 15, 0, 42, 0], [0, 1, 3, 5], [50, 11, 13, 15, 42]),
    # 11 agrees, then neither 13 nor 14 does; node 5 matching its parent's argmax does not count.
    ([11, 77, 0, 15, 0, 42, 0], [0, 1], [50, 11, 77]),
    # The second root branch: 12 -> 16, bonus 3.
    ([12, 0, 16, 0, 0, 0, 3], [0, 2, 6], [50, 12, 16, 3]),
    # Stop in the middle of a branch: 11 -> 14 (a leaf) with bonus 8.
    ([11, 14, 0, 0, 8, 0, 0], [0, 1, 4], [50, 11, 14, 8]),
])
def test_accept_greedy_golden(target_tokens, path, tokens):
    acceptance = accept_greedy(SEVEN, torch.tensor(target_tokens))
    assert acceptance.path.tolist() == path and list(acceptance.nodes) == path
    assert acceptance.path.dtype == torch.int64
    assert acceptance.tokens == tokens
    assert acceptance.accepted == len(path) - 1
    assert acceptance.bonus == tokens[-1]
    # The deepest accepted node's children (SEVEN's parents) decide whether the next depth was tried.
    assert acceptance.leaf == (path[-1] not in (0, 1, 2, 3))
    # Rows 0..a already in place: the root alone (path [0]) or a prefix of node ids; [0, 1, 3, 5] must move.
    assert acceptance.in_place == (path == list(range(len(path))))


def test_accept_greedy_root_only():
    acceptance = accept_greedy(root_only(torch.tensor(50)), torch.tensor([8]))
    assert acceptance.path.tolist() == [0] and acceptance.nodes == (0,)
    assert acceptance.tokens == [50, 8]
    assert acceptance.accepted == 0 and acceptance.bonus == 8
    assert acceptance.leaf and acceptance.in_place


def test_accept_sampling_reports_the_path_on_the_host():
    probs = torch.zeros(7, 100)
    probs[0, 11] = probs[1, 13] = probs[3, 15] = probs[5, 42] = 1.0  # one-hot: accepts 11 -> 13 -> 15
    for node in (2, 4, 6):
        probs[node, 0] = 1.0
    acceptance = accept_sampling(SEVEN, probs, torch.Generator().manual_seed(0))
    assert acceptance.nodes == (0, 1, 3, 5) and acceptance.path.tolist() == [0, 1, 3, 5]
    assert acceptance.leaf and not acceptance.in_place


def _random_tree(rng: random.Random, vocabulary: int) -> DraftTree:
    """A random tree with distinct sibling tokens, built through build_tree from a random pool."""
    parents: list[int] = []
    tokens: list[int] = []
    scores: list[float] = []
    for _ in range(rng.randint(0, 12)):
        index = len(parents)
        parent = rng.randint(-1, index - 1)
        used = {tokens[sibling] for sibling in range(index) if parents[sibling] == parent}
        free = [token for token in range(vocabulary) if token not in used]
        if not free:
            continue
        parents.append(parent)
        tokens.append(rng.choice(free))
        scores.append((0.0 if parent < 0 else scores[parent]) - rng.random())
    return build_tree(
        torch.tensor(rng.randrange(vocabulary)),
        torch.tensor(tokens, dtype=torch.int64),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(parents, dtype=torch.int64),
        rng.randint(1, 14),
    )


def test_accept_sampling_with_one_hot_targets_is_greedy():
    """With greedy (one-hot) target distributions, sampling acceptance must reproduce greedy acceptance exactly."""
    rng = random.Random(5)
    generator = torch.Generator().manual_seed(5)
    vocabulary = 5
    for _ in range(200):
        tree = _random_tree(rng, vocabulary)
        # Pick each node's argmax among a random token and the node's children, so long paths get accepted too.
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        target_tokens = torch.tensor([
            rng.choice([rng.randrange(vocabulary)] + [tokens[child] for child in range(tree.num_nodes)
                                                      if parents[child] == node])
            for node in range(tree.num_nodes)
        ])
        # What target_probs gives for a greedy config (test_greedy_warp_keeps_only_the_first_argmax).
        one_hot = torch.nn.functional.one_hot(target_tokens, vocabulary).float()  # [T, V]
        greedy = accept_greedy(tree, target_tokens)
        sampled = accept_sampling(tree, one_hot, generator)
        assert sampled.tokens == greedy.tokens
        assert torch.equal(sampled.path, greedy.path)


# --------------------------------------------------------------------------------------------------------------
# The per-node decision rule, with chosen uniforms.


def test_first_accepted_child_thresholds():
    decide = sampling._first_accepted_child
    # p = 0.5 then 0.3 of mass 1: first accepted iff u < 0.5; second iff u < 0.3 / 0.5 = 0.6.
    assert decide([0.5, 0.3], [0.49, 0.9], 1.0, 6) == 0
    assert decide([0.5, 0.3], [0.5, 0.59], 1.0, 6) == 1
    assert decide([0.5, 0.3], [0.5, 0.61], 1.0, 6) is None
    # Unnormalised rows: only ratios matter.
    assert decide([5.0, 3.0], [0.5, 0.59], 10.0, 6) == 1
    # A zero-probability child is rejected even by u = 0, and costs no mass.
    assert decide([0.0, 0.3], [0.0, 0.29], 1.0, 6) == 1
    assert decide([0.0], [0.0], 1.0, 6) is None
    assert decide([], [], 1.0, 6) is None


def test_first_accepted_child_takes_the_last_positive_token_without_rounding_loss():
    decide = sampling._first_accepted_child
    # Children hold all the mass; a rounded mass of 1 + 1e-7 would make the second ratio 0.9999998 and
    # u = 0.9999999 would reject it, leaving nothing to draw the bonus from. The exact ratio is 1.
    assert decide([0.5, 0.5], [0.9, 0.9999999], 1.0000001, 2) == 1
    assert decide([0.5, 0.0, 0.5], [0.9, 0.0, 0.9999999], 1.0000001, 2) == 2
    # Mass rounded below p(c) must not give a ratio above 1 either (no effect beyond "always accept").
    assert decide([0.5, 0.5], [0.9, 0.9999999], 0.9999999, 3) == 1


def test_accept_sampling_never_crashes_when_children_hold_all_mass():
    # top_k = 2 target with exactly its two tokens drafted: the walk must always accept one of them.
    config = SamplingConfig(temperature=1.3, top_k=2)
    generator = torch.Generator().manual_seed(11)
    logits = torch.tensor([[0.1, 2.0, 1.9, -1.0]]).expand(3, 4)
    tree = tree_from_parents(torch.tensor([0, 1, 2]), torch.tensor([-1, 0, 0]))
    probs = target_probs(logits, config)
    for _ in range(300):
        acceptance = accept_sampling(tree, probs, generator)
        assert acceptance.accepted == 1 and acceptance.bonus in (1, 2)


def test_accept_sampling_is_deterministic_given_the_seed():
    probs = torch.softmax(torch.randn(7, 20, generator=torch.Generator().manual_seed(1)), -1)
    tree = tree_from_parents(torch.tensor([0, 3, 4, 5, 6, 7, 8]), SEVEN.parents)

    def run(seed: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        return [accept_sampling(tree, probs, generator).tokens for _ in range(20)]

    assert run(3) == run(3)


# --------------------------------------------------------------------------------------------------------------
# Losslessness. An "oracle" target over a 6-token vocabulary: its next-token distribution after any prefix is a
# fixed (seeded) warped softmax, so the joint law of the tokens it would emit is known exactly. Each tree node gets
# the oracle's distribution after the tokens on its path (root excluded), as a verify pass would.

VOCABULARY = 6
ORACLE_CONFIG = SamplingConfig(temperature=0.8, top_k=4, top_p=0.95)  # ranks 4 and 5 get probability 0


@functools.lru_cache(maxsize=None)  # pure and called often; callers never modify the returned tensor
def _oracle(prefix: tuple[int, ...]) -> torch.Tensor:
    """[V] the target's warped next-token distribution after `prefix` (tokens after the root)."""
    seed = 1 + sum((token + 1) * VOCABULARY ** position for position, token in enumerate(prefix))
    logits = torch.randn(VOCABULARY, generator=torch.Generator().manual_seed(seed)) * 1.5
    return target_probs(logits, ORACLE_CONFIG)


def _ranked_tree(children: list[tuple[int, int]]) -> tuple[DraftTree, torch.Tensor]:
    """A tree given as (parent node, rank of the token under the parent's target distribution) per node.

    Returns:
        The tree (root token 0) and its [T, V] per-node target distributions.
    """
    prefixes: list[tuple[int, ...]] = [()]
    tokens, parents = [0], [-1]
    for parent, rank in children:
        ranking = torch.sort(_oracle(prefixes[parent]), descending=True, stable=True).indices
        token = ranking[rank].item()
        prefixes.append(prefixes[parent] + (token,))
        tokens.append(token)
        parents.append(parent)
    tree = tree_from_parents(torch.tensor(tokens), torch.tensor(parents))
    return tree, torch.stack([_oracle(prefix) for prefix in prefixes])


def _exact_pair_law() -> torch.Tensor:
    """[V, V] float64, P(first emitted token, second emitted token) under the oracle target."""
    first = _oracle(()).double()  # [V]
    second = torch.stack([_oracle((token,)).double() for token in range(VOCABULARY)])  # [V, V]
    return first[:, None] * second


def _emitted_pair_counts(tree: DraftTree, probs: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """[V, V] counts of the first two tokens emitted after the root, over independent rounds.

    When a round emits only one token (no draft accepted), the next one comes from the next round; the test
    draws it straight from the target there (that is the root-only case, which is itself tested for losslessness).
    """
    generator = torch.Generator().manual_seed(seed)
    pairs = [0] * (VOCABULARY * VOCABULARY)  # host counters: tensor updates would dominate the loop
    pending = [0] * VOCABULARY  # rounds that emitted only their first token
    for _ in range(draws):
        emitted = accept_sampling(tree, probs, generator).tokens
        if len(emitted) >= 3:
            pairs[emitted[1] * VOCABULARY + emitted[2]] += 1
        else:
            pending[emitted[1]] += 1
    counts = torch.tensor(pairs).reshape(VOCABULARY, VOCABULARY)
    for first, count in enumerate(pending):
        if count:
            seconds = torch.multinomial(_oracle((first,)), count, replacement=True, generator=generator)
            counts[first] += torch.bincount(seconds, minlength=VOCABULARY)
    return counts


def _chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square goodness-of-fit p-value, P(chi2_{k-1} >= statistic) for k bins.

    The chi-square survival function is the regularised upper incomplete gamma Q((k - 1) / 2, statistic / 2);
    torch has it, which spares the test scipy's import time.
    """
    statistic = ((observed - expected) ** 2 / expected).sum()
    degrees = torch.tensor((observed.numel() - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(degrees, statistic / 2).item()


def _pair_law_p_value(counts: torch.Tensor) -> float:
    """Chi-square p-value of the counts against the exact law; bins of expected count < 5 are pooled.

    Pairs of probability 0 must never appear: that is checked exactly.
    """
    law = _exact_pair_law().flatten()  # [V * V]
    expected = law / law.sum() * counts.sum()
    observed = counts.flatten().double()
    impossible = law == 0
    assert observed[impossible].sum() == 0, "emitted a pair the target gives probability 0"
    large = expected >= 5
    small = ~large & ~impossible
    observed_bins = torch.cat([observed[large], observed[small].sum().reshape(1)])
    expected_bins = torch.cat([expected[large], expected[small].sum().reshape(1)])
    if expected_bins[-1] == 0:  # nothing to pool
        observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
    return _chi_square_p_value(observed_bins, expected_bins)


TREE_SHAPES = {
    # A good draft: the likeliest tokens, three levels, several branches.
    "bushy": [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (4, 0), (4, 1), (6, 0)],
    # The same candidates with siblings in another order (§7 item 12: order must not change the law).
    "reordered": [(0, 2), (0, 0), (0, 1), (2, 1), (2, 0), (3, 0), (5, 1), (5, 0), (6, 0)],
    # A bad draft: root children the target gives probability 0 (ranks 4, 5) or little (3), then a good branch.
    "unlikely": [(0, 5), (0, 4), (0, 3), (3, 0), (3, 5), (4, 1)],
    # top_k = 1: a chain.
    "chain": [(0, 0), (1, 0), (2, 0)],
    # Plain sampling.
    "root only": [],
}
DRAWS = {"bushy": 20000, "reordered": 5000, "unlikely": 5000, "chain": 5000, "root only": 4000}


@pytest.mark.parametrize("shape", list(TREE_SHAPES))
def test_accept_sampling_is_lossless(shape):
    """The first two emitted tokens follow the target's exact joint law (chi-square, pooled bins).

    With the p-value threshold of 1e-3 a correct implementation would fail with probability 1e-3 per shape for
    a random seed; the seeds are fixed, so the outcome is deterministic.
    """
    tree, probs = _ranked_tree(TREE_SHAPES[shape])
    counts = _emitted_pair_counts(tree, probs, DRAWS[shape], seed=sum(map(ord, shape)))
    assert _pair_law_p_value(counts) > P_VALUE_THRESHOLD


def _oracle_probs(tree: DraftTree) -> torch.Tensor:
    """[T, V] the oracle target's distribution at every node of any tree whose root token is 0."""
    tokens = tree.tokens.tolist()
    return torch.stack([_oracle(tuple(tokens[node] for node in path if node > 0)) for path in tree.paths.tolist()])


def test_accept_sampling_is_lossless_on_a_prompt_lookup_tree():
    """Prompt lookup's tree is grown from the history's n-gram counts, ranked by no target distribution, and holds
    tokens the target gives probability 0; acceptance reads only p, so the law is exact all the same."""
    lookup = PromptLookup(LookupConfig(tokens=10, depth=3))
    lookup.extend([0, 2, 1, 3, 0, 1, 4, 0, 2, 5, 1, 0])
    tree = lookup.propose(0, 10)
    #        0
    #      /   \
    #     2     1
    #    / \    |
    #   5   1   4
    #   |   |   |
    #   1   3   0
    assert tree.tokens.tolist() == [0, 2, 1, 5, 1, 4, 1, 3, 0] and tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3, 4, 5]
    counts = _emitted_pair_counts(tree, _oracle_probs(tree), 5000, seed=23)
    assert _pair_law_p_value(counts) > P_VALUE_THRESHOLD


def test_accept_sampling_is_lossless_on_a_merged_tree():
    """A hybrid tree: a draft head's top-k candidates and prompt lookup's copied chain, one shared prefix merged,
    lookup's low-probability tokens among the root's children; acceptance reads only p, so the law is exact."""
    lookup = PromptLookup(LookupConfig(tokens=6))
    lookup.extend([0, 2, 5, 1, 0, 3, 3, 0])
    draft_tree, _ = _ranked_tree([(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)])
    draft = Candidates(draft_tree.tokens.tolist(), draft_tree.parents.tolist(), [0.0, -0.2, -1.0, -0.5, -1.5, -2.0])
    merged = merge_candidates([draft, lookup.candidates(0, 6)], [0.0, math.log(0.7)], num_nodes=9)
    assert 1 in merged.sources and 2 in merged.sources, "both drafters should have nodes in the tree"
    tree = tree_from_lists(merged.tokens, merged.parents, torch.device("cpu"))
    counts = _emitted_pair_counts(tree, _oracle_probs(tree), 5000, seed=29)
    assert _pair_law_p_value(counts) > P_VALUE_THRESHOLD


def test_accept_sampling_refuses_duplicate_siblings():
    """Two siblings with one token would be tested twice against the same p(c): refused, not silently biased."""
    tree = tree_from_parents(torch.tensor([0, 3, 2, 3]), torch.tensor([-1, 0, 0, 0]))
    with pytest.raises(ValueError, match="distinct"):
        accept_sampling(tree, torch.full((4, VOCABULARY), 1 / VOCABULARY))


def _bonus_keeps_rejected_children(node_probs, tokens, is_rejected):
    """A classic bug: the bonus is drawn from p itself, not from the residual after the rejections."""
    return node_probs


def _accept_without_renormalising(child_probs, uniforms, node_mass, node_support):
    """Another classic bug: each child is accepted with p(c), ignoring the mass of rejected siblings."""
    for position, (probability, uniform) in enumerate(zip(child_probs, uniforms)):
        if uniform < probability / node_mass:
            return position
    return None


@pytest.mark.parametrize("bug, target", [
    (_bonus_keeps_rejected_children, "_residual"),
    (_accept_without_renormalising, "_first_accepted_child"),
])
def test_lossless_check_catches_wrong_acceptance(monkeypatch, bug, target):
    """The chi-square test has power: known-wrong variants give p-values far below the threshold."""
    monkeypatch.setattr(sampling, target, bug)
    tree, probs = _ranked_tree(TREE_SHAPES["bushy"])
    counts = _emitted_pair_counts(tree, probs, 4000, seed=17)
    assert _pair_law_p_value(counts) < P_VALUE_THRESHOLD * 1e-3
