"""Tests for hass_deploy.runtime.proposers, without a model: each tree source against the functions it wraps, the
draft proposer's pending pairs (what each context pass gets, across rounds it skipped), and the hybrid proposer
telling its planner only about rounds it proposed. The decode loop over them is tested in test_decoder.py,
test_hybrid.py and test_decoder_sampling.py."""

from __future__ import annotations

import torch

from runtime.test_tree import _assert_consistent
from hass_deploy.config import HybridConfig, LookupConfig, TreeConfig
from hass_deploy.runtime import tree as trees
from hass_deploy.runtime.backends.base import DraftBackend, DraftOutput
from hass_deploy.runtime.hybrid import HybridPlanner
from hass_deploy.runtime.lookup import PromptLookup
from hass_deploy.runtime.proposers import DraftProposer, HybridProposer, LookupProposer, RootOnly
from hass_deploy.runtime.sampling import accept_greedy

VOCAB, HIDDEN = 50, 6
CPU = torch.device("cpu")


class RecordingDraft(DraftBackend):
    """Records every step; the pair at position t proposes tokens t + 1, t + 2, ... (mod VOCAB) at log-probs -1,
    -2, ..., so the pool is deterministic and its siblings distinct."""

    device, max_len = CPU, 256

    def __init__(self):
        self.calls: list[dict] = []

    def _step(self, features, input_ids, position_ids, cache_len, tree_mask, top_k):
        self.calls.append(dict(features=features, tokens=input_ids[0].tolist(), positions=position_ids[0].tolist(),
                               cache_len=cache_len, context=tree_mask is None))
        steps = input_ids.shape[1]
        tokens = (position_ids[0, :, None] + 1 + torch.arange(top_k)) % VOCAB  # [T, K]
        logprobs = -1.0 - torch.arange(top_k, dtype=torch.float32).expand(steps, top_k)  # [T, K]
        return DraftOutput(hidden=torch.zeros(1, steps, HIDDEN), logprobs=logprobs[None], tokens=tokens[None])

    def fork(self):
        raise NotImplementedError


def features(rows: int, first: float = 0.0) -> torch.Tensor:
    """[1, rows, HIDDEN] features whose row i is all first + i: a context pass shows which rows it got."""
    return (first + torch.arange(rows, dtype=torch.float32))[None, :, None].expand(1, rows, HIDDEN).clone()


def chain_round(tree, accept: int):
    """The acceptance of a tree whose target agrees with the first `accept` nodes of its first chain."""
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    chosen, node = [0] * len(tokens), 0
    for _ in range(accept):
        child = parents.index(node) if node in parents else None
        if child is None:
            break
        chosen[node], node = tokens[child], child
    chosen[node] = (tokens[node] + 7) % VOCAB  # the bonus: a token the tree does not propose under it
    return accept_greedy(tree, torch.tensor(chosen))


def draft_proposer(draft: RecordingDraft, prompt: list[int], config: TreeConfig = TreeConfig(tokens=6, depth=3,
                   top_k=2), on_device: bool = False) -> DraftProposer:
    return DraftProposer(draft, config, VOCAB, CPU, on_device, features(len(prompt) - 1),
                         torch.tensor(prompt[1:]))


def test_root_only_is_the_root_alone_and_reuses_its_tensors():
    proposer = RootOnly(torch.tensor(5))
    for token in (5, 9):
        tree, draft_ran = proposer.propose(torch.tensor(token), 100, 100)
        assert tree.tokens.tolist() == [token] and tree.num_nodes == 1 and not draft_ran
        # Only the token changes: a plain round allocates nothing else.
        assert tree.mask is proposer.tree.mask and tree.depths is proposer.tree.depths
        assert tree.paths is proposer.tree.paths
    proposer.observe(accept_greedy(tree, torch.tensor([3])), torch.tensor([3]), torch.zeros(1, 1, HIDDEN))


def test_lookup_proposer_is_prompt_lookup_over_the_committed_history():
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]
    config = LookupConfig(tokens=6, depth=4)
    proposer = LookupProposer(config, CPU, None, prompt + [5])
    reference = PromptLookup(config)
    reference.extend(prompt + [5])
    for room in (100, 3):  # the tree shrinks to the rows left
        tree, draft_ran = proposer.propose(torch.tensor(5), room, 100)
        expected = reference.propose(5, min(config.tokens, room))
        assert not draft_ran and tree.num_nodes <= min(config.tokens, room)
        assert torch.equal(tree.tokens, expected.tokens) and torch.equal(tree.parents, expected.parents)
        assert torch.equal(tree.mask, expected.mask)
        _assert_consistent(tree)
    assert proposer.candidates(4) == reference.candidates(5, 4)
    # A round committed 6 (accepted) and 13 (the bonus, the next root): the history ends with the new root.
    accepted = chain_round(tree, 1)
    proposer.observe(accepted, torch.tensor(accepted.tokens[1:]), torch.zeros(1, tree.num_nodes, HIDDEN))
    assert proposer.lookup.history == prompt + [5] + accepted.tokens[1:] and accepted.tokens[1:] == [6, 13]


