"""Logit warping and draft-tree acceptance (algorithm.md §4.6–4.7), as pure functions.

`p` is always the warped target distribution. Draft proposals are deterministic (the draft head's top-k tokens,
or prompt lookup's copied continuations), so the proposal is a point mass and acceptance is recursive rejection
sampling against p alone: it emits exactly the tokens that sampling from the target would, in distribution
(greedy: token for token). Nothing here reads how the tree was proposed, so this holds for any proposer whose
tree has distinct siblings and does not depend on the acceptance's random draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hass_deploy.config import SamplingConfig
from hass_deploy.runtime.tree import DraftTree


@dataclass(frozen=True, eq=False)  # eq=False: a generated __eq__ would compare the path tensor elementwise
class Acceptance:
    """The outcome of verifying one draft tree.

    Attributes:
        path: [a + 1] int64 node ids root..best on the tree's device (the nodes whose KV to keep).
        tokens: the a + 1 committed tree tokens (root first) followed by the bonus token, a + 2 ints on the host.
        nodes: `path` on the host.
        leaf: whether the deepest accepted node has no children in the tree (depth a + 1 was not tried).
    """

    path: torch.Tensor
    tokens: list[int]
    nodes: tuple[int, ...]
    leaf: bool

    @property
    def in_place(self) -> bool:
        """The kept rows are already where they belong (nodes 0..a: a chain accepted whole, or a root alone),
        so compacting them would copy every row onto itself."""
        return self.nodes[-1] == len(self.nodes) - 1

    @property
    def accepted(self) -> int:
        """a, the number of accepted draft tokens (root and bonus excluded)."""
        return len(self.tokens) - 2

    @property
    def bonus(self) -> int:
        """The target's own next token after the accepted path; the root of the next tree."""
        return self.tokens[-1]


def warp_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Apply Hugging Face `generate`'s sampling warpers, bit for bit, in its order.

    Temperature (divide), then top-k (`TopKLogitsWarper`: drop scores below the k-th largest, so ties at the
    boundary survive), then top-p (`TopPLogitsWarper`: ascending sort, cumulative softmax, drop where it is
    <= 1 - top_p, always keep the most likely token). The operations mirror transformers' own, including its
    sort call, so removed sets and float values agree exactly. For a greedy config, every token but the
    argmax (first one on ties, like `torch.argmax`) is removed: the temperature -> 0 limit, so that sampling
    from the result is greedy decoding.

    Args:
        logits: [..., V] raw target logits, any float dtype.
        config: the sampling configuration.

    Returns:
        [..., V] float32 logits with -inf at removed tokens.
    """
    # HF casts the last-position logits to float32 before any processor.
    scores = logits.to(torch.float32)
    if config.greedy:
        best = scores.argmax(dim=-1, keepdim=True)  # [..., 1]
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, best, True)  # [..., V]
        return scores.masked_fill(~keep, -math.inf)
    if config.temperature != 1.0:
        scores = scores / config.temperature
    if config.top_k > 0:
        top_k = min(config.top_k, scores.shape[-1])
        kth_best = torch.topk(scores, top_k)[0][..., -1, None]  # [..., 1]
        scores = scores.masked_fill(scores < kth_best, -math.inf)
    if config.top_p < 1.0:
        sorted_scores, sorted_indices = torch.sort(scores, descending=False)  # [..., V], least likely first
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [..., V]
        sorted_remove = cumulative <= (1 - config.top_p)
        sorted_remove[..., -1:] = False  # the most likely token always stays
        remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)  # back to vocabulary order
        scores = scores.masked_fill(remove, -math.inf)
    return scores


def target_probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The warped target distribution p.

    Args:
        logits: [..., V] raw target logits.
        config: the sampling configuration (greedy gives a one-hot at the argmax).

    Returns:
        [..., V] float32 probabilities, exactly 0 at removed tokens.
    """
    return warp_logits(logits, config).softmax(dim=-1)


