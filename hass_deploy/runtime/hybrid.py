"""Hybrid drafting: the draft head's EAGLE-2 candidates and prompt lookup's n-gram candidates in one verified tree.

The two drafters win on different text: a trained draft on text like its training data, prompt lookup wherever
the output repeats the context. Per round (`decoder.py`):

    found   = prompt lookup's candidates under the pending root                      (host, microseconds)
    drafted = the draft head's pool, only if `HybridPlanner.wants_draft(found)`        (draft steps)
    tree    = tree.merge_candidates([drafted, found], planner.offsets(), budget)      (one rerank, shared
              prefixes counted once)
    verify, accept, `planner.record(...)`

Calibration. Each drafter scores its nodes with a log-probability that the node's path is right: the draft head's
cumulative log-softmax, prompt lookup's product of n-gram count ratios. Neither is calibrated (a 3-gram seen once
says 1.0), and how far off each is depends on the text. The planner keeps, per drafter, decayed sums over the
verified trees of what its scores predicted (the sum of its nodes' path probabilities: the expected number of its
nodes accepted) and of what was accepted (its nodes on the accepted path); their ratio is its calibration factor,
added in log space before the rerank. So the budget goes, node by node, to whichever drafter has been accepting on
this request: on text where one drafter is useless its factor falls and the other gets the budget.

When the draft head runs. Its tree costs draft steps (`HybridConfig.draft_cost`, in verify steps), lookup's costs
nothing. What the draft adds is mostly the tokens accepted where lookup's guess was wrong, so its expected gain in a
round is (1 - p1) * rate: p1 the calibrated probability that one of lookup's first-level nodes is accepted, and
rate the tokens the draft alone got accepted per unit of (1 - p1), over the rounds it ran (decayed, from an
optimistic prior, so a new request tries it and a request whose text changes tries it again after a while).

What counts is the request's tokens per second: a ratio, tokens over time. An action raises a ratio exactly when
its own ratio beats it, so the draft runs when gain / cost > R, R being the request's own recent tokens per verify
step (decayed, with the draft's costs in it): comparing the gain with this round's E_n + 1 instead (what lookup
would give without the draft) ran the draft in every round where lookup had little, at 0.7 steps for 2 tokens,
below the 3.5-5.5 tokens a step that lookup makes on average on those requests: hybrid was 0.87x lookup
(docs/RESULTS.md, History, 2026-11-28, the first hybrid planner). R is a blend of the request's recent rounds
and a prior (`HybridConfig.tokens_per_step`), because the rate that counts is the whole request's, and its first
rounds (new text, before it repeats anything lookup can use) understate it; a request whose rounds stay below the
prior pulls R down and turns the draft on.

Its cost is `draft_cost` plus a catch-up: while it does not run, the verified features it has not seen accumulate
(`decoder.py`), and its next context pass takes them all at once (so its KV cache stays exactly what the target
committed) at `row_cost` verify steps a row. In its first round that is the whole prompt. Rows beyond the last
round's own are paid once and serve the draft rounds that follow, so they are spread over the draft rounds expected
in the rest of the request (the rounds left, the tokens left over E_n + 1, at the share of recent rounds in which
the draft ran): early in a long generation a draft that keeps running is worth catching up, near its end or when
it runs once in a while (and so catches up on most of the request each time) it is not.

Exactness. Both drafters' proposals and this planner's state depend only on committed tokens and earlier rounds'
outcomes, never on the current round's random draws, and merged siblings are distinct: rejection sampling stays
exact at any temperature (algorithm.md §4.7), and greedy output is token-identical to plain decoding.
"""

from __future__ import annotations

import math

from hass_deploy.config import HybridConfig
from hass_deploy.runtime.tree import Candidates, MergedTree

DRAFT, LOOKUP = 0, 1  # source indices: the order of `merge_candidates`' sources and of MergedTree.sources' bits

# The calibration's prior, in tokens, added to the decayed sums (and never decayed itself, so a source that
# proposes nothing for thousands of rounds keeps a defined factor): as if it had been predicted to get
# PRIOR_EXPECTED tokens accepted and got PRIOR_FACTOR of them. Half, because both raw scores are optimistic
# (lookup's count ratios most of all); one token, so that one round's evidence already moves it.
PRIOR_EXPECTED = 1.0
PRIOR_FACTOR = 0.5
# The draft's marginal rate starts at PRIOR_RATE tokens per unit of lookup's miss probability (optimistic: a draft
# accepting a couple of tokens where lookup misses is typical), with the weight of one such round.
PRIOR_RATE = 2.0
# R blends the request's recent rounds with `HybridConfig.tokens_per_step` weighted as this many rounds: what counts
# is the rate the whole request will make, and its first rounds (new text, before any repetition lookup can use)
# say little about it. With the decayed sums (about 10 rounds), a request's own evidence weighs as much as the prior.
PRIOR_ROUNDS = 10.0
# Per-round decay of every sum: about the last 10 rounds count, so a request whose text changes (prose, then code)
# moves its budget within a few rounds, and a draft that stopped running is tried again once its evidence faded.
DECAY = 0.9


