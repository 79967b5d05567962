"""The decode loop's own cost against another revision's decoder.py, side by side in one process (a script, not a test).

    git show REV:hass_deploy/runtime/decoder.py > /tmp/baseline_decoder.py
    python benchmarks/proposer_overhead.py --baseline /tmp/baseline_decoder.py [--repeats 7] [--new-tokens 96]
        [--target DIR --draft DIR]      a trained pair, e.g. the quickstart's (WORKDIR/target, WORKDIR/drafts/hass)
        [--prompt-file FILE.jsonl]      prompts encoded by the target's tokenizer (default: repeated random phrases)

The baseline file is imported as a module of its own; its imports resolve to this tree's `hass_deploy`, so it
must not need anything this tree removed. Both decoders share one target and one draft head, on the CPU: by
default a random `small` Llama target (7.4 M parameters, written to a temporary directory) and a random draft,
or the trained pair given with --target and --draft. The modes:

    plain   root-only trees: one target step per token
    draft   the draft's EAGLE-2 trees (a random draft accepts little: its steps are then mostly overhead)
    oracle  EAGLE-2 trees of a draft that replays the target's greedy output (nearly free, and its first guesses
            are right: the draft proposer's bookkeeping at full acceptance)
    lookup  prompt lookup on repetitive prompts (it accepts a lot: long paths, compaction every round)
    hybrid  the oracle draft and prompt lookup, the draft run whenever the planner's bar of 1 token a step lets it

Each repetition runs every mode with both decoders, in alternating order, over the same prompts; the table gives
the median tokens/s of the repetitions. Before timing, every mode's results (greedy, and sampled at temperature
0.8) must be equal between the decoders: tokens, accept and draft lengths, per-depth counts, draft rounds and the
stop reason; the script stops if any differs.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from hass_deploy.config import GenerationConfig, HybridConfig, LookupConfig, SamplingConfig, TreeConfig
from hass_deploy.models.checkpoint import init_draft, load_draft
from hass_deploy.models.loading import load_target
from hass_deploy.models.random_target import random_hf_model
from hass_deploy.prompts import encode_file
from hass_deploy.runtime.backends.base import DraftBackend, DraftOutput
from hass_deploy.runtime.backends.torch import TorchDraft, TorchTarget
from hass_deploy.runtime.decoder import GenerationResult, SpeculativeDecoder

MODES = ("plain", "draft", "oracle", "lookup", "hybrid")


class ReplayDraft(DraftBackend):
    """A draft backend that knows the target's greedy continuation of the prompt (`sequence`, prompt first) and
    proposes it: the pair at position t predicts token t + 2 first, then distinct tokens after it, at fixed
    log-probabilities. No model runs, so a round costs the loop and the target's step."""

    def __init__(self, vocab_size: int, hidden_size: int, max_len: int):
        self.device, self.max_len, self.vocab_size, self.hidden_size = torch.device("cpu"), max_len, vocab_size, hidden_size
        self.sequence = torch.zeros(1, dtype=torch.long)

    def _step(self, features, input_ids, position_ids, cache_len, tree_mask, top_k) -> DraftOutput:
        steps = input_ids.shape[1]
        best = self.sequence[(position_ids[0] + 2).clamp(max=self.sequence.numel() - 1)]  # [T]
        tokens = (best[:, None] + torch.arange(top_k)) % self.vocab_size  # [T, K] distinct
        logprobs = torch.cat([torch.tensor([-0.1]), -3.0 - 0.1 * torch.arange(top_k - 1)])  # [K] descending
        return DraftOutput(hidden=torch.zeros(1, steps, self.hidden_size), logprobs=logprobs.expand(1, steps, top_k),
                           tokens=tokens[None])

    def fork(self) -> "ReplayDraft":
        return ReplayDraft(self.vocab_size, self.hidden_size, self.max_len)


