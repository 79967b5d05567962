"""Tests for hass_deploy.runtime.tree: golden trees worked out by hand, then properties over random pools; the
merge of several drafters' candidates (hybrid trees) by hand and against a brute-force union."""

import math
import random

import pytest
import torch

from hass_deploy.runtime.tree import (
    Candidates,
    DraftTree,
    best_path,
    build_tree,
    build_tree_on_device,
    merge_candidates,
    merged_alone,
    merged_path,
    pool_candidates,
    root_only,
    select_beam,
    tree_from_lists,
    tree_from_parents,
)


def _walk_to_root(parents: list[int], node: int) -> list[int]:
    """Node ids root..node by following parent pointers (the reference the tensor code is checked against)."""
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def _assert_consistent(tree: DraftTree) -> None:
    """Every DraftTree invariant, checked against a plain-Python walk of the parent pointers."""
    parents = tree.parents.tolist()
    num_nodes = tree.num_nodes
    assert parents[0] == -1
    assert all(0 <= parents[node] < node for node in range(1, num_nodes))
    walks = [_walk_to_root(parents, node) for node in range(num_nodes)]
    expected_mask = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    for node, walk in enumerate(walks):
        expected_mask[node, walk] = True
    assert torch.equal(tree.mask, expected_mask)
    assert tree.depths.tolist() == [len(walk) - 1 for walk in walks]
    assert torch.equal(tree.depths, tree.mask.sum(dim=-1) - 1)
    assert tree.max_depth == max(len(walk) for walk in walks) - 1
    assert tree.paths.shape == (num_nodes, tree.max_depth + 1)
    for node, walk in enumerate(walks):
        assert tree.paths[node].tolist() == walk + [-1] * (tree.max_depth + 1 - len(walk))
    for tensor in (tree.tokens, tree.parents, tree.depths, tree.paths):
        assert tensor.dtype == torch.int64


# A hand-drawn 7-node tree:      0
#                              /   \
#                             1     2
#                            / \     \
#                           3   4     6
#                           |
#                           5
SEVEN_TOKENS = [50, 11, 12, 13, 14, 15, 16]
SEVEN_PARENTS = [-1, 0, 0, 1, 1, 3, 2]


def test_seven_node_tree_golden():
    tree = tree_from_parents(torch.tensor(SEVEN_TOKENS), torch.tensor(SEVEN_PARENTS))
    expected_mask = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 1, 0, 1, 0, 1, 0],
        [1, 0, 1, 0, 0, 0, 1],
    ], dtype=torch.bool)
    expected_paths = torch.tensor([
        [0, -1, -1, -1],
        [0, 1, -1, -1],
        [0, 2, -1, -1],
        [0, 1, 3, -1],
        [0, 1, 4, -1],
        [0, 1, 3, 5],
        [0, 2, 6, -1],
    ])
    assert tree.num_nodes == 7
    assert tree.max_depth == 3
    assert tree.tokens.tolist() == SEVEN_TOKENS
    assert tree.parents.tolist() == SEVEN_PARENTS
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3, 2]
    assert torch.equal(tree.mask, expected_mask)
    assert torch.equal(tree.paths, expected_paths)


def test_root_only_tree():
    for root in (torch.tensor(7), torch.tensor([7])):
        tree = root_only(root)
        assert tree.num_nodes == 1 and tree.max_depth == 0
        assert tree.tokens.tolist() == [7]
        assert tree.parents.tolist() == [-1]
        assert tree.depths.tolist() == [0]
        assert tree.mask.tolist() == [[True]]
        assert tree.paths.tolist() == [[0]]
        _assert_consistent(tree)
    # The general constructor agrees with the shortcut.
    general = tree_from_parents(torch.tensor([7]), torch.tensor([-1]))
    for name in ("tokens", "parents", "depths", "mask", "paths"):
        assert torch.equal(getattr(general, name), getattr(root_only(torch.tensor(7)), name))


