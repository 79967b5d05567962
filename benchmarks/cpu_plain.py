"""Plain (and speculative, prompt-lookup, hybrid) decoding on ONNX Runtime, graph variant against graph variant,
side by side (a script, not a timed test): the standard graphs, the fused ONNX Runtime graphs, and int8 and int4
exports, on the same prompts, alternating prompt by prompt so that drift on shared cores spreads over every variant.

    python benchmarks/cpu_plain.py --target T --artifacts W/onnx/hass [--int8-artifacts W/onnx-int8/hass] \
        [--int4-artifacts W/onnx-int4/hass] --prompts W/corpus/heldout_prompts.jsonl --max-prompts 12 \
        --new-tokens 128 [--draft W/drafts/hass] [--tree 11,3,2] [--lookup] [--hybrid] [--steps] [--out cpu_plain.json]

EOS is ignored, so every run makes exactly --new-tokens tokens, as llama.cpp's `--ignore-eos` runs do
(`benchmarks/llama_cpp.py`, the side-by-side peer). Every greedy output is compared token for token with the
fp32 standard graph's plain decoding (the first fp32 variant's); a quantised target is compared with its own plain
decoding (lossless) and its drift from fp32 is reported (new tokens matched before the first difference).

`--steps` adds the step-cost curve: target step latency for T = 1..64 new rows at the prompts' context, per variant.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from hass_deploy.bench.runner import encode_prompt, load_prompt_sets
from hass_deploy.config import GenerationConfig, HybridConfig, LookupConfig, TreeConfig
from hass_deploy.manifest import read_manifest
from hass_deploy.models.checkpoint import load_draft
from hass_deploy.models.loading import load_target
from hass_deploy.runtime.backends.onnxruntime import OrtConfig, open_ort_backends
from hass_deploy.runtime.decoder import SpeculativeDecoder

STEPS = (1, 2, 4, 8, 16, 32, 64)


def variants(args, target, head) -> dict[str, tuple]:
    """name -> (target backend, draft backend or None) over each export and graph kind asked for."""
    out = {}
    tree = TreeConfig(*args.tree)
    for label, artifacts in (("", args.artifacts), ("int8 ", args.int8_artifacts), ("int4 ", args.int4_artifacts)):
        if artifacts is None:
            continue
        manifest = read_manifest(artifacts)
        kinds = [k for k in args.graphs if k == "standard" or "target_ort" in manifest.graphs]
        if label:
            kinds = ["fused"]  # a quantised export's standard graphs are the fp32 reference
        for kind in kinds:
            backends = open_ort_backends(Path(artifacts), manifest, head is not None and manifest.draft is not None,
                                         args.max_seq_len, tree.draft_rows, OrtConfig(graphs=kind))
            out[f"{label}{kind}"] = backends
    return out


def step_curve(backend, context: int, repeats: int) -> dict[int, float]:
    """Median ms of a target step of T rows at `context` committed rows, T interleaved round-robin."""
    backend.step(torch.zeros(1, context, dtype=torch.long), torch.arange(context)[None], 0, None, last_only=True)
    times: dict[int, list[float]] = {t: [] for t in STEPS}
    for _ in range(repeats):
        for t in STEPS:
            ids, positions = torch.zeros(1, t, dtype=torch.long), torch.arange(context, context + t)[None]
            start = time.perf_counter()
            # A causal block of T rows with every row's logits: a tree of T nodes costs the same, and a causal
            # step is not held to the export's tree budget.
            backend.step(ids, positions, context, None)
            times[t].append(1e3 * (time.perf_counter() - start))
    return {t: statistics.median(v) for t, v in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--artifacts", type=Path, required=True, help="an fp32 export (standard + fused graphs)")
    parser.add_argument("--int8-artifacts", type=Path, help="an export with --target-quantization int8")
    parser.add_argument("--int4-artifacts", type=Path, help="an export with --target-quantization int4 (a GGUF target)")
    parser.add_argument("--draft", type=Path, help="also time speculative decoding with this draft")
    parser.add_argument("--tree", type=lambda s: tuple(int(x) for x in s.split(",")), default=(11, 3, 2))
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--max-prompts", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--graphs", type=lambda s: s.split(","), default=["standard", "fused"],
                        help="graph kinds of the fp32 export to run (standard,fused)")
    parser.add_argument("--lookup", action="store_true", help="also time prompt-lookup decoding (no draft)")
    parser.add_argument("--hybrid", action="store_true", help="also time hybrid drafting (--draft and prompt lookup)")
    parser.add_argument("--hybrid-tokens", type=int, default=HybridConfig().tokens)
    parser.add_argument("--hybrid-draft-cost", type=float, default=HybridConfig().draft_cost)
    parser.add_argument("--steps", action="store_true", help="also measure the step-cost curve T = 1..64")
    parser.add_argument("--step-repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    target = load_target(args.target, "fp32")
    head = None if args.draft is None else load_draft(args.draft, target)[0]
    prompts = [encode_prompt(p, target.tokenizer, target.config.vocab_size, None)[0]
               for s in load_prompt_sets([args.prompts], args.max_prompts) for p in s.prompts]
    backends = variants(args, target, head)
    config = GenerationConfig(max_new_tokens=args.new_tokens, tree=TreeConfig(*args.tree), eos_token_ids=(),
                              hybrid=HybridConfig(tokens=args.hybrid_tokens, draft_cost=args.hybrid_draft_cost))
    modes = ("plain", "speculative", "lookup", "hybrid")
    runs = {f"{name} {mode}": (t, d if mode in ("speculative", "hybrid") else None)
            for name, (t, d) in backends.items() for mode in modes
            if mode == "plain" or (mode == "speculative" and d) or (mode == "lookup" and args.lookup)
            or (mode == "hybrid" and d and args.hybrid)}
    configs = {name: replace(config, lookup=LookupConfig()) if name.endswith(("lookup", "hybrid")) else config
               for name in runs}
    for name, decoder_backends in runs.items():  # warm-up: sessions, plans, page cache
        SpeculativeDecoder(*decoder_backends).generate(prompts[0], configs[name])
    rates: dict[str, list[float]] = {name: [] for name in runs}
    taus: dict[str, list[float]] = {name: [] for name in runs}
    outputs: dict[str, list[list[int]]] = {name: [] for name in runs}
    names = list(runs)
    for i, ids in enumerate(prompts):
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate the order prompt by prompt
            result = SpeculativeDecoder(*runs[name]).generate(ids, configs[name])
            rates[name].append(result.tokens_per_s)
            taus[name].append(result.tau)
            outputs[name].append(result.output_ids)
        print(f"prompt {i}: " + ", ".join(f"{n} {rates[n][-1]:.0f}" for n in names), flush=True)

    reference = outputs[names[0].rsplit(" ", 1)[0] + " plain"]  # the first fp32 variant's plain decoding
    report = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "prompts": len(prompts), "new_tokens": args.new_tokens, "tree": args.tree, "variants": {}}
    print(f"\n| variant | tokens/s (median) | vs {names[0]} | tau | identical to fp32 plain | "
          f"identical to its own plain | first difference from fp32 (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = statistics.median(rates[names[0]])
    for name in names:
        own = outputs[name.rsplit(" ", 1)[0] + " plain"]
        same = sum(a == b for a, b in zip(outputs[name], reference))
        same_own = sum(a == b for a, b in zip(outputs[name], own))
        firsts = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                  for x, y in zip(outputs[name], reference)]
        median = statistics.median(rates[name])
        report["variants"][name] = {"tokens_per_s": rates[name], "median_tokens_per_s": median,
                                    "tau": statistics.mean(taus[name]), "identical_to_fp32_plain": same,
                                    "identical_to_own_plain": same_own, "first_difference": firsts}
        print(f"| {name} | {median:.1f} | {median / base:.2f}x | {statistics.mean(taus[name]):.2f} | "
              f"{same}/{len(prompts)} | {same_own}/{len(prompts)} | {statistics.median(firsts)} |")
    if args.steps:
        context = int(statistics.median(len(p) for p in prompts)) + args.new_tokens // 2
        print(f"\nstep-cost curve at {context} rows of context (ms, median of {args.step_repeats}):")
        print("| variant | " + " | ".join(f"T={t}" for t in STEPS) + " |")
        print("|---|" + "---:|" * len(STEPS))
        report["steps"] = {"context": context}
        for name, (t, _) in backends.items():
            curve = step_curve(t, context, args.step_repeats)
            report["steps"][name] = curve
            print(f"| {name} | " + " | ".join(f"{curve[s]:.2f}" for s in STEPS) + " |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
