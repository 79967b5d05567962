"""Proposers: where a round's draft tree comes from, behind one protocol the decode loop (`decoder.py`) calls.

A proposer is made when a request starts, after its prefill, and holds that request's drafting state. Per round:

    tree, draft_ran = proposer.propose(root, room, tokens_left)     a tree under the pending root
    ... the loop verifies the tree (target.step) and accepts a path (sampling.accept_*) ...
    proposer.observe(accepted, committed, hidden)                   what the target committed

    root:        0-d int64 on the target's device, the token the target chose last (not yet in its KV cache)
    room:        KV rows left (>= 2: with one row left the loop verifies the root alone, and only observes)
    tokens_left: tokens the request may still emit (`max_new_tokens` minus those it emitted)
    tree:        `tree.DraftTree` on the target's device, at most `room` nodes; draft_ran: whether the draft head
                 stepped this round (statistics: `GenerationResult.draft_rounds`)
    accepted:    the round's `sampling.Acceptance` (path [a+1] on the device, its nodes and tokens on the host)
    committed:   [a+1] int64 on the device, the committed tokens after the root: the accepted ones and the bonus
    hidden:      [1, T, H] the verify step's features of every tree node (a proposer that keeps some indexes them)

A proposer never calls the target, and the loop owns verification, acceptance, compaction and statistics, so
that one loop serves every tree source, and a later batch of requests can propose per request and verify together.

The tree sources:
    RootOnly        the root alone: plain decoding, one target step per token (what every speedup is measured against)
    DraftProposer   the draft head's EAGLE-2 tree (algorithm.md §4.3): context pass, top-k levels, rerank
    LookupProposer  prompt lookup's tree from n-gram counts of the history (`lookup.py`); no draft needed
    HybridProposer  both drafters' candidates reranked into one tree, the draft run only when it pays (`hybrid.py`)

Exactness: every proposal depends only on committed tokens and earlier rounds' outcomes, never on the current
round's random draws, so rejection sampling stays exact (algorithm.md §4.7) and greedy output is plain decoding's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import torch

from hass_deploy.config import HybridConfig, LookupConfig, TreeConfig
from hass_deploy.runtime import tree as trees
from hass_deploy.runtime.backends.base import DraftBackend
from hass_deploy.runtime.hybrid import LOOKUP, HybridPlanner
from hass_deploy.runtime.lookup import NgramCache, PromptLookup
from hass_deploy.runtime.sampling import Acceptance
from hass_deploy.runtime.tree import Candidates, DraftTree, MergedTree


class Proposer(Protocol):
    """One request's tree source (see the module docstring for the arguments)."""

    def propose(self, root: torch.Tensor, room: int, tokens_left: int) -> tuple[DraftTree, bool]:
        """This round's tree under `root`, at most `room` nodes; and whether the draft head ran."""
        ...

    def observe(self, accepted: Acceptance, committed: torch.Tensor, hidden: torch.Tensor) -> None:
        """Take in what the round committed, whichever tree was verified (a root-only one included)."""
        ...


class RootOnly:
    """Plain decoding's tree: the root alone. Its constant tensors are made once per request and every round only
    swaps the token in, so a plain round costs one target step and nothing that grows with the context."""

    def __init__(self, root: torch.Tensor):
        self.tree = trees.root_only(root.view(1))

    def propose(self, root: torch.Tensor, room: int, tokens_left: int) -> tuple[DraftTree, bool]:
        return replace(self.tree, tokens=root.view(1)), False

    def observe(self, accepted: Acceptance, committed: torch.Tensor, hidden: torch.Tensor) -> None:
        pass