def load_decoder_class(path: Path) -> type:
    """`SpeculativeDecoder` of a decoder.py file, imported under a name of its own."""
    spec = importlib.util.spec_from_file_location("baseline_decoder", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.SpeculativeDecoder


def prompts(count: int, vocab: int, seed: int) -> list[list[int]]:
    """A phrase of 16 random tokens said four times, per prompt: lookup proposes from the prompt at once, and the
    random target's greedy output falls into loops that lookup then copies."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (16,), generator=generator).tolist() * 4 for _ in range(count)]


def summary(result: GenerationResult) -> tuple:
    """Everything a result says except its wall time."""
    return (result.output_ids, result.accept_lengths, result.draft_lengths, result.depth_attempts,
            result.depth_accepts, result.draft_rounds, result.stop_reason)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a decoder.py of the revision to compare with")
    parser.add_argument("--prompts", type=int, default=4, help="how many prompts")
    parser.add_argument("--prompt-file", type=Path, help="JSONL prompts for --target (its tokenizer encodes them)")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine's cores are shared)")
    parser.add_argument("--tree", default="8,4,4", help="tokens,depth,top_k of the draft's trees")
    parser.add_argument("--target", type=Path, help="a target directory (default: a random small Llama)")
    parser.add_argument("--draft", type=Path, help="a draft trained for --target (default: a random draft)")
    args = parser.parse_args()
    if (args.target is None) != (args.draft is None):
        raise SystemExit("give both --target and --draft, or neither")
    torch.set_num_threads(args.threads)

    if args.target is None:
        with tempfile.TemporaryDirectory() as directory:
            random_hf_model("llama", "small", seed=0).save_pretrained(directory)
            target = load_target(directory, tokenizer=False)
        head, described = init_draft(target, seed=7), "random llama small (7.4 M)"
    else:
        target = load_target(args.target, tokenizer=False)
        head, described = load_draft(args.draft, target)[0], f"{args.target} with {args.draft}"
    tree = TreeConfig(*(int(x) for x in args.tree.split(",")))
    max_len = 64 + args.new_tokens + tree.tokens
    target_backend = TorchTarget(target.module, max_len)
    draft_backend = TorchDraft(head, target.module.lm_head, max_len + tree.draft_rows)
    replay = ReplayDraft(target.config.vocab_size, target.config.hidden_size, max_len + tree.draft_rows)
    baseline_class = load_decoder_class(args.baseline)
    decoders = {name: {"plain": cls(target_backend, None), "lookup": cls(target_backend, None),
                       "draft": cls(target_backend, draft_backend), "oracle": cls(target_backend, replay),
                       "hybrid": cls(target_backend, replay)}
                for name, cls in (("baseline", baseline_class), ("this tree", SpeculativeDecoder))}
    greedy = GenerationConfig(max_new_tokens=args.new_tokens, tree=tree, eos_token_ids=())
    configs = {"plain": greedy, "draft": greedy, "oracle": greedy, "lookup": replace(greedy, lookup=LookupConfig()),
               "hybrid": replace(greedy, lookup=LookupConfig(), hybrid=HybridConfig(tokens_per_step=1.0))}
    ids = (prompts(args.prompts, target.config.vocab_size, seed=1) if args.prompt_file is None
           else [p[:64] for p in encode_file(args.prompt_file, args.target)[: args.prompts]])
    # The oracle's sequences: each prompt and its plain greedy continuation.
    sequences = [torch.tensor(prompt + decoders["this tree"]["plain"].generate(prompt, greedy).output_ids)
                 for prompt in ids]

    def generate(name: str, mode: str, config: GenerationConfig) -> list[GenerationResult]:
        results = []
        for prompt, sequence in zip(ids, sequences):
            replay.sequence = sequence
            results.append(decoders[name][mode].generate(prompt, config))
        return results

    sampled = SamplingConfig(temperature=0.8)
    for mode in MODES:
        for config in (configs[mode], replace(configs[mode], sampling=sampled, seed=3)):
            base, new = ([summary(r) for r in generate(name, mode, config)] for name in decoders)
            if base != new:
                raise SystemExit(f"{mode} ({'greedy' if config.sampling.greedy else 'sampled'}): the decoders' "
                                 "results differ")
    print(f"outputs identical: {len(MODES)} modes x greedy and sampled x {len(ids)} prompts")

    rates: dict[tuple[str, str], list[float]] = {(name, mode): [] for name in decoders for mode in MODES}
    tau: dict[str, float] = {}
    drafted: dict[str, float] = {}  # the share of rounds in which the draft stepped
    names = list(decoders)
    for repeat in range(args.repeats):
        for mode in MODES:
            for name in names if repeat % 2 == 0 else names[::-1]:  # alternate which decoder goes first
                results = generate(name, mode, configs[mode])
                tokens, wall = sum(len(r.output_ids) for r in results), sum(r.wall_s for r in results)
                rates[name, mode].append(tokens / wall)
                rounds = sum(r.rounds for r in results)
                tau[mode] = sum(r.tau * r.rounds for r in results) / rounds
                drafted[mode] = sum(r.draft_rounds for r in results) / rounds

    print(f"\n{described}, {args.threads} thread(s), tree {args.tree}, {len(ids)} prompts x "
          f"{args.new_tokens} new tokens, median of {args.repeats} (tokens/s)\n")
    print(f"| mode | tau | draft rounds | {' | '.join(names)} | ratio |")
    print("|---|---:|---:|" + "---:|" * (len(names) + 1))
    for mode in MODES:
        medians = [statistics.median(rates[name, mode]) for name in names]
        print(f"| {mode} | {tau[mode]:.2f} | {drafted[mode]:.0%} | {' | '.join(f'{m:.1f}' for m in medians)} | "
              f"{medians[1] / medians[0]:.3f} |")


if __name__ == "__main__":
    main()