@pytest.mark.parametrize("num_nodes", [2, 3, 4, 5, 17, 33, 64, 65])
def test_chain_is_the_deepest_tree(num_nodes):
    parents = torch.arange(-1, num_nodes - 1)
    tree = tree_from_parents(torch.arange(num_nodes), parents)
    assert torch.equal(tree.mask, torch.ones(num_nodes, num_nodes, dtype=torch.bool).tril())
    assert tree.max_depth == num_nodes - 1
    _assert_consistent(tree)


@pytest.mark.parametrize("parents", [
    [0, 0, 1],       # root's parent must be -1
    [-1, 1, 0],      # a node cannot be its own parent
    [-1, 0, 2],      # nor have a later parent
    [-1, 0, -1],     # only the root has no parent
    [-1, 0, 5],      # nor an out-of-range one
])
def test_tree_from_parents_rejects_bad_parents(parents):
    with pytest.raises(ValueError):
        tree_from_parents(torch.arange(len(parents)), torch.tensor(parents))


def test_tree_from_parents_rejects_bad_shapes():
    with pytest.raises(ValueError):
        tree_from_parents(torch.arange(3), torch.tensor([-1, 0]))
    with pytest.raises(ValueError):
        tree_from_parents(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))


def test_select_beam_breaks_ties_by_lower_index():
    scores = torch.tensor([-1.0, -0.5, -1.0, float("-inf"), -0.5, -1.0, float("-inf")])
    assert select_beam(scores, 4).tolist() == [1, 4, 0, 2]
    assert select_beam(scores, 7).tolist() == [1, 4, 0, 2, 5, 3, 6]
    assert select_beam(scores, 100).tolist() == [1, 4, 0, 2, 5, 3, 6]
    assert select_beam(scores, 0).tolist() == []
    assert select_beam(torch.zeros(5), 3).tolist() == [0, 1, 2]


# A hand-made pool (generation order) with ties between parents and children and -inf scores:
#   pool  token  score  parent
#    0     10    -0.5    root
#    1     11    -1.0    root
#    2     12    -0.5    0      (ties its parent: log-prob 0)
#    3     13    -2.0    0
#    4     14    -1.0    1      (ties its parent and pool 1)
#    5     15    -inf    1
#    6     16    -0.5    2      (ties parent and grandparent)
#    7     17    -inf    5      (child of a -inf entry)
# Ranking (score desc, pool index asc): 0, 2, 6, 1, 4, 3, 5, 7.
POOL_TOKENS = [10, 11, 12, 13, 14, 15, 16, 17]
POOL_SCORES = [-0.5, -1.0, -0.5, -2.0, -1.0, float("-inf"), -0.5, float("-inf")]
POOL_PARENTS = [-1, -1, 0, 0, 1, 1, 2, 5]
ROOT = 99


@pytest.mark.parametrize("num_nodes, tokens, parents", [
    (1, [ROOT], [-1]),
    (2, [ROOT, 10], [-1, 0]),
    # Keep {0, 2}: the child 2 (tied with 0) comes after its parent, and 6 (also tied) after both.
    (3, [ROOT, 10, 12], [-1, 0, 1]),
    (4, [ROOT, 10, 12, 16], [-1, 0, 1, 2]),
    # Keep {0, 2, 6, 1} -> pool order 0, 1, 2, 6 -> nodes 1..4.
    (5, [ROOT, 10, 11, 12, 16], [-1, 0, 0, 1, 3]),
    # Keep {0, 1, 2, 4, 6}: 4 ties pool 1 but has the higher index.
    (6, [ROOT, 10, 11, 12, 14, 16], [-1, 0, 0, 1, 2, 3]),
    # Keep all but 7: the -inf tie goes to the lower index 5, the parent of 7.
    (8, [ROOT, 10, 11, 12, 13, 14, 15, 16], [-1, 0, 0, 1, 1, 2, 2, 3]),
    (9, [ROOT, 10, 11, 12, 13, 14, 15, 16, 17], [-1, 0, 0, 1, 1, 2, 2, 3, 6]),
    # Asking for more nodes than the pool holds keeps the whole pool.
    (50, [ROOT, 10, 11, 12, 13, 14, 15, 16, 17], [-1, 0, 0, 1, 1, 2, 2, 3, 6]),
])
def test_build_tree_golden_pool(num_nodes, tokens, parents):
    tree = build_tree(
        torch.tensor(ROOT),
        torch.tensor(POOL_TOKENS),
        torch.tensor(POOL_SCORES),
        torch.tensor(POOL_PARENTS),
        num_nodes,
    )
    assert tree.tokens.tolist() == tokens
    assert tree.parents.tolist() == parents
    _assert_consistent(tree)