class DraftProposer:
    """The draft head's EAGLE-2 tree, and the committed pairs the draft has not seen yet.

    The draft's KV cache holds only verified context: each context pass takes the pairs (f_t, x_{t+1}) committed
    since the last one, the target's features of token t and the token after it. They wait in `pending`, a list
    of (features [1, n, H], next tokens [n]) per round, so that rounds without the draft (hybrid) append instead of
    copying the backlog; the invariant is `draft_len + pending_rows` = the target's committed rows.
    """

    def __init__(self, draft: DraftBackend, config: TreeConfig, vocab_size: int, device: torch.device,
                 on_device: bool, features: torch.Tensor, next_tokens: torch.Tensor):
        """
        Args:
            draft: the draft backend; its KV rows [0, draft_len) are this request's.
            config: the tree's budget (nodes, depth, top-k).
            vocab_size: the target's; top-k is clamped to it.
            device: the target's, where trees and positions live.
            on_device: build the tree with tensor ops where the pool is (`tree.build_tree_on_device`, no host read:
                on a GPU the round's one sync is then the acceptance read), else on the host (faster on a CPU).
            features, next_tokens: the prompt's pairs, [1, P, H] prefill features and [P] tokens (the root last).
        """
        self.draft, self.config, self.device, self.on_device = draft, config, device, on_device
        self.top_k = min(config.top_k, vocab_size)
        self.pending = [(features, next_tokens)]
        self.pending_rows = next_tokens.shape[0]  # host ints: shapes, no sync
        self.last_rows = 1  # rows the last round committed (the first round: its root's)
        self.draft_len = 0  # rows in the draft's KV cache

    @property
    def backlog(self) -> int:
        """Rows the next context pass would take beyond the last round's own: the prompt in the first round, and
        what accumulates while the draft does not run (the hybrid planner's catch-up cost)."""
        return self.pending_rows - self.last_rows

    def propose(self, root: torch.Tensor, room: int, tokens_left: int) -> tuple[DraftTree, bool]:
        budget = min(self.config.tokens, room)
        pool = self.grow(root, budget)
        tree = (trees.build_tree_on_device(root, *pool, budget, min(self.config.depth, budget - 1))
                if self.on_device else trees.build_tree(root, *pool, budget))
        return tree, True

    def observe(self, accepted: Acceptance, committed: torch.Tensor, hidden: torch.Tensor) -> None:
        # [1, a+1, H] verified features of the committed nodes (a copy: the backend reuses its outputs)
        self.pending.append((hidden[:, accepted.path], committed))
        self.pending_rows += committed.shape[0]
        self.last_rows = committed.shape[0]

    def grow(self, root: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EAGLE-2 tree growth (algorithm.md §4.3): a context pass over the committed pairs the draft has not seen
        (which empties `pending`), then `depth - 1` levels that each expand the `top_k` best nodes by cumulative
        draft log-probability.

        Args:
            root: 0-d int64, the pending root.
            budget: the verify step's nodes (>= 2), which fit the target's KV rows; the depth is clamped to it.

        Returns the candidate pool (`tree.pool_candidates`' inputs): tokens [N], cumulative log-probs [N] and
        parent pool indices [N] (-1 under the root), in generation order.
        """
        draft, device, top_k, pending, draft_len = self.draft, self.device, self.top_k, self.pending, self.draft_len
        depth = min(self.config.depth, budget - 1)
        features = pending[0][0] if len(pending) == 1 else torch.cat([f for f, _ in pending], dim=1)  # [1, n, H]
        tokens = pending[0][1] if len(pending) == 1 else torch.cat([t for _, t in pending])  # [n]
        n = tokens.numel()
        # Context pass: pairs (f_t, x_{t+1}) at positions t; the draft's KV keeps only verified context.
        out = draft.step(features, tokens[None], torch.arange(draft_len, draft_len + n, device=device)[None],
                         draft_len, None, top_k)
        committed = draft_len + n
        self.pending, self.pending_rows, self.draft_len = [], 0, committed  # the pass took every pending pair
        scores, beam_tokens = out.logprobs[0, -1], out.tokens[0, -1]  # [K] children of the root
        pool_tokens, pool_scores = [beam_tokens], [scores]
        pool_parents = [torch.full((top_k,), -1, dtype=torch.long, device=device)]
        beam_pool = torch.arange(top_k, device=device)  # pool index of each beam node
        beam_features = out.hidden[:, -1:].expand(1, top_k, -1)  # [1, K, H] each node's parent output
        level_mask = torch.eye(top_k, dtype=torch.bool, device=device)  # [K, K] rows of the current beam
        pool_size = top_k
        for level in range(1, depth):
            # All K beam nodes of this level share position committed + level - 1; their rows go after earlier levels.
            positions = torch.full((1, top_k), committed + level - 1, dtype=torch.long, device=device)
            out = draft.step(beam_features, beam_tokens[None], positions, committed + (level - 1) * top_k,
                             level_mask[None], top_k)
            cumulative = (out.logprobs[0] + scores[:, None]).flatten()  # [K*K] path log-probs of all children
            children = out.tokens[0].flatten()  # [K*K]
            pool_tokens.append(children)
            pool_scores.append(cumulative)
            pool_parents.append(beam_pool.repeat_interleave(top_k))
            best = trees.select_beam(cumulative, top_k)  # [K] next beam, as indices into this level's K*K
            parent = best // top_k  # [K] which current beam node each comes from
            scores, beam_tokens = cumulative[best], children[best]
            beam_pool = pool_size + best
            beam_features = out.hidden[:, parent]  # [1, K, H]
            level_mask = torch.cat([level_mask[parent], torch.eye(top_k, dtype=torch.bool, device=device)], dim=1)
            pool_size += top_k * top_k
        return torch.cat(pool_tokens), torch.cat(pool_scores), torch.cat(pool_parents)


class LookupProposer:
    """Prompt lookup's tree (`lookup.py`): n-gram statistics of the history, the prompt and every committed token,
    kept on the host so that a proposal reads nothing from the device. The history always ends with the pending
    root, which is where a proposal grows from."""

    def __init__(self, config: LookupConfig, device: torch.device, corpus: NgramCache | None, history: list[int]):
        """history: the prompt and the first root, as host ints."""
        self.config = config
        self.lookup = PromptLookup(config, device, corpus)
        self.lookup.extend(history)

    def candidates(self, budget: int) -> Candidates:
        """Lookup's candidates under the pending root, at most `budget` nodes (the root included)."""
        return self.lookup.candidates(self.lookup.history[-1], budget)

    def propose(self, root: torch.Tensor, room: int, tokens_left: int) -> tuple[DraftTree, bool]:
        return self.lookup.propose(self.lookup.history[-1], min(self.config.tokens, room)), False

    def observe(self, accepted: Acceptance, committed: torch.Tensor, hidden: torch.Tensor) -> None:
        self.lookup.extend(accepted.tokens[1:])  # the committed tokens and the new root (host ints: no sync)


class HybridProposer:
    """Both drafters' candidates in one tree (`hybrid.py`): lookup's every round, the draft head's when the planner
    expects it to pay for its steps, reranked together with each drafter's calibration."""

    def __init__(self, lookup: LookupProposer, draft: DraftProposer, config: HybridConfig, chain: bool = False):
        """chain: verify the merged tree's best path only (two drafters' chains still branch where they differ)."""
        self.lookup, self.draft, self.config, self.chain = lookup, draft, config, chain
        self.planner = HybridPlanner(config)
        # The proposed round, for the planner once it is verified: (merged tree, lookup's candidates, whether the
        # draft ran, its catch-up rows); None when the loop verified the root alone instead.
        self.round: tuple[MergedTree, Candidates, bool, int] | None = None

    def propose(self, root: torch.Tensor, room: int, tokens_left: int) -> tuple[DraftTree, bool]:
        budget = min(self.config.tokens, room)
        found = self.lookup.candidates(budget)
        catch_up = self.draft.backlog
        draft_ran = self.planner.wants_draft(found, catch_up, tokens_left)
        if draft_ran:
            drafted = trees.pool_candidates(root, *self.draft.grow(root, budget))
            offsets = self.planner.offsets()
            merged = trees.merge_candidates([drafted, found], offsets, budget)
            if self.chain:
                merged = trees.merged_path(merged, offsets)
        else:  # without the draft's candidates the merge is lookup's own tree: no trie, no rerank
            merged = trees.merged_alone(found, sources=2, source=LOOKUP)
        self.round = (merged, found, draft_ran, catch_up)
        return trees.tree_from_lists(merged.tokens, merged.parents, self.draft.device), draft_ran

    def observe(self, accepted: Acceptance, committed: torch.Tensor, hidden: torch.Tensor) -> None:
        self.lookup.observe(accepted, committed, hidden)
        self.draft.observe(accepted, committed, hidden)
        if self.round is not None:
            merged, found, draft_ran, catch_up = self.round
            self.planner.record(merged, accepted.nodes, found, draft_ran, catch_up)
            self.round = None
