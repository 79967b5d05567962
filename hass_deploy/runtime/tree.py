"""The EAGLE-2 dynamic draft tree (algorithm.md §4.3–4.4) as data plus pure functions.

A round of speculative decoding verifies a small token tree in one target forward pass. Node 0 is the root, a
token the target already chose but has not yet put in its KV cache; every other node is a draft guess that
continues its parent. The functions here turn the draft's scored candidate pool into that tree and derive the
tensors verification needs (ancestor mask, depths = position offsets, root-to-node paths).

Everything works on tiny tensors on whatever device the inputs live on. Host syncs are limited to the ones
that produce a Python-visible shape (the tree's maximum depth) or validate an input, and each is marked.
"""

from __future__ import annotations

import math
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


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """Ancestor-or-self relation of a tree given by parent pointers.

    Computed by repeated boolean squaring of the one-step relation (self or parent), so it takes
    ceil(log2(T - 1)) small matrix products and no host sync, whatever the tree's shape.

    Args:
        parents: [T] int64, parents[0] = -1 and 0 <= parents[i] < i for i > 0.

    Returns:
        [T, T] bool, entry [i, j] true iff j is i or an ancestor of i.
    """
    num_nodes = parents.shape[0]
    device = parents.device
    # One step: every node reaches itself and its parent. The root's -1 is skipped by starting at node 1.
    reach = torch.eye(num_nodes, dtype=torch.bool, device=device)  # [T, T]
    child_ids = torch.arange(1, num_nodes, device=device)  # [T-1]
    reach[child_ids, parents[1:]] = True
    # Squaring a reflexive relation doubles the path length it covers; the longest path has T-1 edges. Counts
    # stay below T, so float32 products are exact.
    rounds = math.ceil(math.log2(num_nodes - 1)) if num_nodes > 2 else 0
    for _ in range(rounds):
        as_float = reach.to(torch.float32)
        reach = (as_float @ as_float) > 0  # [T, T]
    return reach


def tree_from_parents(tokens: torch.Tensor, parents: torch.Tensor) -> DraftTree:
    """Build a DraftTree from token ids and parent pointers, deriving depths, mask and paths.

    Args:
        tokens: [T] integer token ids, tokens[0] = root.
        parents: [T] integer node ids, parents[0] = -1 and 0 <= parents[i] < i for i > 0.

    Returns:
        The DraftTree on the inputs' device.

    Raises:
        ValueError: if the shapes differ, T = 0, or the parents do not satisfy the rule above.

    One host sync (validation and the maximum depth, read together).
    """
    if tokens.dim() != 1 or parents.shape != tokens.shape or tokens.shape[0] == 0:
        raise ValueError(f"tokens and parents must be equal-length non-empty 1-D tensors, got "
                         f"{tuple(tokens.shape)} and {tuple(parents.shape)}")
    num_nodes = tokens.shape[0]
    device = tokens.device
    tokens = tokens.to(torch.int64)
    parents = parents.to(device=device, dtype=torch.int64)
    node_ids = torch.arange(num_nodes, device=device)  # [T]

    # Root -1, every other parent a strictly earlier node (which also rules out cycles).
    valid = (parents[0] == -1) & ((parents[1:] >= 0) & (parents[1:] < node_ids[1:])).all()
    # Clamp so that an invalid input cannot index out of range on the device before we get to raise.
    safe_parents = torch.cat([parents[:1], parents[1:].clamp(0, num_nodes - 1)])
    mask = ancestor_mask(safe_parents)  # [T, T]
    depths = mask.sum(dim=-1) - 1  # [T]: the ancestors-or-self count minus the node itself

    # Host sync: the paths' width is a shape, and the validity verdict decides whether to raise.
    is_valid, max_depth = torch.stack([valid.to(torch.int64), depths.max()]).tolist()
    if not is_valid:
        raise ValueError("parents must be -1 for node 0 and an earlier node id for every other node")

    paths = _paths_from_mask(mask, depths, max_depth)
    return DraftTree(tokens=tokens, parents=parents, depths=depths, mask=mask, paths=paths)


