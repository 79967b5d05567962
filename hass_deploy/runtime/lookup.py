"""Prompt lookup: training-free draft trees from n-gram statistics of the token history (the prompt and the output
so far), and optionally of a static corpus of token ids.

Text repeats itself: code reuses its identifiers, answers quote the question, lists repeat their structure, and a
small model's greedy output loops. `NgramCache` counts, for every n-gram of the history (n = min_ngram..max_ngram),
which tokens followed it and how often. A node's continuations are read from the longest n-gram ending at that node
(the history plus the node's path) that has occurred before: its followers, most frequent first (ties: most recent
first), each with the estimate count / total. `PromptLookup` grows a tree best-first under the pending root: the
next node is always the candidate with the highest product of estimates along its path, so one confident match
becomes a deep chain and an uncertain one spends the budget on alternatives; siblings are distinct tokens, which
exact rejection sampling (`sampling.accept_sampling`) needs.

Chosen by replaying the quickstart target's greedy outputs (20 prompts x 128 tokens on each of the held-out set and
the four shared prompt sets; docs/RESULTS.md, "Prompt lookup and hybrid drafting"): with 8 nodes, counts and
best-first growth raised tau from 4.36 to 5.44 on held-out source and from 3.24 to 3.55 on MT-bench over copying
the most recent occurrences' continuations (most of it from depth: the budget goes to one long chain when the
statistics agree); n-grams 1..4 were within 0.06 of 1..3 and 1..5, and 2 branches per node within 0.02 of 4
(`benchmarks/lookup_replay.py`).

The proposal depends only on the committed history, never on the verifier's random draws, so sampling stays exact
(algorithm.md §4.7: candidates must not depend on U).

Cost: this runs on the host every round, beside target steps of milliseconds. `extend` is O(max_ngram) dict updates
per committed token (each keeping its n-gram's best followers in order, O(branches)); a proposal expands at most
`budget` nodes, each reading at most max_ngram - min_ngram + 1 dict entries and `branches` followers. Nothing grows
with the history's length.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from hass_deploy.config import GenerationConfig, LookupConfig
from hass_deploy.errors import ConfigError, HassDeployError
from hass_deploy.runtime.tree import Candidates, DraftTree, tree_from_lists


class NgramCache:
    """Next-token counts of every n-gram of a growing token sequence, n in [min_ngram, max_ngram].

    `followers[ngram]` maps each token that followed the n-gram to [count, position of its latest occurrence],
    `totals[ngram]` is the sum of those counts, and `best[ngram]` lists its `branches` best followers, most frequent
    first, ties broken by the latest occurrence. The sequence's trailing n-grams have no follower yet: they are
    counted when the next token arrives.

    `best` is kept up to date as tokens arrive, in O(branches) per n-gram: a new occurrence raises only its own
    token's (count, position), and that token is the most recent of all, so the new best list is the old one
    with this token moved up to its place (or in, pushing the last out). A proposal then never reads more than
    `branches` followers of an n-gram, however many distinct ones it has (a newline in a long code file).
    """

    def __init__(self, min_ngram: int, max_ngram: int, branches: int):
        self.min_ngram, self.max_ngram, self.branches = min_ngram, max_ngram, branches
        self.tokens: list[int] = []
        self.followers: dict[tuple[int, ...], dict[int, list[int]]] = {}
        self.totals: dict[tuple[int, ...], int] = {}
        self.best: dict[tuple[int, ...], list[int]] = {}
        self.source = "the corpus"  # where the tokens came from, for messages

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens; each is counted as the follower of the n-grams that end just before it."""
        history, followers, totals, best = self.tokens, self.followers, self.totals, self.best
        for token in tokens:
            token, position = int(token), len(history)
            for n in range(self.min_ngram, min(self.max_ngram, position) + 1):
                key = tuple(history[position - n:position])
                entry = followers.get(key)
                if entry is None:
                    followers[key], totals[key], best[key] = {token: [1, position]}, 1, [token]
                    continue
                seen = entry.get(token)
                if seen is None:
                    entry[token] = seen = [1, position]
                else:
                    seen[0] += 1
                    seen[1] = position
                totals[key] += 1
                ranked = best[key]
                if token in ranked:
                    ranked.remove(token)
                place = len(ranked)  # above every follower seen less often; on equal counts this one is newer
                while place and entry[ranked[place - 1]][0] <= seen[0]:
                    place -= 1
                ranked.insert(place, token)
                del ranked[self.branches:]
            history.append(token)

    def continuations(self, context: Sequence[int]) -> list[tuple[int, float]]:
        """The followers of the longest n-gram ending `context` that has any: up to `branches` (token, count /
        total) pairs, most frequent first, ties broken by the latest occurrence. Empty when no n-gram of the
        context occurred before."""
        for n in range(min(self.max_ngram, len(context)), self.min_ngram - 1, -1):
            key = tuple(context[-n:])
            ranked = self.best.get(key)
            if ranked:
                entry, total = self.followers[key], self.totals[key]
                return [(token, entry[token][0] / total) for token in ranked]
        return []

    @classmethod
    def from_file(cls, path: str | Path, config: LookupConfig) -> "NgramCache":
        """A static corpus: token ids in a `.npy` file (a 1-D integer array) or a text file of whitespace-separated
        ids, counted once. Refused in one line when missing or malformed."""
        import numpy

        path = Path(path)
        if not path.is_file():
            raise HassDeployError(f"--lookup-corpus {path}: no such file")
        try:
            if path.suffix == ".npy":
                ids = numpy.load(path, allow_pickle=False)
            else:
                ids = numpy.array(path.read_text().split(), dtype=numpy.int64)
        except (ValueError, OSError) as err:
            raise HassDeployError(f"--lookup-corpus {path}: not token ids ({err})") from None
        if ids.ndim != 1 or not numpy.issubdtype(ids.dtype, numpy.integer) or (ids.size and ids.min() < 0):
            raise HassDeployError(f"--lookup-corpus {path}: expected a 1-D array of non-negative integer token ids, "
                                  f"got shape {ids.shape} of {ids.dtype}")
        cache = cls(config.min_ngram, config.max_ngram, config.branches)
        cache.extend(ids.tolist())
        cache.source = str(path)
        return cache

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse a static corpus with ids the target does not have (they would be proposed and crash a step)."""
        highest = max(self.tokens, default=-1)
        if highest >= vocab_size:
            raise HassDeployError(f"--lookup-corpus {self.source}: token id {highest} is outside the target's "
                                  f"vocabulary (size {vocab_size})")


class PromptLookup:
    """The n-gram drafter of one generation: the history's cache (and a shared static corpus cache, if any).

    Usage per generation: `extend(prompt + [root])`, then every round `propose(root, budget)` (or `candidates`),
    verify, and `extend(accepted tokens + bonus)` so that the history again ends with the pending root.
    """

    def __init__(self, config: LookupConfig = LookupConfig(), device: torch.device | str = "cpu",
                 corpus: NgramCache | None = None):
        self.config = config
        self.device = torch.device(device)
        self.cache = NgramCache(config.min_ngram, config.max_ngram, config.branches)
        self.corpus = corpus

    @property
    def history(self) -> list[int]:
        return self.cache.tokens

    def extend(self, tokens: Iterable[int]) -> None:
        self.cache.extend(tokens)

    def _continuations(self, context: Sequence[int]) -> list[tuple[int, float]]:
        """The history's statistics first; the static corpus only where the history has no match."""
        found = self.cache.continuations(context)
        if not found and self.corpus is not None:
            found = self.corpus.continuations(context)
        return found

    def candidates(self, root: int, budget: int) -> Candidates:
        """Grow the tree best-first: at most `budget` nodes (root included), at most `config.depth` deep; a node's
        score is the log of the product of the count estimates along its path.

        Args:
            root: the pending root token, which must be the last token of the history.
            budget: nodes the tree may have, the root included (>= 1).
        """
        if budget < 1:
            raise ValueError(f"budget counts the root and must be >= 1, got {budget}")
        history = self.cache.tokens
        if not history or history[-1] != root:
            raise ValueError("the history must end with the pending root: extend() it with each round's tokens")
        span = self.config.max_ngram
        tokens, parents, scores, depths = [root], [-1], [0.0], [0]
        tails = [tuple(history[-span:])]  # per node: the last max_ngram tokens of history + path
        frontier: list[tuple[float, int, int, int]] = []  # (-log path prob, order, parent node, token): a min-heap
        order = 0

        def expand(node: int) -> None:
            nonlocal order
            if depths[node] >= self.config.depth:
                return
            for token, estimate in self._continuations(tails[node]):
                order += 1  # equal scores: the earlier proposal first, so the tree is deterministic
                heapq.heappush(frontier, (-(scores[node] + math.log(estimate)), order, node, token))

        expand(0)
        while frontier and len(tokens) < budget:
            negative, _, parent, token = heapq.heappop(frontier)
            tokens.append(token)
            parents.append(parent)
            scores.append(-negative)
            depths.append(depths[parent] + 1)
            tails.append((tails[parent] + (token,))[-span:])
            expand(len(tokens) - 1)
        return Candidates(tokens, parents, scores)

    def propose(self, root: int, budget: int) -> DraftTree:
        """The draft tree for this round (see `candidates`), on this lookup's device; the root alone when no
        n-gram of the history's end occurred before."""
        found = self.candidates(root, budget)
        return tree_from_lists(found.tokens, found.parents, self.device)


def check_tree_budget(config: GenerationConfig, with_draft: bool, tree_budget: int | None) -> None:
    """Refuse prompt lookup's and hybrid trees larger than a target's fixed verify-step budget (an export's
    `max_tree_tokens`; None for backends without one), before any token is generated rather than at the first
    large tree."""
    if config.lookup is None or tree_budget is None:
        return
    sizes = [("--lookup-tokens", config.lookup.tokens)] + ([("--hybrid-tokens", config.hybrid.tokens)] if with_draft else [])
    for option, tokens in sizes:
        if tokens > tree_budget:
            raise ConfigError(f"{option} {tokens} is more than the artifacts' tree budget ({tree_budget}); "
                              "lower it or export again with a larger --max-tree-tokens")
