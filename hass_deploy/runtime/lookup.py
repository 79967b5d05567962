"""Prompt lookup: training-free draft trees copied from the token history (the prompt and the output so far).

Text repeats itself: code reuses its identifiers, answers quote the question, lists repeat their structure.
Prompt lookup bets that the tokens ending at the pending root continue the way they did the last times they
occurred. Per round, for n = max_ngram down to min_ngram, each earlier occurrence of the history's trailing
n-gram, most recent first, gives a continuation: the (up to `depth`) tokens that followed it. Continuations are
merged into a trie under the root in that order until the tree has `budget` nodes, so

    * a prefix shared by several continuations is one path, and siblings are distinct tokens: exact rejection
      sampling (`sampling.accept_sampling`) needs that, and greedy acceptance never wastes a row on a duplicate;
    * node order is proposal order: the longest, most recent match is the first child at every level, which is
      the child rejection sampling tries first;
    * no match at all gives the root-only tree: the round is a plain decoding step.

The proposal depends only on the committed history, never on the verifier's random draws, so sampling stays
exact (algorithm.md §4.7: candidates must not depend on U).

Cost: this runs on the host every round, beside target steps of milliseconds, so nothing here may grow with the
history per round. `PromptLookup` keeps an index n-gram -> start positions of the tokens that followed its most
recent occurrences, updated in O(max_ngram) per committed token (`extend`); a proposal reads at most
`RECENT_OCCURRENCES` positions per n-gram size and walks at most `depth` tokens from each, whatever the history's
length. The index is the extension point for occurrence counts or a static corpus.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from hass_deploy.config import LookupConfig
from hass_deploy.errors import ConfigError
from hass_deploy.runtime.tree import DraftTree, tree_from_lists

# Occurrences remembered per n-gram, the most recent ones. A tree of 8 nodes uses at most 7 continuations; twice
# that leaves room for occurrences whose continuations repeat an earlier one's and add no node, while bounding
# the work of a proposal when one n-gram (a newline, an indent) occurs thousands of times.
RECENT_OCCURRENCES = 16


class PromptLookup:
    """The token history of one generation and its n-gram index; proposes a draft tree under the pending root.

    Usage per generation: `extend(prompt + [root])`, then every round `propose(root, budget)`, verify, and
    `extend(accepted tokens + bonus)` so that the history again ends with the pending root.
    """

    def __init__(self, config: LookupConfig = LookupConfig(), device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.history: list[int] = []
        # n-gram (a tuple of n token ids, every n of the config) -> positions p, ascending, such that
        # history[p - n:p] is that n-gram and history[p] exists: where its continuations start.
        self.followers: dict[tuple[int, ...], list[int]] = {}

    def extend(self, tokens: Iterable[int]) -> None:
        """Append committed tokens to the history and index the n-grams they complete a continuation for."""
        history, followers = self.history, self.followers
        low, high = self.config.min_ngram, self.config.max_ngram
        for token in tokens:
            position = len(history)
            history.append(int(token))
            # The new token continues every n-gram that ends just before it; the trailing n-gram (ending at the
            # new token) has no continuation yet, so it is indexed only when the next token arrives.
            for n in range(low, min(high, position) + 1):
                key = tuple(history[position - n:position])
                starts = followers.get(key)
                if starts is None:
                    followers[key] = [position]
                else:
                    starts.append(position)
                    if len(starts) > RECENT_OCCURRENCES:
                        del starts[0]

    def continuations(self, depth: int) -> Iterator[list[int]]:
        """Continuations of the history's trailing n-gram, in proposal order: n from max_ngram down to
        min_ngram, and for each n the most recent occurrence first. Each is the up to `depth` tokens that
        followed one occurrence (fewer where the history ends); an occurrence already given by a longer n-gram
        is not repeated."""
        history, config = self.history, self.config
        seen: set[int] = set()
        for n in range(min(config.max_ngram, len(history)), config.min_ngram - 1, -1):
            for start in reversed(self.followers.get(tuple(history[-n:]), ())):
                if start not in seen:
                    seen.add(start)
                    yield history[start:start + depth]

    def propose(self, root: int, budget: int) -> DraftTree:
        """The draft tree for this round: the continuations merged as a trie, at most `budget` nodes.

        Args:
            root: the pending root token, which must be the last token of the history.
            budget: nodes the tree may have, the root included (>= 1).

        Returns:
            A DraftTree on this lookup's device; the root alone when the trailing n-grams never occurred before.
        """
        if budget < 1:
            raise ValueError(f"budget counts the root and must be >= 1, got {budget}")
        if not self.history or self.history[-1] != root:
            raise ValueError("the history must end with the pending root: extend() it with each round's tokens")
        depth = min(self.config.depth, budget - 1)
        tokens, parents = merge_continuations(root, self.continuations(depth), budget)
        return tree_from_lists(tokens, parents, self.device)


def check_tree_budget(config: LookupConfig, tree_budget: int | None) -> None:
    """Refuse lookup trees larger than a target's fixed verify-step budget (an export's `max_tree_tokens`; None
    for backends without one), before any token is generated rather than at the first large tree."""
    if tree_budget is not None and config.tokens > tree_budget:
        raise ConfigError(f"--lookup-tokens {config.tokens} is more than the artifacts' tree budget ({tree_budget}); "
                          "lower it or export again with a larger --max-tree-tokens")


def merge_continuations(root: int, continuations: Iterable[list[int]], budget: int) -> tuple[list[int], list[int]]:
    """Merge token sequences into a trie under `root`, in the order given, up to `budget` nodes.

    Each continuation is walked from the root: a token that is already a child of the current node is followed,
    any other becomes a new child. So a shared prefix is one path, siblings are distinct tokens, and nodes are
    numbered in the order they were first proposed (parents before children). The merge stops at the first node
    that does not fit, and reads no further continuation (`continuations` may be lazy).

    Args:
        root: the root token.
        continuations: token sequences, each continuing the root, highest priority first.
        budget: the most nodes, the root included (>= 1).

    Returns:
        (tokens, parents): T <= budget token ids with tokens[0] = root, and parent node ids with parents[0] = -1.
    """
    tokens, parents = [root], [-1]
    children: list[dict[int, int]] = [{}]  # per node: child token -> child node id
    if budget <= 1:
        return tokens, parents
    for continuation in continuations:
        node = 0
        for token in continuation:
            child = children[node].get(token)
            if child is None:
                child = len(tokens)
                tokens.append(token)
                parents.append(node)
                children.append({})
                children[node][token] = child
                if len(tokens) == budget:
                    return tokens, parents
            node = child
    return tokens, parents
