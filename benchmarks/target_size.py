"""How the predicted speedup of speculative decoding on ONNX Runtime grows with the target's size, on this machine.

    python benchmarks/target_size.py [--shapes S,default,E,G] [--taus 2.5,3,3.5]

For each shape, a random-weight Llama target and draft are exported (fp32 target, int8 draft, as the quickstart
does), the cost curve is measured the way `--tree auto` measures it (target and draft steps interleaved at a
256-row context), and `bench.tree_search` predicts steady-state plain and speculative tokens/s for a few trees
at assumed τ values. Acceptance does not depend on the weights' values here, only on τ, which is an input: the
table answers "what τ would a draft need on a target this size", not "what τ a draft gets". The per-round
bookkeeping comes from `--overhead` (default: what `--tree auto` fitted on the quickstart's default target).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from hass_deploy.bench.costs import measure_cost_curve
from hass_deploy.bench.tree_search import RoundOverhead, predict_tokens_per_s
from hass_deploy.config import TreeConfig
from hass_deploy.export.config import ExportConfig
from hass_deploy.manifest import read_manifest
from hass_deploy.export.onnx import export_onnx
from hass_deploy.models.checkpoint import init_draft
from hass_deploy.models.loading import load_target
from hass_deploy.models.random_target import random_hf_model
from hass_deploy.runtime.backends.onnxruntime import open_ort_backends

SHAPES = {  # LlamaConfig fields; `default` is the quickstart's demo target (demo.TargetRecipe)
    "S": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=4),
    "default": dict(vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                    num_attention_heads=6, num_key_value_heads=2),
    "E": dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
              num_key_value_heads=2),
    "G": dict(vocab_size=4096, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=4),
}
TREES = (TreeConfig(4, 3, 1), TreeConfig(11, 3, 2), TreeConfig(16, 4, 4))
MAX_LEN = 1024


def params(shape: dict) -> float:
    h, i, layers, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return (layers * (2 * h * h + 2 * h * kv + 3 * h * i) + 2 * v * h) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="S,default,E,G")
    parser.add_argument("--taus", default="2.5,3,3.5")
    parser.add_argument("--overhead", default="0.66,-0.14,-0.70", help="base,per_level,plain ms (RoundOverhead)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    taus = [float(t) for t in args.taus.split(",")]
    overhead = RoundOverhead(*(float(x) for x in args.overhead.split(",")))
    work = Path(tempfile.mkdtemp(prefix="target-size-"))
    print(f"| target | params (M) | T=1 ms | T=11 ms | draft step ms | plain tok/s | "
          + " | ".join(f"best speedup at τ {t:g} (tree)" for t in taus) + " |")
    print("|---|---:|---:|---:|---:|---:|" + "---|" * len(taus))
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        random_hf_model("llama", "small", seed=0, max_position_embeddings=MAX_LEN, **shape).save_pretrained(work / name)
        target = load_target(work / name, "fp32", tokenizer=False)
        artifacts = work / f"{name}-onnx"
        export_onnx(target, init_draft(target), artifacts,
                    ExportConfig(max_seq_len=MAX_LEN, max_tree_tokens=16, max_top_k=4, draft_quantization="int8"))
        ort_target, ort_draft = open_ort_backends(artifacts, read_manifest(artifacts), True, MAX_LEN, 64)
        curve = measure_cost_curve(ort_target, ort_draft, 256, (1, 4, 5, 11, 16), (1, 2, 4), 4, args.repeats)
        plain = predict_tokens_per_s(None, 1.0, curve, overhead)
        cells = []
        for tau in taus:
            best = max(TREES, key=lambda t: predict_tokens_per_s(t, min(tau, t.depth + 1), curve, overhead))
            speed = predict_tokens_per_s(best, min(tau, best.depth + 1), curve, overhead)
            cells.append(f"{speed / plain:.2f}× ({best.tokens}/{best.depth}/{best.top_k})")
        print(f"| {name} | {params(shape):.1f} | {curve.target(1):.2f} | {curve.target(11):.2f} | {curve.draft(1):.2f} "
              f"| {plain:.0f} | " + " | ".join(cells) + " |", flush=True)
        del ort_target, ort_draft


if __name__ == "__main__":
    main()
