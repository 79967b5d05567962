"""ONNX Runtime step latency and speculative vs plain decoding, on this machine (a script, not a timed test).

    python benchmarks/ort_steps.py                      # a random "small" target (cpu-notes.md's S) and draft
    python benchmarks/ort_steps.py --target DIR --draft DIR [--artifacts DIR]

Part 1, per context length P (rows already in the KV cache) and new rows T:
  - `step`: one target verification step (graph run + KV write), bound KV view sized to the context;
  - `full`: the same step with the KV buffers bound at full S_max (the static-length design we did not ship);
  - `write` / `compact`: the backend's KV write of T rows and compaction of T accepted rows alone.
Part 2: greedy tokens/s of ORT speculative and ORT plain decoding on the same target, same prompts, in one
run, alternating; medians over prompts. Prints Markdown tables.
Part 3 (`--pools`, instead of part 2): the same under each ORT thread-pool setting (`POOLS`), e.g. on the
quickstart's artifacts:

    python benchmarks/ort_steps.py --target ~/.cache/hass-deploy/targets/default-* \
        --draft hass-deploy-quickstart/default/drafts/hass --artifacts hass-deploy-quickstart/default/onnx/hass \
        --prompt-file hass-deploy-quickstart/default/corpus/heldout_prompts.jsonl --prompts 8 --new-tokens 128 \
        --tree 11,3,2 --max-seq-len 1024 --skip-steps --pools
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hass_deploy.config import GenerationConfig, TreeConfig
from hass_deploy.export.config import ExportConfig
from hass_deploy.export.onnx import export_onnx
from hass_deploy.models.checkpoint import init_draft, load_draft
from hass_deploy.models.loading import load_target
from hass_deploy.models.random_target import random_hf_model
from hass_deploy.runtime.backends import open_backends
from hass_deploy.manifest import read_manifest
from hass_deploy.prompts import read_prompt_file
from hass_deploy.runtime.backends.onnxruntime import OrtConfig, open_ort_backends
from hass_deploy.runtime.kv import KVBuffers
from hass_deploy.runtime.decoder import SpeculativeDecoder

STEPS = (1, 2, 4, 8, 16, 32, 64)


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _prefilled(make_target, context: int, full_view: bool):
    """A fresh target backend with rows [0, P) filled; `full_view` binds all S_max rows from the start."""
    target = make_target()
    if full_view:
        target.stepper.kv.reserve(target.max_len)
    prompt = torch.randint(0, target.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
    target.step(prompt, torch.arange(context)[None], 0, None, last_only=True)
    return target


def _time_step(target, context: int, steps: int, repeats: int) -> float:
    ids = torch.randint(0, target.vocab_size, (1, steps))
    positions = torch.arange(context, context + steps)[None]
    mask = torch.ones(steps, steps, dtype=torch.bool).tril()[None]
    return median_ms(lambda: target.step(ids, positions, context, mask), repeats)  # rewrites rows P .. P + T


def step_latency(make_target, contexts: list[int], repeats: int) -> list[str]:
    """Markdown rows: context P, then `step / full / write / compact` for each T."""
    rows = []
    for context in contexts:
        target, full = _prefilled(make_target, context, False), _prefilled(make_target, context, True)
        kv, spec = target.stepper.kv, target.stepper.spec
        cells = []
        for steps in STEPS:
            new_rows = torch.randn(spec.num_layers, 2, 1, spec.num_kv_heads, steps, spec.head_dim)
            keep = torch.arange(steps)
            cells.append(f"{_time_step(target, context, steps, repeats):.2f} / "
                         f"{_time_step(full, context, steps, repeats):.2f} / "
                         f"{1e3 * median_ms(lambda: kv.write(context, new_rows), repeats):.0f} / "
                         f"{1e3 * median_ms(lambda: kv.compact(context, keep), repeats):.0f}")
        rows.append(f"| {context} (view {kv.rows}) | " + " | ".join(cells) + " |")
    return rows


def relayout_ms(target, contexts: list[int]) -> str:
    """Time of one growth of the bound KV view past each context (the amortised, once-per-25 %-growth copy)."""
    spec, cells = target.stepper.spec, []
    for context in contexts:
        kv = KVBuffers(spec.num_layers, spec.num_kv_heads, spec.head_dim, target.max_len, target.dtype,
                       torch.device("cpu"), full=False)
        kv.reserve(context)
        start = time.perf_counter()
        kv.reserve(kv.rows + 1)
        cells.append(f"P={context}: {1e3 * (time.perf_counter() - start):.2f} ms")
    return ", ".join(cells)


def decode_speed(backends, tree: TreeConfig, prompts: list[list[int]], new_tokens: int) -> dict[str, list[float]]:
    """Greedy tokens/s of speculative and plain decoding over the same (target, draft) backends, alternating."""
    ort_target, ort_draft = backends
    decoders = {"ORT speculative": SpeculativeDecoder(ort_target, ort_draft),
                "ORT plain": SpeculativeDecoder(ort_target, None)}
    config = GenerationConfig(max_new_tokens=new_tokens, tree=tree, eos_token_ids=())
    speeds: dict[str, list[float]] = {name: [] for name in decoders}
    taus: list[float] = []
    outputs = {}
    for ids in prompts:
        for name, decoder in decoders.items():  # alternating, so drift on a shared host hits both alike
            decoder.generate(ids, GenerationConfig(max_new_tokens=4, tree=tree, eos_token_ids=()))  # warm-up
            result = decoder.generate(ids, config)
            speeds[name].append(result.tokens_per_s)
            outputs[name] = result.output_ids
            if name == "ORT speculative":
                taus.append(result.tau)
        assert outputs["ORT speculative"] == outputs["ORT plain"], "speculative output must equal plain output"
    speeds["tau"] = taus
    return speeds


# Part 3: ONNX Runtime thread-pool settings. The shared pool is process-wide once created, so it runs last.
POOLS = {
    "per session, sleeping": OrtConfig(shared_pool=False, spinning=False),
    "per session, spinning": OrtConfig(shared_pool=False, spinning=True),
    "shared, spinning (default)": OrtConfig(),
}


def compare_pools(artifacts: Path, max_len: int, tree: TreeConfig, prompts: list[list[int]], new_tokens: int,
                  repeats: int) -> list[str]:
    """Markdown rows: T = 1 target step latency and greedy plain / speculative tok/s under each pool setting."""
    manifest = read_manifest(artifacts)
    rows = []
    for name, config in POOLS.items():
        backends = open_ort_backends(artifacts, manifest, True, max_len, tree.draft_rows, config)
        step = _time_step(_prefilled(lambda: backends[0], 256, False), 256, 1, repeats)
        speeds = decode_speed(backends, tree, prompts, new_tokens)
        plain, spec = statistics.median(speeds["ORT plain"]), statistics.median(speeds["ORT speculative"])
        rows.append(f"| {name} | {step:.2f} | {plain:.1f} | {spec:.1f} | {statistics.median(speeds['tau']):.2f} | "
                    f"{spec / plain:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, help="target directory (default: a random 'small' target)")
    parser.add_argument("--draft", type=Path, help="draft directory (default: a random draft for the target)")
    parser.add_argument("--artifacts", type=Path, help="reuse an export of --target/--draft")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--contexts", default="128,512,1024,1920")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--tree", default="8,4,4", help="tokens,depth,top_k")
    parser.add_argument("--prompt-file", type=Path, help="JSONL prompts for part 2, encoded with the target's "
                        "tokenizer (default: seeded random token ids)")
    parser.add_argument("--pools", action="store_true", help="part 3: compare ORT thread-pool settings end to end")
    parser.add_argument("--skip-steps", action="store_true", help="skip part 1 (step latency per context)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what the ORT backend sets: torch only does bookkeeping beside ORT
    work = Path(tempfile.mkdtemp(prefix="ort-bench-"))
    if args.target is None:
        args.target = work / "target"
        random_hf_model("llama", "small", seed=0, max_position_embeddings=args.max_seq_len).save_pretrained(args.target)
    target = load_target(args.target, "fp32", tokenizer=args.prompt_file is not None)
    head = init_draft(target, seed=1) if args.draft is None else load_draft(args.draft, target)[0]
    if args.artifacts is None:
        args.artifacts = work / "artifacts"
        start = time.perf_counter()
        export_onnx(target, head, args.artifacts, ExportConfig(max_seq_len=args.max_seq_len, max_tree_tokens=64))
        print(f"exported in {time.perf_counter() - start:.1f} s to {args.artifacts}")
    c = target.config
    print(f"\ntarget: {c.architecture} H{c.hidden_size} L{c.num_layers} heads {c.num_heads}/{c.num_kv_heads} "
          f"V{c.vocab_size}; S_max {args.max_seq_len}; torch {torch.__version__}; medians of {args.repeats}\n")
    def make_target():
        return open_backends("onnxruntime", target, None, args.max_seq_len, 0, args.artifacts)[0]

    if not args.skip_steps:
        print("ms per target step, `step / full / write µs / compact µs` (see the docstring)\n")
        print("| context P | " + " | ".join(f"T={t}" for t in STEPS) + " |")
        print("|---|" + "---|" * len(STEPS))
        contexts = [int(x) for x in args.contexts.split(",")]
        for row in step_latency(make_target, contexts, args.repeats):
            print(row)
        print(f"\none re-layout of the bound KV view (growth past the context): {relayout_ms(make_target(), contexts)}")
    tokens, depth, top_k = (int(x) for x in args.tree.split(","))
    tree = TreeConfig(tokens=tokens, depth=depth, top_k=top_k)
    if args.prompt_file is not None:
        prompts = [target.tokenizer(p.text)["input_ids"] for p in read_prompt_file(args.prompt_file)[: args.prompts]]
    else:
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, c.vocab_size, (n,), generator=generator).tolist()
                   for n in (16, 64, 128, 256, 32)[: args.prompts]]
    if args.pools:
        print(f"\nORT thread pools: T=1 target step at 256 rows of context (ms), greedy tok/s (median over "
              f"{len(prompts)} prompts x {args.new_tokens} new tokens), tree {args.tree}\n")
        print("| thread pools | T=1 step ms | plain tok/s | speculative tok/s | tau | speedup |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in compare_pools(args.artifacts, args.max_seq_len, tree, prompts, args.new_tokens, args.repeats):
            print(row)
        return
    speeds = decode_speed(open_backends("onnxruntime", target, head, args.max_seq_len, tree.draft_rows,
                                        args.artifacts), tree, prompts, args.new_tokens)
    plain = statistics.median(speeds["ORT plain"])
    spec = statistics.median(speeds["ORT speculative"])
    print(f"\ngreedy, {len(prompts)} prompts x {args.new_tokens} new tokens, tree {tokens}/{depth}/{top_k}\n")
    print("| decoding | tokens/s (median) | tau (median) | speedup |")
    print("|---|---|---|---|")
    print(f"| ORT plain | {plain:.1f} | 1.00 | 1.00x |")
    print(f"| ORT speculative | {spec:.1f} | {statistics.median(speeds['tau']):.2f} | {spec / plain:.2f}x |")


if __name__ == "__main__":
    main()
