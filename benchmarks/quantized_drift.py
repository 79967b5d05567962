"""How far a quantised target's greedy output drifts from the fp32 model's: plain decoding through each export's
fused target graph, token for token against the first export's (the fp32 one), on the same prompts.

    python benchmarks/quantized_drift.py --target smollm2 --artifacts fp32-hass --artifacts int8-hass \
        --artifacts int4-hass --prompts mt_bench --max-prompts 20 --new-tokens 64 --out drift.json

Per export: prompts whose output is the reference's, and the new tokens that match before the first divergence
(median, and the mean share of the output). Each export decodes losslessly against its own plain decoding (bench
checks that); this is the other question, how far the quantised model is from the one it was made from.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hass_deploy.config import GenerationConfig, RuntimeConfig
from hass_deploy.generation import Pipeline
from hass_deploy.models.gguf import resolve_target
from hass_deploy.prompts import read_prompt_file


def matched(ours: list[int], reference: list[int]) -> int:
    """Tokens equal before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="The target (a directory, a GGUF or a packaged model).")
    parser.add_argument("--artifacts", action="append", required=True, help="An export; the first is the reference.")
    parser.add_argument("--prompts", action="append", required=True, help="A prompt file or bundled set name.")
    parser.add_argument("--max-prompts", type=int, default=20, help="First N prompts of each file.")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    target = resolve_target(args.target)
    outputs: dict[str, list[list[int]]] = {}
    for artifacts in args.artifacts:
        pipe = Pipeline.load(target, None, RuntimeConfig(backend="onnxruntime"), artifacts=artifacts)
        prompts = [p for file in args.prompts for p in read_prompt_file(file)[:args.max_prompts]]
        config = GenerationConfig(max_new_tokens=args.new_tokens)  # the target's own stop tokens
        outputs[artifacts] = [pipe.generate(pipe.encode(p), config).output_ids for p in prompts]
    reference = outputs[args.artifacts[0]]
    report = {"target": str(target), "prompts": args.prompts, "max_prompts": args.max_prompts,
              "new_tokens": args.new_tokens, "reference": args.artifacts[0], "exports": {}}
    for artifacts, runs in outputs.items():
        same = [matched(ours, ref) for ours, ref in zip(runs, reference)]
        row = {"identical": sum(ours == ref for ours, ref in zip(runs, reference)), "prompts": len(runs),
               "median_matched": statistics.median(same),
               "mean_matched_share": statistics.mean(n / max(len(ref), 1) for n, ref in zip(same, reference))}
        report["exports"][artifacts] = row
        print(f"{artifacts}: {row['identical']}/{row['prompts']} identical to {args.artifacts[0]}, "
              f"median {row['median_matched']:g} of {args.new_tokens} tokens before the first divergence "
              f"(mean share {row['mean_matched_share']:.2f})")
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
