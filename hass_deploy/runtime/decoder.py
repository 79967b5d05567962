"""The one draft-then-verify loop (DESIGN D3), for greedy and sampled decoding, with or without a draft.

Per round (algorithm.md §4.2):
    tree  = draft grows an EAGLE-2 tree under the pending root token       (skipped without a draft)
            or prompt lookup grows one from n-gram counts (`config.lookup`; `lookup.py`, no draft needed)
            or, with both, their candidates reranked into one tree         (`hybrid.py`)
    out   = target verifies all tree nodes in one step                     [1, T, V], [1, T, H]
    acc   = longest accepted path + bonus token (greedy or exact rejection sampling)
    commit: compact the accepted KV rows, feed their verified features to the draft when it next runs
Plain decoding is the same loop with a root-only tree: one target step per token, through the same backend
contract, which is what every speedup is measured against. Whichever proposes the tree, verification,
acceptance, compaction and the statistics are this one loop's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

from hass_deploy.config import GenerationConfig, TreeConfig
from hass_deploy.errors import CacheCapacityError, ConfigError, HassDeployError
from hass_deploy.runtime import sampling, tree as trees
from hass_deploy.runtime.backends.base import DraftBackend, TargetBackend
from hass_deploy.runtime.hybrid import LOOKUP, HybridPlanner
from hass_deploy.runtime.lookup import NgramCache, PromptLookup, check_tree_budget


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
    `config.lookup` is set, both merged (hybrid) when there are both, else it is the root alone (plain decoding).
    """

    def __init__(self, target: TargetBackend, draft: DraftBackend | None = None, corpus: NgramCache | None = None):
        self.target = target
        self.draft = draft
        self.corpus = corpus  # prompt lookup's static n-gram statistics, shared by every request
        # Build the draft head's tree where its pool is (`tree.build_tree_on_device`) off the CPU, so that a GPU round
        # has one host sync, the acceptance read; on the CPU the host build is faster (tree.py).
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
        # Committed pairs the draft has not seen, as (features [1, n, H], next tokens [n]) per round: its next context
        # pass joins them (a list, so that rounds without the draft append instead of copying the backlog).
        pending = [(out.hidden, torch.cat([ids[0, 1:], root.view(1)]))]  # the prompt's: [1, P, H], [P]
        cache_len, draft_len = prompt_len, 0
        new = [int(root)]  # host sync: the token is output
        # Prompt lookup's history is the prompt plus every committed token, the pending root last, on the host.
        lookup = None if config.lookup is None else PromptLookup(config.lookup, device, self.corpus)
        if lookup is not None:
            lookup.extend(prompt_ids)
        # Both drafters: one merged tree per round (hybrid.py); the planner is this request's.
        planner = HybridPlanner(config.hybrid) if lookup is not None and self.draft is not None else None
        root_only = trees.root_only(root.view(1))  # plain steps reuse its constant parts, only the token changes
        while True:
            if lookup is not None:
                lookup.extend(new)  # this round's committed tokens and the new root (host ints: no sync)
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
            # A hybrid round's merged tree and the draft head's candidates in it; whether the draft head ran.
            merged, drafted, draft_ran = None, None, False
            if room <= 1 or (lookup is None and self.draft is None):
                tree = replace(root_only, tokens=root.view(1))
            elif planner is not None:
                budget = min(config.hybrid.tokens, room)
                found = lookup.candidates(new[-1], budget)  # new[-1] is the pending root
                # Rows the draft's context pass would take beyond the last round's own: the prompt in the first round.
                catch_up = sum(tokens.numel() for _, tokens in pending) - (len(new) if result.rounds else 1)
                if planner.wants_draft(found, catch_up, config.max_new_tokens - len(result.output_ids)):
                    drafted = trees.pool_candidates(root, *self._grow(root, pending, draft_len, config.tree, budget))
                    draft_ran = True
                # Without the draft's candidates the merge is lookup's own tree: no trie, no rerank.
                merged = (trees.merge_candidates([drafted, found], planner.offsets(), budget) if draft_ran
                          else trees.merged_alone(found, sources=2, source=LOOKUP))
                tree = trees.tree_from_lists(merged.tokens, merged.parents, device)
            elif lookup is not None:
                tree = lookup.propose(new[-1], min(config.lookup.tokens, room))
            else:
                budget = min(config.tree.tokens, room)
                pool = self._grow(root, pending, draft_len, config.tree, budget)
                tree = (trees.build_tree_on_device(root, *pool, budget, min(config.tree.depth, budget - 1))
                        if self.tree_on_device else trees.build_tree(root, *pool, budget))
                draft_ran = True
            out = self.target.step(tree.tokens[None], (cache_len + tree.depths)[None], cache_len, tree.mask[None])
            logits = out.logits[0]  # [T, V]
            if config.sampling.greedy:
                accepted = sampling.accept_greedy(tree, logits.argmax(-1))
            else:
                accepted = sampling.accept_sampling(tree, sampling.target_probs(logits, config.sampling), generator)
            if not accepted.in_place:  # plain steps and chains accepted whole keep their rows where they are
                self.target.compact(cache_len, accepted.path)
            committed = torch.tensor(accepted.tokens[1:], dtype=torch.long, device=device)  # [a+1]
            if self.draft is not None:
                if draft_ran:  # its context pass took every pending pair: start again from this round's
                    draft_len, pending = cache_len, []
                # [1, a+1, H] verified features of the committed nodes (a copy: the backend reuses its outputs)
                pending.append((out.hidden[:, accepted.path], committed))
            if merged is not None:
                planner.record(merged, accepted.nodes, found, draft_ran, catch_up)
            cache_len += len(accepted.nodes)
            root = committed[-1]
            self._record(result, accepted, tree.num_nodes - 1, draft_ran)
            new = accepted.tokens[1:]

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
        bad = [t for t in prompt_ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise HassDeployError(f"token id {bad[0]} is outside the vocabulary (size {self.target.vocab_size})")

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

    def _grow(self, root: torch.Tensor, pending: list[tuple[torch.Tensor, torch.Tensor]], draft_len: int,
              config: TreeConfig, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """EAGLE-2 tree growth (algorithm.md §4.3): a context pass over the committed pairs the draft has not seen,
        then `depth - 1` levels that each expand the `top_k` best nodes by cumulative draft log-probability.

        Returns the candidate pool (`tree.pool_candidates`' inputs): tokens [N], cumulative log-probs [N] and
        parent pool indices [N] (-1 under the root), in generation order.
        """
        draft, device = self.draft, self.target.device
        depth = min(config.depth, budget - 1)  # budget: the verify step's nodes, which fit the target's KV rows
        features = pending[0][0] if len(pending) == 1 else torch.cat([f for f, _ in pending], dim=1)  # [1, n, H]
        tokens = pending[0][1] if len(pending) == 1 else torch.cat([t for _, t in pending])  # [n]
        top_k = min(config.top_k, self.target.vocab_size)
        n = tokens.numel()
        # Context pass: pairs (f_t, x_{t+1}) at positions t; the draft's KV keeps only verified context.
        out = draft.step(features, tokens[None], torch.arange(draft_len, draft_len + n, device=device)[None],
                         draft_len, None, top_k)
        committed = draft_len + n
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