def test_build_tree_golden_depths_and_paths():
    tree = build_tree(torch.tensor([ROOT]), torch.tensor(POOL_TOKENS), torch.tensor(POOL_SCORES),
                      torch.tensor(POOL_PARENTS), 6)
    # Nodes: 1 = pool 0, 2 = pool 1, 3 = pool 2, 4 = pool 4, 5 = pool 6.
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert tree.paths.tolist() == [
        [0, -1, -1, -1],
        [0, 1, -1, -1],
        [0, 2, -1, -1],
        [0, 1, 3, -1],
        [0, 2, 4, -1],
        [0, 1, 3, 5],
    ]


def test_build_tree_chain_from_top_k_one():
    # top_k = 1, depth = 3: the pool is 1 + 3 * 1 entries, each the only child of the previous one.
    pool_parents = torch.tensor([-1, 0, 1, 2])
    pool_scores = torch.tensor([-0.1, -0.3, -0.3, -0.9])
    tree = build_tree(torch.tensor(5), torch.tensor([21, 22, 23, 24]), pool_scores, pool_parents, 4)
    assert tree.tokens.tolist() == [5, 21, 22, 23]
    assert tree.parents.tolist() == [-1, 0, 1, 2]
    assert tree.paths.tolist()[-1] == [0, 1, 2, 3]
    assert torch.equal(tree.mask, torch.ones(4, 4, dtype=torch.bool).tril())
    _assert_consistent(tree)


def test_build_tree_empty_pool_and_bad_size():
    empty = torch.zeros(0, dtype=torch.int64)
    tree = build_tree(torch.tensor(3), empty, torch.zeros(0), empty, 10)
    assert tree.tokens.tolist() == [3] and tree.parents.tolist() == [-1]
    with pytest.raises(ValueError):
        build_tree(torch.tensor(3), torch.tensor(POOL_TOKENS), torch.tensor(POOL_SCORES),
                   torch.tensor(POOL_PARENTS), 0)


def test_build_tree_rejects_a_parent_after_its_child():
    with pytest.raises(ValueError):
        build_tree(torch.tensor(0), torch.tensor([7, 8]), torch.tensor([-1.0, -2.0]), torch.tensor([1, -1]), 3)


def test_build_tree_stays_closed_when_scores_are_not_monotone():
    # Not a genuine cumulative score (a child beats its parent), e.g. after rounding in low precision:
    # the child may only come with its parent.
    pool_scores = torch.tensor([-3.0, -1.0, -0.5])
    pool_parents = torch.tensor([-1, -1, 0])
    tree = build_tree(torch.tensor(0), torch.tensor([7, 8, 9]), pool_scores, pool_parents, 2)
    assert tree.tokens.tolist() == [0, 8]
    tree = build_tree(torch.tensor(0), torch.tensor([7, 8, 9]), pool_scores, pool_parents, 3)
    # Pool 1, then pool 0 (path minimum -3 ties pool 2's, and 0 is the lower index); nodes in pool order.
    assert tree.tokens.tolist() == [0, 7, 8]
    assert tree.parents.tolist() == [-1, 0, 0]
    _assert_consistent(tree)


