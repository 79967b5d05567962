"""The EAGLE-2 dynamic draft tree (algorithm.md §4.3–4.4) as data plus pure functions.

A round of speculative decoding verifies a small token tree in one target forward pass. Node 0 is the root, a
token the target already chose but has not yet put in its KV cache; every other node is a draft guess that
continues its parent. The functions here turn the draft's scored candidate pool into that tree and derive the
tensors verification needs (ancestor mask, depths = position offsets, root-to-node paths).

A tree is a few dozen numbers, so on the CPU its structure (depths, ancestor mask, paths) is derived on the host
from one read of the inputs and uploaded as one tensor: on 2 CPU cores the same derivation as ~25 tiny tensor
kernels cost 0.6 ms of every round (docs/RESULTS.md). On a GPU that read is a host synchronisation in the middle of
the round, so there `build_tree_on_device` derives the same tree with tensor ops and the round's only
synchronisation is the one that reads the accepted tokens. The tree's tensors live on the inputs' device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


# eq=False: the generated __eq__ would compare tensors elementwise and raise; identity equality is what we want.
@dataclass(frozen=True, eq=False)
class DraftTree:
    """A verified-in-one-pass token tree. Node 0 is the root: a token already chosen by the target but not yet
    in its KV cache.

    Attributes:
        tokens: [T] int64 token ids, tokens[0] = root.
        parents: [T] int64, parents[0] = -1, parents[i] < i for i > 0.
        depths: [T] int64, depths[0] = 0, depths[i] = depths[parents[i]] + 1.
        mask: [T, T] bool, mask[i, j] = node j is an ancestor of i or i itself (so column 0 is all True).
        paths: [T, max_depth + 1] int64, paths[i, :depths[i] + 1] = node ids root..i, the rest -1.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    depths: torch.Tensor
    mask: torch.Tensor
    paths: torch.Tensor

    @property
    def num_nodes(self) -> int:
        """Number of nodes T, the root included."""
        return self.tokens.shape[0]

    @property
    def max_depth(self) -> int:
        """Depth of the deepest node (0 for a root-only tree); read from a shape, so it never syncs."""
        return self.paths.shape[1] - 1


def root_only(root_token: torch.Tensor) -> DraftTree:
    """The one-node tree used by plain (non-speculative) decoding.

    Args:
        root_token: 0-d or [1] int64 tensor, the token the target chose last.

    Returns:
        A DraftTree with T = 1 on root_token's device.
    """
    device = root_token.device
    return DraftTree(
        tokens=root_token.reshape(1).to(torch.int64),
        parents=torch.full((1,), -1, dtype=torch.int64, device=device),
        depths=torch.zeros(1, dtype=torch.int64, device=device),
        mask=torch.ones(1, 1, dtype=torch.bool, device=device),
        paths=torch.zeros(1, 1, dtype=torch.int64, device=device),
    )


def tree_from_parents(tokens: torch.Tensor, parents: torch.Tensor) -> DraftTree:
    """Build a DraftTree from token ids and parent pointers, deriving depths, mask and paths.

    Args:
        tokens: [T] integer token ids, tokens[0] = root.
        parents: [T] integer node ids, parents[0] = -1 and 0 <= parents[i] < i for i > 0.

    Returns:
        The DraftTree on the inputs' device.

    Raises:
        ValueError: if the shapes differ, T = 0, or the parents do not satisfy the rule above.

    One host sync (the inputs, read together).
    """
    if tokens.dim() != 1 or parents.shape != tokens.shape or tokens.shape[0] == 0:
        raise ValueError(f"tokens and parents must be equal-length non-empty 1-D tensors, got "
                         f"{tuple(tokens.shape)} and {tuple(parents.shape)}")
    host = torch.stack([tokens.to(torch.int64), parents.to(device=tokens.device, dtype=torch.int64)]).tolist()
    return tree_from_lists(host[0], host[1], tokens.device)


