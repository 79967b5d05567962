"""HASS vs EAGLE-2 at equal budget, and which part of HASS does what: an ablation on one data directory.

    python benchmarks/hass_vs_eagle2.py --target DIR --data DIR --prompts FILE [--prompts FILE ...] --out DIR \
        [--variants ...] [--seed N]

Trains each variant (`VARIANTS`, all from the quickstart's `default` training settings) into OUT/<variant>
(resumable: a rerun skips finished ones), then measures decoding τ by generating greedily from the target on
each prompt file with each draft (torch backend; τ depends on neither the backend nor the machine's load) for a
tree and a chain. Prints a Markdown table with the training-time evaluation beside it. On the quickstart's work dir:

    python benchmarks/hass_vs_eagle2.py --target ~/.cache/hass-deploy/targets/default-* \\
        --data hass-deploy-quickstart/default/data \\
        --prompts hass-deploy-quickstart/default/corpus/heldout_prompts.jsonl --out ablation/
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from hass_deploy.bench.metrics import macro_tau
from hass_deploy.config import GenerationConfig, Phase, TreeConfig
from hass_deploy.generation import Pipeline
from hass_deploy.prompts import read_prompt_file
from hass_deploy.quickstart import PRESETS
from hass_deploy.training.trainer import train

LR = PRESETS["default"].train.phases[0].lr
BASE = replace(PRESETS["default"].train, phases=(Phase(2, LR, 1.0),))  # the ablation's 2-epoch base
VARIANTS = {
    "eagle2": replace(BASE, recipe="eagle2"),
    "hass": replace(BASE, recipe="hass"),
    "hass-topk0": replace(BASE, recipe="hass", phases=(Phase(2, LR, 0.0),)),
    "hass-topk0.25": replace(BASE, recipe="hass", phases=(Phase(2, LR, 0.25),)),
    # K of the Top-K loss (the paper's 10): K = 1 weights the target's greedy token, what a chain must match.
    "hass-k3": replace(BASE, recipe="hass", topk=3),
    "hass-k1": replace(BASE, recipe="hass", topk=1),
    "hass-stepw": replace(BASE, recipe="hass", step_weights=(1.0, 0.5, 0.25)),
    "eagle2-4ep": replace(BASE, recipe="eagle2", phases=(Phase(4, LR, 1.0),)),
    "hass-4ep": replace(BASE, recipe="hass", phases=(Phase(4, LR, 1.0),)),
    # The reference's order: alignment alone first, Top-K distillation only in the second phase.
    "hass-4ep-topk-late": replace(BASE, recipe="hass", phases=(Phase(2, LR, 0.0), Phase(2, LR, 1.0))),
    "hass-4ep-topk0.5": replace(BASE, recipe="hass", phases=(Phase(4, LR, 0.5),)),
    # One epoch more than the quickstart's, over its data: it would take the quickstart to about 18 minutes.
    "eagle2-3ep": replace(BASE, recipe="eagle2", phases=(Phase(3, LR, 1.0),)),
    "hass-3ep": replace(BASE, recipe="hass", phases=(Phase(3, LR, 1.0),)),
    "eagle2-6ep": replace(BASE, recipe="eagle2", phases=(Phase(6, LR, 1.0),)),
    "hass-6ep": replace(BASE, recipe="hass", phases=(Phase(6, LR, 1.0),)),
    # The aligned steps' weights: the later steps' features are the draft's own, noisier targets.
    "hass-4ep-stepw": replace(BASE, recipe="hass", phases=(Phase(4, LR, 1.0),), step_weights=(1.0, 0.5, 0.25)),
    # The reference schedule's shape: a second phase at a lower learning rate (a fresh optimizer and schedule).
    "hass-4ep-anneal": replace(BASE, recipe="hass", phases=(Phase(3, LR, 1.0), Phase(1, LR / 4, 1.0))),
    "eagle2-4ep-anneal": replace(BASE, recipe="eagle2", phases=(Phase(3, LR, 1.0), Phase(1, LR / 4, 1.0))),
    # The draft vocabulary (the default preset's is 8192 tokens): the whole target vocabulary, and half of 8192.
    "hass-vfull": replace(BASE, recipe="hass", draft_vocab=None),
    "eagle2-vfull": replace(BASE, recipe="eagle2", draft_vocab=None),
    "hass-v4096": replace(BASE, recipe="hass", draft_vocab=4096),
    # The draft layer started from the target's last decoder layer instead of random weights.
    "hass-init-last": replace(BASE, recipe="hass", init_layer="last"),
    "eagle2-init-last": replace(BASE, recipe="eagle2", init_layer="last"),
}
TREES = (TreeConfig(11, 3, 2), TreeConfig(4, 3, 1))


def decoding_tau(target: Path, draft: Path, prompts, new_tokens: int) -> list[float]:
    pipe = Pipeline.load(target, draft, generation=GenerationConfig(tree=TreeConfig(16, 4, 4)))
    taus = []
    for tree in TREES:
        # No stop tokens given: Pipeline.generate stops at the target's own (a chat model's end of turn).
        config = GenerationConfig(max_new_tokens=new_tokens, tree=tree)
        taus.append(macro_tau([pipe.generate(pipe.encode(p), config).accept_lengths for p in prompts]))
    return taus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True, action="append",
                        help="prompt file (repeatable: each is a row per draft, e.g. the shared prompt sets)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=0, help="training seed (initialisation, noise, batch order): "
                        "rerun with another to see how much of a difference is the seed's; OUT/<variant>-s<seed>")
    parser.add_argument("--max-prompts", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    prompt_sets = {path.stem: read_prompt_file(path)[: args.max_prompts] for path in args.prompts}
    rows = []
    for variant in args.variants.split(","):
        config = replace(VARIANTS[variant], seed=args.seed)
        name = variant if args.seed == 0 else f"{variant}-s{args.seed}"
        metrics = train(args.target, args.data, args.out / name, config, resume=True, progress=True)
        epochs = sum(p.epochs for p in config.phases)
        record = {}
        for set_name, prompts in prompt_sets.items():
            taus = decoding_tau(args.target, args.out / name, prompts, args.new_tokens)
            rows.append(f"| {name} | {set_name} | {epochs} | {metrics['eval_expected_tau']:.3f} | "
                        + " | ".join(f"{t:.3f}" for t in taus) + " |")
            record[set_name] = {f"{t.tokens}/{t.depth}/{t.top_k}": tau for t, tau in zip(TREES, taus)}
        (args.out / name / "decoding_tau.json").write_text(json.dumps(record) + "\n")
    print(f"\nup to {args.max_prompts} prompts per set x {args.new_tokens} greedy tokens\n")
    print("| draft | prompts | epochs | expected τ (chain of 5) | " + " | ".join(
        f"decoding τ {t.tokens}/{t.depth}/{t.top_k}" for t in TREES) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(TREES))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