def _random_pool(rng: random.Random, size: int) -> tuple[list[int], list[float]]:
    """A pool whose scores are genuine cumulative log-probs, with frequent exact ties and -inf entries."""
    parents: list[int] = []
    scores: list[float] = []
    for index in range(size):
        parent = rng.randint(-1, index - 1)
        base = 0.0 if parent < 0 else scores[parent]
        draw = rng.random()
        if draw < 0.2:
            step = 0.0  # log-prob 0: the child ties its parent
        elif draw < 0.3:
            step = float("-inf")
        else:
            step = -rng.choice([0.25, 0.5, 1.0, 2.0])  # coarse steps: many ties between unrelated entries
        parents.append(parent)
        scores.append(base + step)
    return parents, scores


def _eagle_pool(rng: random.Random, top_k: int, depth: int) -> tuple[list[int], list[float]]:
    """A pool with EAGLE-2's layout: top_k root children, then per level top_k groups of top_k children."""
    def children(base: float) -> list[float]:
        log_probs = sorted((-rng.choice([0.0, 0.5, 1.0, float("inf")]) for _ in range(top_k)), reverse=True)
        return [base + log_prob for log_prob in log_probs]

    scores = children(0.0)
    parents = [-1] * top_k
    beam = list(range(top_k))
    for _ in range(depth):
        level_start = len(scores)
        for beam_node in beam:
            scores += children(scores[beam_node])
            parents += [beam_node] * top_k
        level = list(range(level_start, len(scores)))
        beam = sorted(level, key=lambda index: (-scores[index], index))[:top_k]
    return parents, scores


def _check_selection(parents: list[int], scores: list[float], num_nodes: int) -> None:
    size = len(parents)
    tree = build_tree(torch.tensor(-7), torch.arange(size) + 1000, torch.tensor(scores),
                      torch.tensor(parents), num_nodes)
    _assert_consistent(tree)
    ranking = sorted(range(size), key=lambda index: (-scores[index], index))
    selected = sorted(ranking[: num_nodes - 1])
    assert tree.num_nodes == min(num_nodes, size + 1)
    assert tree.tokens.tolist() == [-7] + [index + 1000 for index in selected]
    # Ancestor-closed, and each node's parent is the node holding its pool parent.
    node_of_pool = {pool_index: node for node, pool_index in enumerate(selected, start=1)}
    for node, pool_index in enumerate(selected, start=1):
        pool_parent = parents[pool_index]
        assert pool_parent == -1 or pool_parent in node_of_pool
        assert tree.parents[node].item() == (0 if pool_parent == -1 else node_of_pool[pool_parent])


def test_build_tree_random_pools():
    rng = random.Random(1234)
    for _ in range(150):
        size = rng.randint(0, 30)
        parents, scores = _random_pool(rng, size)
        _check_selection(parents, scores, rng.randint(1, size + 3))


def test_build_tree_random_eagle_pools():
    rng = random.Random(99)
    for _ in range(60):
        top_k, depth = rng.randint(1, 4), rng.randint(0, 4)
        parents, scores = _eagle_pool(rng, top_k, depth)
        _check_selection(parents, scores, rng.randint(1, len(parents) + 2))


def _pool_depth(parents: list[int]) -> int:
    depth = [0] * len(parents)
    for index, parent in enumerate(parents):
        depth[index] = 0 if parent < 0 else depth[parent] + 1
    return max(depth, default=0) + 1


def _check_device_build(parents: list[int], scores: list[float], num_nodes: int, max_depth: int) -> None:
    args = (torch.tensor(-7), torch.arange(len(parents)) + 1000, torch.tensor(scores), torch.tensor(parents))
    host, device = build_tree(*args, num_nodes), build_tree_on_device(*args, num_nodes, max_depth)
    for name in ("tokens", "parents", "depths", "mask"):
        assert torch.equal(getattr(device, name), getattr(host, name)), name
    assert device.paths.shape == (host.num_nodes, max_depth + 1)
    assert torch.equal(device.paths[:, :host.max_depth + 1], host.paths)
    assert (device.paths[:, host.max_depth + 1:] == -1).all()


