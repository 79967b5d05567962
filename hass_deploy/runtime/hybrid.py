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
optimistic prior, so a new request tries it and a request whose text changes tries it again after a while). With
E_n lookup's calibrated expected accepted tokens, a round with the draft gives about E_n + 1 + gain tokens for
1 + cost verify steps, one without it E_n + 1 for one step: the draft runs when gain > cost * (E_n + 1).

Its cost is `draft_cost` plus a catch-up: while it does not run, the verified features it has not seen accumulate
(`decoder.py`), and its next context pass takes them all at once (so its KV cache stays exactly what the target
committed) at `row_cost` verify steps a row. In its first round that is the whole prompt. Rows beyond the last
round's own are paid once for the rest of the request, so they are spread over the rounds left (the tokens left
over E_n + 1): early in a long generation the draft is worth catching up, near its end it is not.

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
        rounds_left = max(1.0, tokens_left / (expected + 1.0))
        cost = self.config.draft_cost + self.config.row_cost * catch_up / rounds_left
        return (1.0 - first) * self.rate > cost * (expected + 1.0)

    def record(self, merged: MergedTree, accepted_nodes: tuple[int, ...], found: Candidates,
               draft_ran: bool) -> None:
        """Update the calibration with a verified tree, the nodes accepted (root first) and lookup's candidates of
        the round; and the draft's marginal rate when it ran."""
        if draft_ran:  # before this round's evidence moves lookup's calibration: p1 as it was when deciding
            _, first = self.lookup_outlook(found)
            only_draft = sum(merged.sources[node] == 1 << DRAFT for node in accepted_nodes[1:])
            self.missed = DECAY * self.missed + (1.0 - first)
            self.added = DECAY * self.added + only_draft
        else:
            self.missed *= DECAY
            self.added *= DECAY
        for source in (DRAFT, LOOKUP):
            if source == DRAFT and not draft_ran:
                continue  # the draft proposed nothing this round: nothing to learn about its scores
            predicted = sum(math.exp(score) for score in merged.source_scores[source][1:])
            got = sum(merged.sources[node] >> source & 1 for node in accepted_nodes[1:])
            self.expected[source] = DECAY * self.expected[source] + predicted
            self.accepted[source] = DECAY * self.accepted[source] + got