def _paths_from_mask(mask: torch.Tensor, depths: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Root-to-node node ids for every node, padded with -1.

    Args:
        mask: [T, T] bool ancestor-or-self relation.
        depths: [T] int64 node depths.
        max_depth: the largest depth, as a host int.

    Returns:
        [T, max_depth + 1] int64, row i = ancestors of i ordered by depth, then i, then -1 padding.
    """
    num_nodes = mask.shape[0]
    device = mask.device
    # Each ancestor j of i sits at column depths[j] of row i (one ancestor per depth). Non-ancestors are all
    # scattered into a spare last column that is cut off afterwards, so their duplicate writes do not matter.
    spare_column = max_depth + 1
    columns = torch.where(mask, depths.unsqueeze(0), spare_column)  # [T, T]
    sources = torch.arange(num_nodes, device=device).expand(num_nodes, num_nodes)  # [T, T]: source j in column j
    padded = torch.full((num_nodes, max_depth + 2), -1, dtype=torch.int64, device=device)
    padded.scatter_(1, columns, sources)
    return padded[:, :spare_column]  # [T, max_depth + 1]


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


def build_tree(
    root_token: torch.Tensor,
    pool_tokens: torch.Tensor,
    pool_scores: torch.Tensor,
    pool_parents: torch.Tensor,
    num_nodes: int,
) -> DraftTree:
    """EAGLE-2 rerank (algorithm.md §4.3 steps 4–6): keep the best pool candidates as an ancestor-closed tree.

    The pool holds every scored candidate of the draft's expansion, in generation order. A child's cumulative
    score is <= its parent's and the parent has the lower pool index, so in a stable descending sort (ties by
    lower index) every parent ranks before its child and any prefix of the ranking is closed under ancestors,
    even with exact ties and -inf scores. Scores are first clamped to the minimum along their path, which is a
    no-op for genuine cumulative log-probs and keeps the closure if rounding ever broke the monotonicity.

    Args:
        root_token: 0-d or [1] int64, the pending root token.
        pool_tokens: [N] int64 candidate token ids.
        pool_scores: [N] float cumulative draft log-prob of each candidate's path.
        pool_parents: [N] int64 pool index of each candidate's parent, -1 for children of the root; each is
            below the candidate's own index.
        num_nodes: tree size T counting the root; if T - 1 > N, all N candidates are kept.

    Returns:
        The DraftTree with min(T, N + 1) nodes, the kept candidates in ascending pool order (so parents precede
        children and siblings keep their generation, i.e. draft-score, order).

    Raises:
        ValueError: if num_nodes < 1.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes counts the root and must be >= 1, got {num_nodes}")
    root = root_token.reshape(1).to(torch.int64)
    pool_parents = pool_parents.to(torch.int64)
    path_scores = _path_minimum(pool_scores, pool_parents)  # [N]
    kept = select_beam(path_scores, num_nodes - 1)  # [K], best first
    kept_ascending = torch.sort(kept).values  # [K]: pool order, parents first
    kept_parent_pool = pool_parents[kept_ascending]  # [K]
    # Node i + 1 holds kept_ascending[i], so a kept parent's node id is its rank among the kept indices plus one.
    parent_rank = torch.searchsorted(kept_ascending, kept_parent_pool.clamp(min=0))  # [K]
    kept_parents = torch.where(kept_parent_pool < 0, 0, parent_rank + 1)  # [K]
    tokens = torch.cat([root, pool_tokens[kept_ascending].to(torch.int64)])  # [K + 1]
    parents = torch.cat([torch.full_like(root, -1), kept_parents])  # [K + 1]
    return tree_from_parents(tokens, parents)


def _path_minimum(scores: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """Each score clamped to the minimum over its ancestors' scores, by pointer jumping (no host sync).

    Args:
        scores: [N] float scores.
        parents: [N] int64 parent index, -1 for top-level entries.

    Returns:
        [N] float, min(scores[i], scores of all ancestors of i).
    """
    count = scores.shape[0]
    if count == 0:
        return scores
    path_minimum = scores
    jump = parents  # [N]: the ancestor 2^r steps up after r rounds, -1 once past the top
    for _ in range(math.ceil(math.log2(count)) if count > 1 else 0):
        has_jump = jump >= 0
        safe_jump = jump.clamp(min=0)
        path_minimum = torch.where(has_jump, torch.minimum(path_minimum, path_minimum[safe_jump]), path_minimum)
        jump = torch.where(has_jump, jump[safe_jump], jump)
    return path_minimum