def test_device_build_equals_the_host_build():
    """The GPU's sync-free tree is the host's tree, on pools with ties, -inf and any shape, with the depth bound
    exact or loose."""
    rng = random.Random(4321)
    for _ in range(150):
        size = rng.randint(0, 30)
        parents, scores = _random_pool(rng, size)
        _check_device_build(parents, scores, rng.randint(1, size + 3), _pool_depth(parents) + rng.randint(0, 2))
    for _ in range(60):
        top_k, depth = rng.randint(1, 4), rng.randint(0, 4)
        parents, scores = _eagle_pool(rng, top_k, depth)
        _check_device_build(parents, scores, rng.randint(1, len(parents) + 2), depth + 1)


def test_device_build_needs_the_depth_bound():
    """Too few passes leave a deep node's ancestors out: the bound is what makes it exact."""
    parents, scores = [-1, 0, 1], [-0.5, -1.0, -1.5]  # a chain of three under the root
    args = (torch.tensor(1), torch.tensor([5, 6, 7]), torch.tensor(scores), torch.tensor(parents))
    assert not torch.equal(build_tree_on_device(*args, 4, 2).mask, build_tree(*args, 4).mask)
    assert torch.equal(build_tree_on_device(*args, 4, 3).mask, build_tree(*args, 4).mask)


def test_tree_from_random_parents():
    rng = random.Random(7)
    for _ in range(100):
        num_nodes = rng.randint(1, 40)
        parents = [-1] + [rng.randint(max(0, node - 3), node - 1) for node in range(1, num_nodes)]
        tree = tree_from_parents(torch.arange(num_nodes), torch.tensor(parents))
        _assert_consistent(tree)


# --------------------------------------------------------------------------------------------------------------
# Merging several drafters' candidates (hybrid trees).

LOG = math.log


def test_merge_counts_shared_prefixes_once_and_ranks_by_the_best_source():
    #   draft:  0 -> 5 (0.6) -> 6 (0.3)        lookup: 0 -> 5 (0.9) -> 7 (0.8) -> 8 (0.7)
    #           0 -> 9 (0.3)
    draft = Candidates([0, 5, 6, 9], [-1, 0, 1, 0], [0.0, LOG(0.6), LOG(0.3), LOG(0.3)])
    lookup = Candidates([0, 5, 7, 8], [-1, 0, 1, 2], [0.0, LOG(0.9), LOG(0.8), LOG(0.7)])
    merged = merge_candidates([draft, lookup], [0.0, 0.0], num_nodes=10)
    #        0
    #      /   \
    #     5     9          5 proposed by both: one node, bits 0b11
    #    / \
    #   6   7
    #       |
    #       8
    assert merged.tokens == [0, 5, 6, 9, 7, 8] and merged.parents == [-1, 0, 1, 0, 1, 4]
    assert merged.sources == [0, 0b11, 0b01, 0b01, 0b10, 0b10]
    assert merged.source_scores[0] == pytest.approx([-math.inf, LOG(0.6), LOG(0.3), LOG(0.3), -math.inf, -math.inf])
    assert merged.source_scores[1] == pytest.approx([-math.inf, LOG(0.9), -math.inf, -math.inf, LOG(0.8), LOG(0.7)])
    # A budget of 4 keeps the three best by the better source's score: 5 (0.9), 7 (0.8), 8 (0.7).
    small = merge_candidates([draft, lookup], [0.0, 0.0], num_nodes=4)
    assert small.tokens == [0, 5, 7, 8] and small.parents == [-1, 0, 1, 2] and small.sources == [0, 3, 2, 2]
    # Calibration offsets move the budget: lookup's scores halved (log 0.5), the draft's doubled (log 2).
    moved = merge_candidates([draft, lookup], [LOG(2.0), LOG(0.5)], num_nodes=4)
    #   5: max(1.2, 0.45), then 6: 0.6, 9: 0.6, 7: 0.4 -> 5, 6, 9 (ties by node order)
    assert moved.tokens == [0, 5, 6, 9] and moved.parents == [-1, 0, 1, 0]
    assert merge_candidates([draft, lookup], [0.0, 0.0], num_nodes=1).tokens == [0]