def test_draft_proposer_tree_is_the_rerank_of_its_pool_on_the_host_and_on_the_device():
    prompt = [1, 2, 3, 4]
    config = TreeConfig(tokens=6, depth=3, top_k=2)
    pool = draft_proposer(RecordingDraft(), prompt, config).grow(torch.tensor(4), config.tokens)
    host, draft_ran = draft_proposer(RecordingDraft(), prompt, config).propose(torch.tensor(4), 100, 100)
    device, _ = draft_proposer(RecordingDraft(), prompt, config, on_device=True).propose(torch.tensor(4), 100, 100)
    expected = trees.build_tree(torch.tensor(4), *pool, config.tokens)
    assert draft_ran and host.num_nodes == config.tokens
    assert torch.equal(host.tokens, expected.tokens) and torch.equal(host.mask, expected.mask)
    assert torch.equal(device.tokens, expected.tokens) and torch.equal(device.mask, expected.mask)
    # Two rows left: a tree of two nodes, from the context pass alone.
    small, _ = draft_proposer(RecordingDraft(), prompt, config).propose(torch.tensor(4), 2, 100)
    assert small.tokens.tolist() == [4, 3]  # the last prompt pair (position 2) proposes 2 + 1 first


def test_draft_proposer_feeds_every_committed_pair_once_in_order_across_skipped_rounds():
    """The prompt's pairs go to the first context pass; each round's committed pairs wait in `pending` until the
    next pass, which takes all of them (the rounds it skipped too) at the rows after the previous one."""
    draft = RecordingDraft()
    prompt = [10, 11, 12, 13, 14]  # 14: the first root
    proposer = draft_proposer(draft, prompt)
    assert proposer.pending_rows == 4 and proposer.backlog == 3 and proposer.draft_len == 0
    tree, _ = proposer.propose(torch.tensor(14), 100, 100)
    context = draft.calls[0]
    assert context["context"] and context["cache_len"] == 0 and context["positions"] == [0, 1, 2, 3]
    assert context["tokens"] == [11, 12, 13, 14] and torch.equal(context["features"], features(4))
    assert proposer.pending == [] and proposer.pending_rows == 0 and proposer.draft_len == 4
    committed_rows = []
    for accept in (2, 0, 1):  # three rounds, the draft proposing only in the first: two are skipped
        accepted = chain_round(tree, accept)
        hidden = features(tree.num_nodes, first=100.0 * (len(committed_rows) + 1))  # node i's feature: row i
        committed = torch.tensor(accepted.tokens[1:])
        proposer.observe(accepted, committed, hidden)
        committed_rows.append((hidden[:, accepted.path], accepted.tokens[1:]))
        assert proposer.backlog == sum(len(t) for _, t in committed_rows[:-1])  # beyond this round's own rows
        if accept == 0:  # a round the draft skips (hybrid) or a root-only one: the loop only observes
            tree = trees.root_only(committed[-1])
    calls = len(draft.calls)
    proposer.propose(committed[-1], 100, 100)
    catch_up = draft.calls[calls]
    rows = sum(len(t) for _, t in committed_rows)
    assert catch_up["context"] and catch_up["cache_len"] == 4 and catch_up["positions"] == list(range(4, 4 + rows))
    assert catch_up["tokens"] == [t for _, tokens in committed_rows for t in tokens]
    assert torch.equal(catch_up["features"], torch.cat([f for f, _ in committed_rows], dim=1))
    assert proposer.draft_len == 4 + rows and proposer.pending == []


def test_hybrid_proposer_records_only_the_rounds_it_proposed(monkeypatch):
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4, 5]
    draft = RecordingDraft()
    lookup = LookupProposer(LookupConfig(), CPU, None, prompt)
    proposer = HybridProposer(lookup, draft_proposer(draft, prompt), HybridConfig(tokens=6))
    decisions = iter([False, True])
    monkeypatch.setattr(HybridPlanner, "wants_draft", lambda self, found, catch_up, left: next(decisions))
    # Without the draft: lookup's own tree, and the draft's backlog kept for its next pass.
    tree, draft_ran = proposer.propose(torch.tensor(5), 100, 100)
    expected, _ = LookupProposer(LookupConfig(tokens=6), CPU, None, prompt).propose(torch.tensor(5), 100, 100)
    assert not draft_ran and not draft.calls and torch.equal(tree.tokens, expected.tokens)
    accepted = chain_round(tree, 1)
    proposer.observe(accepted, torch.tensor(accepted.tokens[1:]), torch.zeros(1, tree.num_nodes, HIDDEN))
    assert proposer.planner.rounds == 1.0 and proposer.round is None
    assert proposer.draft.pending_rows == len(prompt) - 1 + 2
    # A root-only round (one row left): observed, but nothing for the planner to learn.
    root = accepted.tokens[-1]
    accepted = accept_greedy(trees.root_only(torch.tensor(root)), torch.tensor([4]))
    proposer.observe(accepted, torch.tensor([4]), torch.zeros(1, 1, HIDDEN))
    assert proposer.planner.rounds == 1.0 and lookup.lookup.history[-1] == 4
    # With the draft: its pass takes the whole backlog, and the merged tree holds its candidates.
    tree, draft_ran = proposer.propose(torch.tensor(4), 100, 100)
    assert draft_ran and draft.calls[0]["positions"] == list(range(len(prompt) - 1 + 3))
    assert tree.num_nodes <= 6 and proposer.round[2]
    proposer.observe(chain_round(tree, 0), torch.tensor([1]), torch.zeros(1, tree.num_nodes, HIDDEN))
    assert proposer.planner.rounds == 1.0 + 0.9  # decayed once, then this round
