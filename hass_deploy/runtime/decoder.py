"""The one draft-then-verify loop (DESIGN D3), for greedy and sampled decoding, with or without a draft.

Per round (algorithm.md §4.2):
    tree  = proposer.propose(root, room, tokens_left)                      the request's tree source (`proposers.py`)
    out   = target verifies all tree nodes in one step                     [1, T, V], [1, T, H]
    acc   = longest accepted path + bonus token (greedy or exact rejection sampling)
    commit: compact the accepted KV rows, proposer.observe(...) what was committed, the statistics
The proposer is made per request from the drafters there are: the draft head's EAGLE-2 tree, prompt lookup's
n-gram tree (`config.lookup`; `lookup.py`, no draft needed), both merged (hybrid, `hybrid.py`), or the root alone.
Plain decoding is the same loop with a root-only tree: one target step per token, through the same backend
contract, which is what every speedup is measured against. Whichever proposes the tree, verification,
acceptance, compaction and the statistics are this one loop's: a proposer never calls the target.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from hass_deploy.config import GenerationConfig
from hass_deploy.errors import CacheCapacityError, ConfigError, HassDeployError
from hass_deploy.runtime import sampling
from hass_deploy.runtime.backends.base import DraftBackend, TargetBackend
from hass_deploy.runtime.lookup import NgramCache, check_tree_budget
from hass_deploy.runtime.proposers import DraftProposer, HybridProposer, LookupProposer, Proposer, RootOnly


def check_token_ids(ids: list[int] | tuple[int, ...], vocab_size: int, what: str = "token id") -> None:
    """Refuse an id outside [0, vocab_size) in one line (the embedding lookup would fail or read garbage): the
    prompt's, here and in the serving engine, and a request's stop tokens (`what` names them in the message)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise HassDeployError(f"{what} {bad} is outside the vocabulary (size {vocab_size})")


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)  # new tokens only
    accept_lengths: list[int] = field(default_factory=list)  # accepted draft tokens per round
    draft_lengths: list[int] = field(default_factory=list)  # draft tokens verified per round (tree nodes - 1)
    depth_attempts: list[int] = field(default_factory=list)  # [d] rounds that tried a token at depth d+1
    depth_accepts: list[int] = field(default_factory=list)  # [d] rounds that accepted one there
    draft_rounds: int = 0  # rounds in which the draft head grew a tree (all of them without prompt lookup)
    stop_reason: str = ""  # "eos", "max_new_tokens" or "cache_full"
    wall_s: float = 0.0

    @property
    def rounds(self) -> int:
        return len(self.accept_lengths)

    @property
    def tau(self) -> float:
        """Mean tokens per round (accepted + 1): the paper's acceptance length for this prompt."""
        return sum(a + 1 for a in self.accept_lengths) / max(self.rounds, 1)

    @property
    def tokens_per_s(self) -> float:
        return len(self.output_ids) / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def depth_acceptance(self) -> list[float]:
        """Per-depth acceptance rate: P(accept at depth d | depths < d accepted and the tree reached d)."""
        return [a / n if n else 0.0 for a, n in zip(self.depth_accepts, self.depth_attempts)]

    def to_record(self, text: str | None = None, question_id=None) -> dict:
        """The JSON record of `generate --json`: ids, text, and what the decoding did and took."""
        return {"question_id": question_id, "prompt_ids": self.prompt_ids, "output_ids": self.output_ids,
                "text": text, "new_tokens": len(self.output_ids), "rounds": self.rounds,
                "accept_lengths": self.accept_lengths, "tau": self.tau, "wall_s": self.wall_s,
                "tokens_per_s": self.tokens_per_s, "stop_reason": self.stop_reason}