def tree_from_lists(tokens: list[int], parents: list[int], device: torch.device) -> DraftTree:
    """The DraftTree of a tree built on the host (token ids and parent pointers as Python lists), uploaded as one
    int64 tensor and split into views.

    Args:
        tokens: T token ids, tokens[0] = root.
        parents: T node ids, parents[0] = -1 and 0 <= parents[i] < i for i > 0.
        device: where the tree's tensors live (the target's device).

    Raises:
        ValueError: if the lists are empty or of different lengths, or the parents do not satisfy the rule above.
    """
    if not tokens or len(parents) != len(tokens):
        raise ValueError(f"tokens and parents must be equal-length non-empty lists, got {len(tokens)} and "
                         f"{len(parents)}")
    if parents[0] != -1 or any(not 0 <= parent < node for node, parent in enumerate(parents) if node):
        # Root -1, every other parent a strictly earlier node (which also rules out cycles).
        raise ValueError("parents must be -1 for node 0 and an earlier node id for every other node")
    num_nodes = len(tokens)
    paths = [[0]]  # root..node ids of each node
    for node in range(1, num_nodes):
        paths.append(paths[parents[node]] + [node])
    width = max(len(path) for path in paths)  # max_depth + 1
    mask = [[0] * num_nodes for _ in range(num_nodes)]
    for node, path in enumerate(paths):
        for ancestor in path:
            mask[node][ancestor] = 1
    flat = [*tokens, *parents, *(len(path) - 1 for path in paths)]
    for path in paths:
        flat += path + [-1] * (width - len(path))
    for row in mask:
        flat += row
    data = torch.tensor(flat, dtype=torch.int64, device=device)  # [3T + T*width + T*T]: one upload
    t = num_nodes
    return DraftTree(tokens=data[:t], parents=data[t:2 * t], depths=data[2 * t:3 * t],
                     paths=data[3 * t:3 * t + t * width].view(t, width),
                     mask=data[3 * t + t * width:].view(t, t).bool())


