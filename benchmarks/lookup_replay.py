"""Prompt-lookup drafters replayed on a target's greedy outputs (a script, not a test): tau per prompt set for each
drafter configuration, without running the target again.

Greedy decoding is deterministic, so the tokens a round accepts from a lookup tree depend only on the tree and on
the target's greedy continuation: generate each prompt's continuation once (plain decoding, torch backend), then
replay every drafter on it round by round (propose under the pending root, walk the tree along the continuation,
commit the accepted tokens and the bonus). Hundreds of configurations take seconds; the result is exactly the tau
the decoder would measure with the same drafter.

    python benchmarks/lookup_replay.py --target T --prompts W/corpus/heldout_prompts.jsonl \
        --prompts ../shared/data/prompts/mt_bench.jsonl ... --max-prompts 20 --new-tokens 128 [--outputs greedy.json]

`recent` is the drafter before n-gram counts (docs/RESULTS.md, "Prompt lookup and hybrid drafting"): the
continuations of the trailing n-gram's most recent occurrences, longest n-gram first, merged into a trie up to the
budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

from hass_deploy.bench.runner import encode_prompt, load_prompt_sets
from hass_deploy.config import GenerationConfig, LookupConfig
from hass_deploy.models.loading import load_target
from hass_deploy.runtime.backends.torch import TorchTarget
from hass_deploy.runtime.decoder import SpeculativeDecoder
from hass_deploy.runtime.lookup import PromptLookup

Proposer = Callable[[list[int], int], tuple[list[int], list[int]]]  # (history, budget) -> (tokens, parents)


def counts(config: LookupConfig) -> Callable[[], tuple[Callable, Proposer]]:
    """The library's drafter (n-gram counts, best-first growth) with this configuration."""
    def make():
        lookup = PromptLookup(config)

        def propose(history, budget):
            found = lookup.candidates(history[-1], budget)
            return found.tokens, found.parents
        return lookup.extend, propose
    return make


def recent(depth: int, max_ngram: int = 3, occurrences: int = 16) -> Callable[[], tuple[Callable, Proposer]]:
    """The earlier drafter: continuations of the most recent occurrences, longest n-gram first, as a trie."""
    def make():
        history: list[int] = []

        def propose(_, budget):
            tokens, parents, children, seen = [history[-1]], [-1], [{}], set()
            for n in range(min(max_ngram, len(history)), 0, -1):
                tail = history[-n:]
                starts = [s for s in range(n, len(history)) if history[s - n:s] == tail][-occurrences:]
                for start in reversed(starts):
                    if start in seen:
                        continue
                    seen.add(start)
                    node = 0
                    for token in history[start:start + min(depth, budget - 1)]:
                        if token not in children[node]:
                            if len(tokens) == budget:
                                return tokens, parents
                            children[node][token] = len(tokens)
                            tokens.append(token)
                            parents.append(node)
                            children.append({})
                        node = children[node][token]
            return tokens, parents
        return history.extend, propose
    return make


def replay(records: list[dict], make, budget: int) -> dict[str, float]:
    """Mean tau per prompt set of one drafter over the recorded greedy continuations."""
    taus: dict[str, list[float]] = {}
    for record in records:
        extend, propose = make()
        output = record["output"]
        history = record["prompt"] + output[:1]  # the prefill's token is the first pending root
        extend(history)
        position, rounds = 1, []
        while position < len(output):
            tokens, parents = propose(history, budget)
            children: dict[int, dict[int, int]] = {}
            for node in range(1, len(tokens)):
                children.setdefault(parents[node], {})[tokens[node]] = node
            node, accepted = 0, 0
            while position + accepted < len(output) - 1 and output[position + accepted] in children.get(node, {}):
                node = children[node][output[position + accepted]]
                accepted += 1
            committed = output[position:position + accepted + 1]  # accepted tokens and the bonus
            extend(committed)
            history += committed
            position += accepted + 1
            rounds.append(accepted + 1)
        taus.setdefault(record["set"], []).append(statistics.fmean(rounds) if rounds else 1.0)
    return {name: statistics.fmean(values) for name, values in taus.items()}


def greedy_outputs(args) -> list[dict]:
    if args.outputs and args.outputs.exists():
        return json.loads(args.outputs.read_text())
    target = load_target(args.target, "fp32")
    decoder = SpeculativeDecoder(TorchTarget(target.module, args.max_seq_len), None)
    records = []
    for prompt_set in load_prompt_sets(args.prompts, args.max_prompts):
        for prompt in prompt_set.prompts:
            ids = encode_prompt(prompt, target.tokenizer, target.config.vocab_size, None)[0]
            ids = ids[-(args.max_seq_len - args.new_tokens):]
            config = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_ids=target.eos_token_ids)
            records.append({"set": prompt_set.name, "prompt": ids, "output": decoder.generate(ids, config).output_ids})
        print(f"{prompt_set.name}: {len(prompt_set.prompts)} greedy continuations", flush=True)
    if args.outputs:
        args.outputs.write_text(json.dumps(records))
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, action="append", required=True)
    parser.add_argument("--max-prompts", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--outputs", type=Path, help="cache of the greedy continuations (read if it exists)")
    args = parser.parse_args(argv)
    records = greedy_outputs(args)
    default = LookupConfig()
    drafters = {
        "recent, depth 5 (before)": (recent(5), 8),
        "recent, depth 7": (recent(7), 8),
        "counts, depth 5": (counts(LookupConfig(depth=5)), 8),
        "counts, n-grams 1..3": (counts(LookupConfig(max_ngram=3)), 8),
        "counts, n-grams 1..5": (counts(LookupConfig(max_ngram=5)), 8),
        "counts, 2 branches": (counts(LookupConfig(branches=2)), 8),
        "counts (default)": (counts(default), default.tokens),
        "counts, 12 nodes": (counts(default), 12),
        "counts, 16 nodes": (counts(default), 16),
    }
    sets = list(dict.fromkeys(record["set"] for record in records))
    print("\n| drafter | nodes | " + " | ".join(sets) + " |")
    print("|---|---:|" + "---:|" * len(sets))
    for name, (make, budget) in drafters.items():
        taus = replay(records, make, budget)
        print(f"| {name} | {budget} | " + " | ".join(f"{taus[s]:.2f}" for s in sets) + " |", flush=True)


if __name__ == "__main__":
    main()