class HybridPlanner:
    """Per request: each drafter's calibration, and whether the draft head runs this round."""

    def __init__(self, config: HybridConfig):
        self.config = config
        self.expected = [0.0, 0.0]  # [source] decayed predicted accepted tokens
        self.accepted = [0.0, 0.0]  # [source] decayed accepted tokens
        self.missed = 0.0  # decayed sum of (1 - p1) over the rounds the draft ran
        self.added = 0.0  # decayed tokens accepted that only the draft proposed, over those rounds
        self.tokens = 0.0  # decayed tokens committed per round
        self.steps = 0.0  # decayed verify steps they took, the draft's costs included
        self.ran = 0.0  # decayed rounds in which the draft ran
        self.rounds = 0.0  # decayed rounds

    def factor(self, source: int) -> float:
        """Realised over predicted accepted tokens of a source: its scores' calibration (1 = calibrated)."""
        return (self.accepted[source] + PRIOR_EXPECTED * PRIOR_FACTOR) / (self.expected[source] + PRIOR_EXPECTED)

    def offsets(self) -> list[float]:
        """Per source (DRAFT, LOOKUP), the log calibration factor `merge_candidates` adds to its scores."""
        return [math.log(self.factor(DRAFT)), math.log(self.factor(LOOKUP))]

    @property
    def rate(self) -> float:
        """Tokens the draft alone adds per unit of lookup's miss probability."""
        return (self.added + PRIOR_RATE) / (self.missed + 1.0)

    @property
    def tokens_per_step(self) -> float:
        """R: the request's recent tokens per verify step, what the draft's extra tokens per step must beat."""
        prior = self.config.tokens_per_step
        return (self.tokens + PRIOR_ROUNDS * prior) / (self.steps + PRIOR_ROUNDS)

    def lookup_outlook(self, found: Candidates) -> tuple[float, float]:
        """(E_n, p1) of lookup's candidates, calibrated: expected accepted tokens, and the probability that one of
        its first-level nodes is accepted (siblings exclude each other, so their probabilities add)."""
        factor = self.factor(LOOKUP)
        probs = [min(1.0, factor * math.exp(score)) for score in found.scores]
        first = sum(p for p, parent in zip(probs[1:], found.parents[1:]) if parent == 0)
        return sum(probs[1:]), min(1.0, first)

    def wants_draft(self, found: Candidates, catch_up: int, tokens_left: int) -> bool:
        """Whether the draft head's tree is expected to pay for its cost this round, given lookup's candidates, the
        rows its context pass would take beyond this round's own (`catch_up`), and the tokens the request has left."""
        expected, first = self.lookup_outlook(found)
        # The catch-up is shared by the draft rounds that follow before it falls behind again: the rounds left at
        # the share of rounds in which it has been running (a draft that runs in one round of ten pays most of it).
        share = (self.ran + 0.5) / (self.rounds + 1.0)
        draft_rounds_left = max(1.0, share * tokens_left / (expected + 1.0))
        cost = self.config.draft_cost + self.config.row_cost * catch_up / draft_rounds_left
        return (1.0 - first) * self.rate > cost * self.tokens_per_step

    def record(self, merged: MergedTree, accepted_nodes: tuple[int, ...], found: Candidates,
               draft_ran: bool, catch_up: int = 0) -> None:
        """Update the calibration with a verified tree, the nodes accepted (root first) and lookup's candidates of
        the round; the draft's marginal rate when it ran; and the request's tokens per step, with what the draft
        cost when it ran (`catch_up` as given to `wants_draft`)."""
        if draft_ran:  # before this round's evidence moves lookup's calibration: p1 as it was when deciding
            _, first = self.lookup_outlook(found)
            only_draft = sum(merged.sources[node] == 1 << DRAFT for node in accepted_nodes[1:])
            self.missed = DECAY * self.missed + (1.0 - first)
            self.added = DECAY * self.added + only_draft
        else:
            self.missed *= DECAY
            self.added *= DECAY
        self.ran = DECAY * self.ran + draft_ran
        self.rounds = DECAY * self.rounds + 1.0
        self.tokens = DECAY * self.tokens + len(accepted_nodes)  # the accepted path and the bonus token
        paid = self.config.draft_cost + self.config.row_cost * catch_up if draft_ran else 0.0
        self.steps = DECAY * self.steps + 1.0 + paid
        for source in (DRAFT, LOOKUP):
            if source == DRAFT and not draft_ran:
                continue  # the draft proposed nothing this round: nothing to learn about its scores
            predicted = sum(math.exp(score) for score in merged.source_scores[source][1:])
            got = sum(merged.sources[node] >> source & 1 for node in accepted_nodes[1:])
            self.expected[source] = DECAY * self.expected[source] + predicted
            self.accepted[source] = DECAY * self.accepted[source] + got