def select_beam(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k best scores, best first, ties broken by lower index so the choice is deterministic.

    Args:
        scores: [N] float scores (-inf allowed).
        k: how many to keep; clamped to N.

    Returns:
        [min(k, N)] int64 indices into scores.
    """
    order = torch.sort(scores, descending=True, stable=True).indices  # [N]
    return order[:k]


@dataclass(frozen=True)
class Candidates:
    """A drafter's proposals under the pending root, on the host: node 0 is the root, node i > 0 continues node
    parents[i] (< i) with tokens[i], and scores[i] is the drafter's log-probability that the whole path root..i is
    right (0 at the root; never larger than the parent's, -inf allowed). Sibling tokens are distinct."""

    tokens: list[int]
    parents: list[int]
    scores: list[float]

    @property
    def expected_accepted(self) -> float:
        """Draft tokens a greedy verifier is expected to accept if the scores were calibrated: a node is accepted
        exactly when its whole path is, so the expectation is the sum of the nodes' path probabilities."""
        return sum(math.exp(score) for score in self.scores[1:])


@dataclass(frozen=True)
class MergedTree:
    """Candidates of several drafters as one trie (`merge_candidates`), on the host.

    Attributes:
        tokens, parents: the tree (node 0 the root, parents before children).
        sources: per node, a bit mask of the drafters that proposed it (bit s for the s-th source; 0 at the root).
        source_scores: per source, per node, that source's own score of the node (-inf where it did not propose it).
    """

    tokens: list[int]
    parents: list[int]
    sources: list[int]
    source_scores: list[list[float]]


def pool_candidates(root_token: torch.Tensor, pool_tokens: torch.Tensor, pool_scores: torch.Tensor,
                    pool_parents: torch.Tensor) -> Candidates:
    """The draft head's expansion pool as host Candidates (one host read for the whole pool).

    Args:
        root_token: 0-d or [1] int64, the pending root token.
        pool_tokens: [N] int64 candidate token ids, in generation order.
        pool_scores: [N] float cumulative draft log-prob of each candidate's path.
        pool_parents: [N] int64 pool index of each candidate's parent, -1 for children of the root; each is
            below the candidate's own index.

    A child's cumulative score is <= its parent's for genuine log-probs; scores are clamped to the minimum along
    their path anyway, so that rounding can never rank a child above its parent (which would break the
    ancestor closure of a reranked prefix).

    Raises:
        ValueError: if a parent comes after its child in the pool.
    """
    count = pool_tokens.shape[0]
    # Token ids < 2^53 are exact in float64, and -inf scores survive.
    host = torch.cat([root_token.reshape(1).to(torch.float64), pool_tokens.to(torch.float64),
                      pool_scores.to(torch.float64), pool_parents.to(torch.float64)]).tolist()
    parents = [int(parent) for parent in host[1 + 2 * count:]]
    if any(parent >= index for index, parent in enumerate(parents)):
        raise ValueError("every pool entry's parent must come before it in the pool")
    scores = [0.0]
    for score, parent in zip(host[1 + count:1 + 2 * count], parents):
        scores.append(min(score, scores[parent + 1]))
    return Candidates(tokens=[int(host[0])] + [int(token) for token in host[1:1 + count]],
                      parents=[-1] + [parent + 1 for parent in parents], scores=scores)


def merge_candidates(sources: Sequence[Candidates], offsets: Sequence[float], num_nodes: int) -> MergedTree:
    """EAGLE-2's rerank (algorithm.md §4.3 steps 4–6) over the union of several drafters' candidates.

    The candidates are merged into one trie under the common root: a path proposed by several sources is one
    node, so shared prefixes are counted once and siblings stay distinct. A node's ranking score is the best of
    its sources' scores plus that source's offset (a log calibration weight: how far this source's scores are
    from its realised acceptance), clamped to its parent's so that every prefix of the ranking is closed under
    ancestors (ties go to the earlier node, and parents are numbered before children). The best `num_nodes - 1`
    nodes are kept, in node order: source order, then each source's own order (for the draft head, generation
    order, i.e. draft-score order among siblings).

    Args:
        sources: each drafter's candidates, all under the same root token.
        offsets: one log weight per source, added to its scores before ranking.
        num_nodes: tree size T counting the root (>= 1).

    Raises:
        ValueError: if num_nodes < 1, the roots differ, or a source has a duplicate sibling.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes counts the root and must be >= 1, got {num_nodes}")
    if not sources or len(offsets) != len(sources) or any(c.tokens[0] != sources[0].tokens[0] for c in sources):
        raise ValueError("merge needs one offset per source and candidates under one root token")
    tokens, parents, masks, ranks = [sources[0].tokens[0]], [-1], [0], [0.0]
    own = [[-math.inf] for _ in sources]  # [source][node] the source's own score
    children: list[dict[int, int]] = [{}]  # per node: child token -> node
    for s, (found, offset) in enumerate(zip(sources, offsets)):
        node_of = [0]  # the source's node -> merged node
        for token, parent, score in zip(found.tokens[1:], found.parents[1:], found.scores[1:]):
            parent = node_of[parent]
            node = children[parent].get(token)
            if node is None:
                node = len(tokens)
                tokens.append(token)
                parents.append(parent)
                masks.append(0)
                ranks.append(-math.inf)
                children.append({})
                children[parent][token] = node
                for scores in own:
                    scores.append(-math.inf)
            elif masks[node] >> s & 1:
                raise ValueError("a source proposed the same token twice under one node: siblings must be distinct")
            masks[node] |= 1 << s
            own[s][node] = score
            ranks[node] = max(ranks[node], score + offset)
            node_of.append(node)
    for node in range(1, len(tokens)):  # parents come first, so each parent is already clamped
        ranks[node] = min(ranks[node], ranks[parents[node]])
    ranking = sorted(range(1, len(tokens)), key=lambda node: (-ranks[node], node))
    kept = [0] + sorted(ranking[:num_nodes - 1])
    new_id = {node: index for index, node in enumerate(kept)}
    return MergedTree(tokens=[tokens[node] for node in kept],
                      parents=[-1] + [new_id[parents[node]] for node in kept[1:]],
                      sources=[masks[node] for node in kept],
                      source_scores=[[scores[node] for node in kept] for scores in own])


def merged_alone(found: Candidates, sources: int, source: int) -> MergedTree:
    """`merge_candidates` when only source `source` of `sources` proposed anything beyond the root, and its
    candidates fit the budget: its own tree, without the trie and the rerank (the tree is the same, node for node)."""
    missing = [-math.inf] * len(found.tokens)
    own = [-math.inf] + found.scores[1:]  # a merge records no source's score at the root
    return MergedTree(tokens=found.tokens, parents=found.parents, sources=[0] + [1 << source] * (len(found.tokens) - 1),
                      source_scores=[own if s == source else missing for s in range(sources)])


def best_path(parents: Sequence[int], ranks: Sequence[float]) -> list[int]:
    """The tree's best chain: from the root, the best-ranked child of each node in turn (ties: the lower node id).

    A verification step that must be a chain (a target whose tree rows are not plain decoding's, `TargetBackend.
    tree_rows_exact`) takes this path of a drafter's tree: with path scores that only fall along a path, it is the
    greedy choice of the chain most likely to be accepted.

    Args:
        parents: per node, its parent's id (-1 at node 0, the root; parents before children).
        ranks: per node, the score its rank goes by.

    Returns:
        Node ids root..leaf, increasing.
    """
    best: dict[int, int] = {}  # parent -> its best child so far
    for node in range(1, len(parents)):
        parent = parents[node]
        if parent not in best or ranks[node] > ranks[best[parent]]:
            best[parent] = node
    path = [0]
    while path[-1] in best:
        path.append(best[path[-1]])
    return path


def merged_path(merged: MergedTree, offsets: Sequence[float]) -> MergedTree:
    """A merged tree cut to its best chain, ranked as `merge_candidates` ranks: a node by its best source score plus
    that source's offset."""
    ranks = [max(scores[node] + offset for scores, offset in zip(merged.source_scores, offsets))
             for node in range(len(merged.tokens))]
    path = best_path(merged.parents, ranks)
    return MergedTree(tokens=[merged.tokens[node] for node in path], parents=list(range(-1, len(path) - 1)),
                      sources=[merged.sources[node] for node in path],
                      source_scores=[[scores[node] for node in path] for scores in merged.source_scores])


def build_tree(
    root_token: torch.Tensor,
    pool_tokens: torch.Tensor,
    pool_scores: torch.Tensor,
    pool_parents: torch.Tensor,
    num_nodes: int,
) -> DraftTree:
    """EAGLE-2 rerank of the draft head's pool alone: keep the best candidates as an ancestor-closed tree.

    A child's cumulative score is <= its parent's and the parent has the lower pool index, so in a stable
    descending sort (ties by lower index) every parent ranks before its child and any prefix of the ranking is
    closed under ancestors, even with exact ties and -inf scores (`pool_candidates`, `merge_candidates`).

    Args:
        root_token, pool_tokens, pool_scores, pool_parents: as in `pool_candidates`.
        num_nodes: tree size T counting the root; if T - 1 > N, all N candidates are kept.

    Returns:
        The DraftTree with min(T, N + 1) nodes, the kept candidates in ascending pool order (so parents precede
        children and siblings keep their generation, i.e. draft-score, order), on the pool's device.

    Raises:
        ValueError: if num_nodes < 1 or a parent comes after its child.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes counts the root and must be >= 1, got {num_nodes}")
    merged = merge_candidates([pool_candidates(root_token, pool_tokens, pool_scores, pool_parents)], [0.0], num_nodes)
    return tree_from_lists(merged.tokens, merged.parents, pool_tokens.device)


def build_tree_on_device(
    root_token: torch.Tensor,
    pool_tokens: torch.Tensor,
    pool_scores: torch.Tensor,
    pool_parents: torch.Tensor,
    num_nodes: int,
    max_depth: int,
) -> DraftTree:
    """`build_tree` without reading anything back: the same tree, derived with tensor ops on the pool's device, so
    a GPU round can go on to verification without waiting for the draft (about 6 kernels per level; no sync).

    Args:
        root_token, pool_tokens, pool_scores, pool_parents, num_nodes: as in `build_tree`; parents are trusted
            (the decoder's own pool), not checked, since checking would read them.
        max_depth: an upper bound on the depth of a pool entry under the root (the draft's levels): the number
            of pointer-chasing passes.

    Returns:
        The DraftTree `build_tree` returns, except that `paths` has max_depth + 1 columns (the deepest a node
        could be; the extra columns are -1), since its width is a shape and the deepest kept node is data.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes counts the root and must be >= 1, got {num_nodes}")
    device, count = pool_tokens.device, pool_tokens.shape[0]
    kept_count = min(num_nodes - 1, count)
    is_top = pool_parents < 0  # [N] children of the root
    parent = pool_parents.to(torch.int64).clamp(min=0)  # [N] valid everywhere; where(is_top, ...) masks the root's
    # Scores clamped to the minimum along each path (as `pool_candidates`), depths counted: one level per pass.
    scores = pool_scores.double().clamp(max=0.0)
    depth = torch.zeros(count, dtype=torch.int64, device=device)
    for _ in range(max_depth - 1):
        scores = torch.where(is_top, scores, torch.minimum(scores, scores[parent]))
        depth = torch.where(is_top, 0, depth[parent] + 1)
    # The best kept_count in a stable descending sort (ties: lower pool index), then back into pool order.
    kept = torch.sort(torch.sort(scores, descending=True, stable=True).indices[:kept_count]).values  # [T-1]
    node_of = torch.zeros(count, dtype=torch.int64, device=device)  # pool index -> tree node (0: not kept, root)
    node_of[kept] = torch.arange(1, kept_count + 1, device=device)
    parents = torch.cat([torch.full((1,), -1, dtype=torch.int64, device=device),
                         torch.where(is_top[kept], 0, node_of[parent[kept]])])  # [T]
    depths = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), depth[kept] + 1])  # [T]
    nodes = kept_count + 1
    # Ancestor mask: each pass adds one more generation (a node's row = itself + its parent's row).
    up = parents.clamp(min=0)  # [T] the root is its own parent here
    eye = torch.eye(nodes, dtype=torch.bool, device=device)
    mask = eye
    for _ in range(max_depth):
        mask = eye | mask[up]
    # paths[i, depth(j)] = j for every ancestor j of i; non-ancestors go to a spare last column that is dropped.
    columns = torch.where(mask, depths[None, :], max_depth + 1)  # [T, T]
    paths = torch.full((nodes, max_depth + 2), -1, dtype=torch.int64, device=device)
    paths.scatter_(1, columns, torch.arange(nodes, device=device).expand(nodes, nodes))
    tokens = torch.cat([root_token.reshape(1).to(torch.int64), pool_tokens[kept].to(torch.int64)])
    return DraftTree(tokens=tokens, parents=parents, depths=depths, mask=mask, paths=paths[:, :max_depth + 1])
