"""Where a decoding round's time goes: graph runs against the host work around them (a script, not a test).

    python benchmarks/round_profile.py --target DIR --draft DIR --artifacts DIR --prompt-file FILE \
        [--backend onnxruntime|torch] [--prompts 8] [--new-tokens 128] [--tree 11,3,2]

Speculative and plain decoding each run the same prompts (untimed warm-up first); every backend call and each
pure function of a round is wrapped with a timer. Prints ms per round of each part and the rest of the loop:
the host work a round pays beside the model steps. Prefill is inside the first target call of a prompt and is
reported on its own line.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from hass_deploy.config import GenerationConfig, TreeConfig
from hass_deploy.models.checkpoint import load_draft
from hass_deploy.models.loading import load_target
from hass_deploy.prompts import read_prompt_file
from hass_deploy.runtime import sampling, tree as trees
from hass_deploy.runtime.backends import open_backends
from hass_deploy.runtime.decoder import SpeculativeDecoder


class Timers:
    """Accumulated seconds and call counts per label."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.prefill = 0.0

    def wrap(self, owner, name: str, label: str) -> None:
        function = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = function(*args, **kwargs)
            elapsed = time.perf_counter() - start
            if label == "target step" and kwargs.get("last_only"):
                self.prefill += elapsed  # the prompt's pass, not a round's verification
            else:
                self.seconds[label] += elapsed
                self.calls[label] += 1
            return out

        setattr(owner, name, timed)

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self.prefill = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--draft", type=Path, required=True)
    parser.add_argument("--artifacts", type=Path)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--prompt-file", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--tree", default="11,3,2", help="tokens,depth,top_k")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tree = TreeConfig(*(int(x) for x in args.tree.split(",")))
    target = load_target(args.target)
    head, _ = load_draft(args.draft, target)
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    prompts = [tokenizer(p.text)["input_ids"] for p in read_prompt_file(args.prompt_file)][: args.prompts]
    target_backend, draft_backend = open_backends(args.backend, target, head, args.max_seq_len, tree.draft_rows,
                                                  args.artifacts)
    timers = Timers()
    timers.wrap(target_backend, "step", "target step")
    timers.wrap(target_backend, "compact", "KV compaction")
    timers.wrap(draft_backend, "step", "draft steps")
    # The decoder calls these as module attributes (`trees.build_tree`), so wrapping the modules' names times them.
    timers.wrap(trees, "build_tree", "build_tree")
    timers.wrap(trees, "select_beam", "select_beam")
    timers.wrap(sampling, "accept_greedy", "accept_greedy")
    config = GenerationConfig(max_new_tokens=args.new_tokens, tree=tree, eos_token_ids=())
    print(f"{args.backend}, tree {args.tree}, {len(prompts)} prompts x {args.new_tokens} new tokens (ms per round)\n")
    print("| part | speculative | plain |")
    print("|---|---:|---:|")
    rows: dict[str, dict[str, float]] = defaultdict(dict)
    for mode, decoder in (("speculative", SpeculativeDecoder(target_backend, draft_backend)),
                          ("plain", SpeculativeDecoder(target_backend, None))):
        decoder.generate(prompts[0], config)  # warm-up: plans, bindings, allocations
        timers.clear()
        wall = rounds = tokens = 0
        for ids in prompts:
            result = decoder.generate(ids, config)
            wall, rounds, tokens = wall + result.wall_s, rounds + result.rounds, tokens + len(result.output_ids)
        per_round = {label: 1e3 * seconds / rounds for label, seconds in timers.seconds.items()}
        rows[mode] = {"tokens/s": tokens / wall, "tokens per round": tokens / rounds,
                      "wall per round": 1e3 * wall / rounds, "prefill (per round)": 1e3 * timers.prefill / rounds,
                      **per_round,
                      "rest of the loop": 1e3 * (wall - timers.prefill) / rounds - sum(per_round.values())}
    for label in dict.fromkeys([*rows["speculative"], *rows["plain"]]):
        cells = [f"{rows[mode][label]:.3f}" if label in rows[mode] else "–" for mode in ("speculative", "plain")]
        print(f"| {label} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