def test_merge_keeps_ranking_closed_under_ancestors():
    # Lookup proposes 0 -> 3 (0.1) -> 4 (0.1); the draft 0 -> 3 (0.05) -> 4 (0.9): not a genuine cumulative
    # score (child above parent), and the parent's best score (0.1) caps the child's rank.
    draft = Candidates([0, 3, 4], [-1, 0, 1], [0.0, LOG(0.05), LOG(0.9)])
    lookup = Candidates([0, 3, 4, 2], [-1, 0, 1, 0], [0.0, LOG(0.1), LOG(0.1), LOG(0.2)])
    merged = merge_candidates([draft, lookup], [0.0, 0.0], num_nodes=3)
    assert merged.tokens == [0, 3, 2]  # 2 (0.2) first, then 3 (0.1), before its child 4 (capped at 0.1)
    _assert_consistent(tree_from_lists(merged.tokens, merged.parents, torch.device("cpu")))


def test_merge_refuses_duplicate_siblings_and_foreign_roots():
    duplicate = Candidates([0, 4, 4], [-1, 0, 0], [0.0, -1.0, -2.0])
    with pytest.raises(ValueError, match="distinct"):
        merge_candidates([duplicate], [0.0], 3)
    with pytest.raises(ValueError, match="one root"):
        merge_candidates([Candidates([0], [-1], [0.0]), Candidates([1], [-1], [0.0])], [0.0, 0.0], 3)
    with pytest.raises(ValueError, match="one offset per source"):
        merge_candidates([duplicate], [0.0, 0.0], 3)
    with pytest.raises(ValueError, match="num_nodes"):
        merge_candidates([duplicate], [0.0], 0)


def _random_candidates(rng: random.Random, root: int, vocab: int, size: int) -> Candidates:
    """Random candidates with distinct siblings and genuine (non-increasing) path scores, -inf included."""
    tokens, parents, scores = [root], [-1], [0.0]
    used: dict[int, set[int]] = {0: set()}
    for _ in range(size):
        parent = rng.randrange(len(tokens))
        free = [token for token in range(vocab) if token not in used[parent]]
        if not free:
            continue
        token = rng.choice(free)
        used[parent].add(token)
        used[len(tokens)] = set()
        step = rng.choice([0.0, -0.5, -1.0, -math.inf])
        tokens.append(token)
        parents.append(parent)
        scores.append(scores[parent] + step)
    return Candidates(tokens, parents, scores)


@pytest.mark.parametrize("seed", range(40))
def test_merge_matches_a_brute_force_union(seed):
    """Against the specification written with token paths: the union of every source's paths, each ranked by
    its best offset score clamped to its ancestors', the best num_nodes - 1 kept."""
    rng = random.Random(seed)
    sources = [_random_candidates(rng, 0, rng.choice([2, 3, 6]), rng.randint(0, 12)) for _ in range(rng.randint(1, 3))]
    offsets = [rng.choice([0.0, LOG(0.5), LOG(2.0)]) for _ in sources]
    num_nodes = rng.randint(1, 16)
    merged = merge_candidates(sources, offsets, num_nodes)

    def paths_of(found):
        paths = [()]
        for token, parent in zip(found.tokens[1:], found.parents[1:]):
            paths.append(paths[parent] + (token,))
        return paths

    best: dict[tuple, float] = {}
    order: list[tuple] = []
    for found, offset in zip(sources, offsets):
        for path, score in zip(paths_of(found)[1:], found.scores[1:]):
            if path not in best:
                order.append(path)
            best[path] = max(best.get(path, -math.inf), score + offset)
    rank = {path: min(best[path[:i]] for i in range(1, len(path) + 1)) for path in order}
    kept = sorted(order, key=lambda path: (-rank[path], order.index(path)))[:num_nodes - 1]
    got = paths_of(Candidates(merged.tokens, merged.parents, [0.0] * len(merged.tokens)))
    assert got[1:] == sorted(kept, key=order.index)  # kept paths, in first-proposed order
    for node, path in enumerate(got[1:], start=1):
        proposed_by = [s for s, found in enumerate(sources) if path in paths_of(found)]
        assert merged.sources[node] == sum(1 << s for s in proposed_by)
    _assert_consistent(tree_from_lists(merged.tokens, merged.parents, torch.device("cpu")))