def sample_token(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per distribution with `torch.multinomial`.

    Args:
        probs: [V] or [..., V] non-negative weights (need not sum to 1; each row needs positive mass).
        generator: random source on probs' device, or None for torch's default.

    Returns:
        int64 token ids of shape probs.shape[:-1] (0-d for a [V] input), on probs' device.
    """
    flat = probs.reshape(-1, probs.shape[-1])  # [B, V]: multinomial takes at most 2-D input
    drawn = torch.multinomial(flat, 1, generator=generator)  # [B, 1]
    return drawn.reshape(probs.shape[:-1])


def accept_greedy(tree: DraftTree, target_tokens: torch.Tensor) -> Acceptance:
    """Greedy acceptance (algorithm.md §4.6): keep the longest tree path the target's argmax agrees with.

    Args:
        tree: the verified draft tree.
        target_tokens: [T] int64, the target's argmax at each tree node (its prediction for the next token).

    Returns:
        The Acceptance; its bonus is the target's argmax at the deepest accepted node.
    """
    if target_tokens.shape != (tree.num_nodes,):
        raise ValueError(f"target_tokens must have shape [{tree.num_nodes}], got {tuple(target_tokens.shape)}")
    if tree.num_nodes == 1:  # plain decoding: the root, then the target's token; a few microseconds count here
        return Acceptance(path=tree.paths[0], tokens=[int(tree.tokens[0]), int(target_tokens[0])], nodes=(0,),
                          leaf=True)
    # The one host sync: the tree and the target's choices, 3T ints read together; the walk is then a few
    # Python operations, not a dozen tiny kernels.
    tokens, parents, chosen = torch.stack([tree.tokens, tree.parents,
                                           target_tokens.to(device=tree.tokens.device, dtype=torch.int64)]).tolist()
    # A non-root node is accepted when its parent is and it is what the target predicts after its parent. Accepted
    # nodes form one chain (siblings are distinct tokens, at most one equals the argmax); if they did not, the
    # deepest accepted node with the lowest id wins, so the choice stays deterministic on any input.
    depth, best = [0] * len(tokens), 0
    accepted = [True] + [False] * (len(tokens) - 1)
    for node in range(1, len(tokens)):
        parent = parents[node]
        if accepted[parent] and tokens[node] == chosen[parent]:
            accepted[node], depth[node] = True, depth[parent] + 1
            if depth[node] > depth[best]:
                best = node
    path = [best]
    while path[-1] != 0:
        path.append(parents[path[-1]])
    path.reverse()
    return Acceptance(path=torch.tensor(path, dtype=torch.int64, device=tree.tokens.device),
                      tokens=[tokens[node] for node in path] + [chosen[best]], nodes=tuple(path),
                      leaf=best not in parents)


def accept_sampling(
    tree: DraftTree,
    probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Acceptance:
    """Exact recursive rejection sampling of a draft tree (algorithm.md §4.7, EAGLE HEAD's fixed version).

    From the root, try the current node's children in node order (= draft-score order); accept child c with
    probability p(c) / (1 - mass of the already-rejected siblings); on rejection remove c from p. Accepting
    moves to c and repeats with c's own distribution. When no child is accepted (all rejected, or a leaf),
    the bonus is drawn from that node's residual distribution: p with the rejected children removed,
    renormalised. The emitted tokens are then distributed exactly as sampling from p token by token.

    Randomness: one Uniform[0, 1) per non-root node is drawn up front (each child is tested at most once, so
    each test still uses a fresh, independent uniform), then one multinomial draw for the bonus; the result is
    a deterministic function of the generator's state.

    Args:
        tree: the verified draft tree; siblings must be distinct tokens (top-k and lookup's trie guarantee it).
        probs: [T, V] warped target distribution at each node (`target_probs` of the verify logits); rows may
            be unnormalised, they are treated as proportional to p.
        generator: random source on probs' device, or None for torch's default.

    Returns:
        The Acceptance.

    Raises:
        ValueError: if two siblings hold the same token. Rejecting the first removes the token from p, so testing
            the second against its original p(c) would over-emit it: the output would no longer follow p.

    Two host syncs: one to bring the children's probabilities and the uniforms over (never the [T, V] matrix)
    for the walk, one to read the bonus token.
    """
    num_nodes = tree.num_nodes
    if probs.dim() != 2 or probs.shape[0] != num_nodes:
        raise ValueError(f"probs must have shape [{num_nodes}, V], got {tuple(probs.shape)}")
    device = probs.device
    tokens = tree.tokens.to(device)
    parents = tree.parents.to(device)
    child_probs = probs[parents[1:], tokens[1:]]  # [T-1]: p(node) under its parent's row
    uniforms = torch.rand(num_nodes - 1, generator=generator, device=device, dtype=torch.float64)  # [T-1]
    node_mass = probs.sum(dim=-1, dtype=torch.float64)  # [T]: normaliser of each row
    node_support = torch.count_nonzero(probs, dim=-1)  # [T]: how many tokens have positive mass
    # Host sync 1: everything the walk needs, as one small float64 vector (token ids < 2^53 are exact).
    host = torch.cat([tokens, parents, child_probs, uniforms, node_mass, node_support]).to(torch.float64).tolist()
    host_tokens = [int(value) for value in host[:num_nodes]]
    host_parents = [int(value) for value in host[num_nodes: 2 * num_nodes]]
    host_child_probs = host[2 * num_nodes: 3 * num_nodes - 1]
    host_uniforms = host[3 * num_nodes - 1: 4 * num_nodes - 2]
    host_mass = host[4 * num_nodes - 2: 5 * num_nodes - 2]
    host_support = [int(value) for value in host[5 * num_nodes - 2:]]

    children: list[list[int]] = [[] for _ in range(num_nodes)]
    for node in range(1, num_nodes):
        children[host_parents[node]].append(node)  # ascending node order = the order they are tried in
    if any(len({host_tokens[child] for child in siblings}) < len(siblings) for siblings in children):
        raise ValueError("a draft tree's siblings must be distinct tokens for exact rejection sampling")

    node = 0
    path_nodes = [0]
    while True:
        candidates = children[node]
        choice = _first_accepted_child(
            child_probs=[host_child_probs[child - 1] for child in candidates],
            uniforms=[host_uniforms[child - 1] for child in candidates],
            node_mass=host_mass[node],
            node_support=host_support[node],
        )
        if choice is None:
            break
        node = candidates[choice]
        path_nodes.append(node)

    # The walk stopped at `node` with every child rejected (none, for a leaf): the bonus comes from its residual.
    residual = _residual(probs[node], tokens, parents == node) if children[node] else probs[node]  # [V]
    bonus = sample_token(residual, generator)
    committed = [host_tokens[path_node] for path_node in path_nodes]
    path = tree.paths[node, : len(path_nodes)]  # [a + 1], on the tree's device
    return Acceptance(path=path, tokens=committed + [int(bonus)], nodes=tuple(path_nodes),  # host sync 2: the bonus
                      leaf=not children[node])


def _first_accepted_child(
    child_probs: list[float],
    uniforms: list[float],
    node_mass: float,
    node_support: int,
) -> int | None:
    """Rejection-sample a node's children in order; returns the position of the accepted one, or None.

    Child c is accepted iff u < p(c) / (mass not yet rejected), which happens with exactly that probability
    for u ~ Uniform[0, 1). Strict `<` makes a child with p(c) = 0 always rejected (rejecting it leaves the
    residual unchanged, so it is simply skipped).

    Rounding guard: if c is the last token with positive mass not yet rejected, the exact ratio is 1 and c is
    accepted without a test. Rounding could otherwise push the computed ratio just below 1, reject c, and
    leave an all-zero residual to draw the bonus from (a crash on CPU, garbage on GPU). The support count is
    exact, so this changes no probability: it only replaces a rounded 1 by an exact 1. For the same reason
    the denominator is clamped to at least p(c) (a ratio never exceeds 1).

    Args:
        child_probs: unnormalised p(c) of each child, in the order they are tried.
        uniforms: one Uniform[0, 1) draw per child.
        node_mass: sum of the node's unnormalised p over the vocabulary.
        node_support: number of vocabulary tokens with p > 0 at the node.

    Returns:
        The index into child_probs of the accepted child, or None when all are rejected.
    """
    remaining_mass = node_mass
    remaining_support = node_support
    for position, (probability, uniform) in enumerate(zip(child_probs, uniforms)):
        if probability <= 0:
            continue
        if remaining_support <= 1:
            return position
        if uniform < probability / max(remaining_mass, probability):
            return position
        remaining_mass -= probability
        remaining_support -= 1
    return None


def _residual(node_probs: torch.Tensor, tokens: torch.Tensor, is_rejected: torch.Tensor) -> torch.Tensor:
    """A node's distribution with its rejected children removed (unnormalised; multinomial renormalises).

    Args:
        node_probs: [V] p at the node.
        tokens: [T] tree token ids.
        is_rejected: [T] bool, the node's children (all of them were rejected when this is called).

    Returns:
        [V] p with the rejected tokens set to 0.
    """
    # Scatter the rejected flags onto the vocabulary without a host round trip (index_add, not a bool gather).
    rejected_hits = torch.zeros_like(node_probs).index_add_(0, tokens, is_rejected.to(node_probs.dtype))  # [V]
    return node_probs.masked_fill(rejected_hits > 0, 0.0)