class SpeculativeDecoder:
    """Draft-then-verify generation over a target backend and an optional draft backend.

    The tree of a round comes from the drafters there are: the draft backend, prompt lookup when the request's
    `config.lookup` is set, both merged (hybrid) when there are both, else it is the root alone (plain decoding);
    each request gets its own proposer (`proposers.py`), which holds that request's drafting state.
    """

    def __init__(self, target: TargetBackend, draft: DraftBackend | None = None, corpus: NgramCache | None = None):
        self.target = target
        self.draft = draft
        self.corpus = corpus  # prompt lookup's static n-gram statistics, shared by every request
        # Build the draft head's tree where its pool is (`tree.build_tree_on_device`) off the CPU, so that a GPU round
        # has one host sync, the acceptance read; on the CPU the host build is faster (tree.py). Read as each
        # request starts.
        self.tree_on_device = target.device.type != "cpu"

    def generate(self, prompt_ids: list[int], config: GenerationConfig,
                 on_tokens: Callable[[list[int]], None] | None = None) -> GenerationResult:
        """Generate until EOS, `max_new_tokens` or a full cache; `on_tokens` streams each round's new tokens."""
        result = GenerationResult(prompt_ids=list(prompt_ids))
        start = time.perf_counter()
        for tokens in self.stream(prompt_ids, config, result):
            if on_tokens is not None:
                on_tokens(tokens)
        result.wall_s = time.perf_counter() - start
        return result

    def stream(self, prompt_ids: list[int], config: GenerationConfig,
               result: GenerationResult | None = None) -> Iterator[list[int]]:
        """Yield the new tokens of each round; fills `result` (tokens, statistics, stop reason) as it goes."""
        result = result if result is not None else GenerationResult(prompt_ids=list(prompt_ids))
        prompt_len = len(prompt_ids)
        self._check_request(prompt_ids, config)
        device = self.target.device
        generator = torch.Generator(device=device).manual_seed(config.seed)
        eos = set(config.eos_token_ids)

        # Prefill: the prompt's KV rows and features; the first new token is the first root.
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, P]
        out = self.target.step(ids, torch.arange(prompt_len, device=device)[None], 0, None, last_only=True)
        root = self._choose(out.logits[0, -1], config, generator)  # 0-d
        new = [int(root)]  # host sync: the token is output
        root_only = RootOnly(root)  # plain decoding's proposer, and any round's with one KV row left
        proposer = self._proposer(config, prompt_ids, new[0], out.hidden, torch.cat([ids[0, 1:], root.view(1)]),
                                  root_only)
        cache_len = prompt_len
        while True:
            new, stop = self._truncate(new, len(result.output_ids), config, eos)
            room = self.target.max_len - cache_len
            if stop is None and room <= 0:
                stop = "cache_full"
            result.output_ids.extend(new)
            # Set before the yield, so a consumer knows these are the last tokens without asking for more.
            result.stop_reason = stop or ""
            yield new
            if stop is not None:
                return
            # With one row left only the root fits, whoever proposes (the proposer still observes the round).
            tree, draft_ran = (proposer if room > 1 else root_only).propose(
                root, room, config.max_new_tokens - len(result.output_ids))
            out = self.target.step(tree.tokens[None], (cache_len + tree.depths)[None], cache_len, tree.mask[None])
            logits = out.logits[0]  # [T, V]
            if config.sampling.greedy:
                accepted = sampling.accept_greedy(tree, logits.argmax(-1))
            else:
                accepted = sampling.accept_sampling(tree, sampling.target_probs(logits, config.sampling), generator)
            if not accepted.in_place:  # plain steps and chains accepted whole keep their rows where they are
                self.target.compact(cache_len, accepted.path)
            committed = torch.tensor(accepted.tokens[1:], dtype=torch.long, device=device)  # [a+1]
            proposer.observe(accepted, committed, out.hidden)
            cache_len += len(accepted.nodes)
            root = committed[-1]
            self._record(result, accepted, tree.num_nodes - 1, draft_ran)
            new = accepted.tokens[1:]

    def _proposer(self, config: GenerationConfig, prompt_ids: list[int], root_id: int, features: torch.Tensor,
                  next_tokens: torch.Tensor, root_only: RootOnly) -> Proposer:
        """This request's tree source, from the drafters there are: the draft backend, prompt lookup when
        `config.lookup` is set, both merged (hybrid), else the root alone.

        Args:
            prompt_ids, root_id: the prompt and the first root on the host (prompt lookup's first history).
            features, next_tokens: the prompt's committed pairs for the draft, [1, P, H] prefill features and [P]
                tokens (the prompt's after the first, then the root).
            root_only: the request's root-only proposer, plain decoding's.
        """
        device = self.target.device
        # A target whose tree rows are not plain decoding's verifies chains (`TargetBackend.tree_rows_exact`): the
        # draft's beam is one node wide, lookup expands one continuation per node, and a hybrid round keeps the
        # merged tree's best path.
        chain = not self.target.tree_rows_exact
        lookup = (None if config.lookup is None else
                  LookupProposer(replace(config.lookup, branches=1) if chain else config.lookup, device, self.corpus,
                                 [*prompt_ids, root_id]))
        draft = (None if self.draft is None else
                 DraftProposer(self.draft, config.tree.chain() if chain else config.tree, self.target.vocab_size,
                               device, self.tree_on_device, features, next_tokens))
        if lookup is not None and draft is not None:
            return HybridProposer(lookup, draft, config.hybrid, chain)
        return lookup if lookup is not None else draft if draft is not None else root_only

    def _check_request(self, prompt_ids: list[int], config: GenerationConfig) -> None:
        if not prompt_ids:
            raise HassDeployError("empty prompt: give at least one token")
        if len(prompt_ids) > self.target.max_len:
            raise CacheCapacityError(
                f"prompt of {len(prompt_ids)} tokens is longer than the KV cache ({self.target.max_len} rows); "
                "raise --max-seq-len or shorten the prompt")
        # Backends with a fixed verify-step budget (exports) say so.
        check_tree_budget(config, self.draft is not None, getattr(self.target, "max_tree_tokens", None))
        if self.draft is not None and self.draft.max_len < self.target.max_len + config.tree.draft_rows:
            raise ConfigError(
                f"a tree of depth {config.tree.depth} and top-k {config.tree.top_k} needs "
                f"{self.target.max_len + config.tree.draft_rows} draft KV rows, the draft backend has "
                f"{self.draft.max_len}: build the backends with this tree configuration")
        check_token_ids(prompt_ids, self.target.vocab_size)

    @staticmethod
    def _choose(logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator) -> torch.Tensor:
        """The target's own next token from one row of logits [V]: argmax, or a draw from the warped distribution."""
        if config.sampling.greedy:
            return logits.argmax()
        return sampling.sample_token(sampling.target_probs(logits, config.sampling), generator).reshape(())

    @staticmethod
    def _truncate(new: list[int], produced: int, config: GenerationConfig, eos: set[int]) -> tuple[list[int], str | None]:
        """Cut a round's tokens at the first EOS (kept) or at the token budget, as plain decoding would stop."""
        for i, token in enumerate(new):
            if produced + i + 1 >= config.max_new_tokens:
                return new[: i + 1], "eos" if token in eos else "max_new_tokens"
            if token in eos:
                return new[: i + 1], "eos"
        return new, None

    @staticmethod
    def _record(result: GenerationResult, acceptance: sampling.Acceptance, drafted: int, draft_ran: bool) -> None:
        """Accept length, draft tokens, and per-depth acceptance conditioned on reaching that depth (EAGLE's
        n-alpha)."""
        accepted = acceptance.accepted
        result.accept_lengths.append(accepted)
        result.draft_lengths.append(drafted)
        result.draft_rounds += draft_ran
        # Depth accepted + 1 was tried only if the last accepted node has children.
        reached = accepted + (0 if acceptance.leaf else 1)
        while len(result.depth_attempts) < reached:
            result.depth_attempts.append(0)
            result.depth_accepts.append(0)
        for d in range(reached):
            result.depth_attempts[d] += 1
            result.depth_accepts[d] += int(d < accepted)