@pytest.mark.parametrize("seed", range(20))
def test_one_source_alone_is_its_own_merge(seed):
    """What a hybrid round without the draft uses: the same tree, sources and scores as the full merge."""
    found = _random_candidates(random.Random(seed), root=3, vocab=6, size=random.Random(seed).randint(0, 12))
    for source in (0, 1):
        sources = [Candidates([3], [-1], [0.0])] * 2
        sources[source] = found
        assert merged_alone(found, 2, source) == merge_candidates(sources, [0.3, -0.2], len(found.tokens))


def test_pool_candidates_renumber_the_pool_under_the_root():
    found = pool_candidates(torch.tensor(9), torch.tensor([4, 5, 6]), torch.tensor([-0.5, -1.0, -0.25]),
                            torch.tensor([-1, -1, 0]))
    assert found.tokens == [9, 4, 5, 6] and found.parents == [-1, 0, 0, 1]
    assert found.scores == [0.0, -0.5, -1.0, -0.5]  # the child's -0.25 clamped to its parent's -0.5
    assert found.expected_accepted == pytest.approx(2 * math.exp(-0.5) + math.exp(-1.0))


def test_best_path_follows_the_best_child_and_breaks_ties_by_node_order():
    #        0
    #      /   \
    #     1     2          ranks: 1: -0.5, 2: -0.2 -> 2; under 2: 3 (-1.0) and 4 (-0.9) -> 4; 5 under 1 is off the path
    #    /     / \
    #   5     3   4
    parents, ranks = [-1, 0, 0, 2, 2, 1], [0.0, -0.5, -0.2, -1.0, -0.9, -0.3]
    assert best_path(parents, ranks) == [0, 2, 4]
    assert best_path(parents, [0.0, -0.5, -0.5, -1.0, -1.0, -0.6]) == [0, 1, 5]  # ties: the lower id
    assert best_path([-1], [0.0]) == [0]
    assert best_path([-1, 0, 1], [0.0, -math.inf, -math.inf]) == [0, 1, 2]


def test_merged_path_ranks_by_the_best_source_with_its_offset():
    draft = Candidates([0, 5, 6, 9], [-1, 0, 1, 0], [0.0, LOG(0.6), LOG(0.3), LOG(0.3)])
    lookup = Candidates([0, 5, 7, 8], [-1, 0, 1, 2], [0.0, LOG(0.9), LOG(0.8), LOG(0.7)])
    merged = merge_candidates([draft, lookup], [0.0, 0.0], num_nodes=10)  # the tree drawn in the merge test above
    chain = merged_path(merged, [0.0, 0.0])
    assert chain.tokens == [0, 5, 7, 8] and chain.parents == [-1, 0, 1, 2] and chain.sources == [0, 3, 2, 2]
    assert chain.source_scores[1] == pytest.approx([-math.inf, LOG(0.9), LOG(0.8), LOG(0.7)])
    # The draft's scores doubled and lookup's halved: under 5, the draft's 6 (0.6) beats lookup's 7 (0.4).
    moved = merged_path(merged, [LOG(2.0), LOG(0.5)])
    assert moved.tokens == [0, 5, 6] and moved.parents == [-1, 0, 1] and moved.sources == [0, 3, 1]
