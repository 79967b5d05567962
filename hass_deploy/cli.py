"""The `hass-deploy` command line: a thin Typer layer, every command one library call.

A `HassDeployError` (bad path, wrong model pair, bad option) prints one line and exits with code 1; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from hass_deploy.bench.config import BenchConfig
from hass_deploy.config import (GenerationConfig, HybridConfig, LookupConfig, RuntimeConfig, SamplingConfig, TrainConfig,
                                TreeConfig)
from hass_deploy.errors import HassDeployError
from hass_deploy.export.config import ExportConfig
from hass_deploy.models.widen import Widening
from hass_deploy.serving.engine import EngineConfig
from hass_deploy.serving.loadtest import LoadTestConfig
from hass_deploy.training.extract import DataConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, export and serve HASS speculative-decoding draft heads, losslessly.")

_TREE, _SAMPLING, _GEN, _RUNTIME = TreeConfig(), SamplingConfig(), GenerationConfig(), RuntimeConfig()
_LOOKUP, _HYBRID = LookupConfig(), HybridConfig()
_TRAIN = TrainConfig()
_BENCH = BenchConfig()
_LOADTEST = LoadTestConfig()
_ENGINE = EngineConfig()
_EXPORT = ExportConfig()
_DATA = DataConfig()

# Prompt lookup's and hybrid drafting's options, the same on generate, bench and serve (Typer reads each default
# object afresh for every command that uses it).
_LOOKUP_TOKENS = typer.Option(_LOOKUP.tokens, help="Prompt lookup: tree nodes verified per round, root included.")
_LOOKUP_DEPTH = typer.Option(_LOOKUP.depth, help="Prompt lookup: deepest path of its tree.")
_LOOKUP_MAX_NGRAM = typer.Option(_LOOKUP.max_ngram, help="Prompt lookup: longest n-gram matched (first).")
_LOOKUP_MIN_NGRAM = typer.Option(_LOOKUP.min_ngram, help="Prompt lookup: shortest n-gram matched (last).")
_LOOKUP_BRANCHES = typer.Option(_LOOKUP.branches, help="Prompt lookup: most continuations expanded per node.")
_LOOKUP_CORPUS = typer.Option(None, help="Prompt lookup: token ids of a static corpus (.npy, or whitespace-"
                              "separated text), used where the prompt and output have no match.")
_HYBRID_TOKENS = typer.Option(_HYBRID.tokens, help="Hybrid (draft + lookup): tree nodes verified per round, root "
                              "included.")
_HYBRID_DRAFT_COST = typer.Option(_HYBRID.draft_cost, help="Hybrid: the draft head's tree growth in verify steps; "
                                  "it runs only when its expected extra tokens pay for that (bench --tree auto "
                                  "measures it).")
_HYBRID_ROW_COST = typer.Option(_HYBRID.row_cost, help="Hybrid: a row of the draft's context pass (catching up on "
                                "rounds it skipped) in verify steps (bench --tree auto measures it).")
_HYBRID_TOKENS_PER_STEP = typer.Option(_HYBRID.tokens_per_step, help="Hybrid: the tokens a request is expected to "
                                       "make per verify step; the draft runs when its extra tokens per step of its "
                                       "cost beat this, blended with the request's own rate.")
_CUDA_GRAPHS = typer.Option(_RUNTIME.cuda_graphs, "--cuda-graphs/--no-cuda-graphs", help="On a GPU, run decode and "
                            "tree steps as captured CUDA graphs (torch and tensorrt backends).")
_ORT_PROVIDER = typer.Option(_RUNTIME.ort_provider, help="ONNX Runtime on a GPU: auto (its CUDA provider) or tensorrt "
                             "(its TensorRT provider; engines cached in the artifacts).")


def _lookup_config(tokens: int, depth: int, max_ngram: int, min_ngram: int, branches: int) -> LookupConfig:
    return LookupConfig(tokens=tokens, depth=depth, max_ngram=max_ngram, min_ngram=min_ngram, branches=branches)


def _fail(message: str) -> None:
    # One line, whatever the message: some carry a library's multi-line text (a config validation, a torch error).
    typer.echo("error: " + " ".join(line.strip() for line in message.splitlines() if line.strip()), err=True)
    raise typer.Exit(1)


def _user_errors(command):
    """Turn a HassDeployError into one line on stderr and exit code 1 (also under Typer's test runner)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except HassDeployError as err:
            _fail(str(err))

    return wrapper


@app.command("init-target")
@_user_errors
def init_target(
    out: Path = typer.Option(..., help="Directory to write the Hugging Face model into."),
    architecture: str = typer.Option("llama", help="llama, mistral, qwen2 or qwen3."),
    size: str = typer.Option("tiny", help="tiny (a few M params) or small."),
    seed: int = typer.Option(0, help="Initialisation seed."),
    force: bool = typer.Option(False, help="Overwrite a non-empty directory."),
) -> None:
    """Write a randomly initialised Llama-family model directory (for smoke tests before a real target)."""
    from hass_deploy.models.random_target import write_random_target

    if out.exists() and not out.is_dir():  # write_random_target's iterdir() would raise NotADirectoryError
        _fail(f"{out} exists and is not a directory")
    path = write_random_target(out, architecture, size, seed, force)
    typer.echo(str(path))


@app.command("init-draft")
@_user_errors
def init_draft_command(
    target: Path = typer.Option(..., help="Target model directory (Hugging Face format)."),
    out: Path = typer.Option(..., help="Directory to write the draft head into."),
    seed: int = typer.Option(0, help="Initialisation seed."),
    force: bool = typer.Option(False, help="Overwrite a non-empty directory."),
) -> None:
    """Write a randomly initialised draft head for a target (smoke tests of a deployment before training)."""
    from hass_deploy.models.checkpoint import DraftMetadata, FORMAT_VERSION, init_draft, save_draft, target_identity
    from hass_deploy.models.loading import load_target

    if out.exists() and not out.is_dir():  # iterdir() would raise NotADirectoryError
        _fail(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        _fail(f"{out} exists and is not empty (use --force to overwrite)")
    model = load_target(target, tokenizer=False)
    head = init_draft(model, seed=seed)
    save_draft(head, out, DraftMetadata(FORMAT_VERSION, "random-init", target_identity(model)))
    typer.echo(str(out))


@app.command()
@_user_errors
def generate(
    target: Path = typer.Option(..., help="Target model directory (Hugging Face format)."),
    draft: Optional[Path] = typer.Option(None, help="Draft head directory (EAGLE/HASS format)."),
    no_draft: bool = typer.Option(False, "--no-draft", help="Plain decoding of the target (the baseline)."),
    prompt: Optional[str] = typer.Option(None, help="Prompt text (needs a tokenizer)."),
    prompt_ids: Optional[str] = typer.Option(None, help="Prompt token ids, comma-separated."),
    prompts: Optional[Path] = typer.Option(None, help="JSONL prompts: EAGLE questions or {\"prompt\": ...} lines."),
    # No click `min=`: its usage error exits 2 with a multi-line box; GenerationConfig refuses < 1 in one line.
    max_new_tokens: int = typer.Option(_GEN.max_new_tokens),
    temperature: float = typer.Option(_SAMPLING.temperature, help="0 = greedy."),
    top_p: float = typer.Option(_SAMPLING.top_p),
    top_k: int = typer.Option(_SAMPLING.top_k, help="0 = off."),
    seed: int = typer.Option(_GEN.seed),
    tree_tokens: int = typer.Option(_TREE.tokens, help="Tree nodes verified per round, root included."),
    tree_depth: int = typer.Option(_TREE.depth, help="Draft levels per round."),
    tree_top_k: int = typer.Option(_TREE.top_k, help="Children per node and beam width."),
    lookup: bool = typer.Option(False, "--lookup", help="Draft by prompt lookup (n-gram counts of the prompt and "
                                "output so far) too: alone with --no-draft, merged with the draft head's tree "
                                "(hybrid) with --draft."),
    lookup_tokens: int = _LOOKUP_TOKENS,
    lookup_depth: int = _LOOKUP_DEPTH,
    lookup_max_ngram: int = _LOOKUP_MAX_NGRAM,
    lookup_min_ngram: int = _LOOKUP_MIN_NGRAM,
    lookup_branches: int = _LOOKUP_BRANCHES,
    lookup_corpus: Optional[Path] = _LOOKUP_CORPUS,
    hybrid_tokens: int = _HYBRID_TOKENS,
    hybrid_draft_cost: float = _HYBRID_DRAFT_COST,
    hybrid_row_cost: float = _HYBRID_ROW_COST,
    hybrid_tokens_per_step: float = _HYBRID_TOKENS_PER_STEP,
    cuda_graphs: bool = _CUDA_GRAPHS,
    ort_provider: str = _ORT_PROVIDER,
    dtype: str = typer.Option(_RUNTIME.dtype, help="fp32, bf16 or fp16."),
    device: str = typer.Option(_RUNTIME.device, help="cpu, cuda or cuda:N."),
    backend: str = typer.Option("auto", help="torch, onnxruntime, tensorrt (plans from export --engine trt), or auto: onnxruntime when --artifacts is given."),
    artifacts: Optional[Path] = typer.Option(None, help="`hass-deploy export` directory (--backend onnxruntime)."),
    max_seq_len: Optional[int] = typer.Option(None, help="KV cache rows (default: min(max_position_embeddings, 4096))."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Apply the chat template (default: if present)."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object per prompt on stdout."),
) -> None:
    """Generate with speculative decoding (or plain decoding with --no-draft; prompt lookup with --lookup, alone or
    beside the draft head)."""
    from hass_deploy.generation import Pipeline
    from hass_deploy.prompts import Prompt, parse_prompt_ids, read_prompt_file
    from hass_deploy.runtime.lookup import NgramCache

    if (draft is None) == (not no_draft):
        _fail("give exactly one of --draft DIR or --no-draft")
    if sum(x is not None for x in (prompt, prompt_ids, prompts)) != 1:
        _fail("give exactly one of --prompt, --prompt-ids or --prompts")
    if max_seq_len is not None and max_seq_len < 1:
        _fail(f"--max-seq-len must be >= 1, got {max_seq_len}")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k),
        tree=TreeConfig(tokens=tree_tokens, depth=tree_depth, top_k=tree_top_k),
        lookup=_lookup_config(lookup_tokens, lookup_depth, lookup_max_ngram, lookup_min_ngram, lookup_branches)
        if lookup else None,
        hybrid=HybridConfig(tokens=hybrid_tokens, draft_cost=hybrid_draft_cost, row_cost=hybrid_row_cost,
                            tokens_per_step=hybrid_tokens_per_step),
        seed=seed,
    )
    if lookup_corpus is not None and not lookup:
        _fail("--lookup-corpus is prompt lookup's: add --lookup")
    from hass_deploy.runtime.backends import choose_backend

    runtime = RuntimeConfig(backend=choose_backend(backend, artifacts), dtype=dtype, device=device,
                            max_seq_len=max_seq_len, cuda_graphs=cuda_graphs, ort_provider=ort_provider)
    if prompt_ids is not None:
        items = [Prompt(text=None, ids=parse_prompt_ids(prompt_ids))]
    elif prompt is not None:
        items = [Prompt(text=prompt)]
    else:
        items = read_prompt_file(prompts)
    # Read before any model loads, so that a bad file fails at once.
    corpus = None if lookup_corpus is None else NgramCache.from_file(lookup_corpus, config.lookup)
    pipe = Pipeline.load(target, draft, runtime, config, artifacts, corpus)
    for item in items:
        ids = pipe.encode(item, chat)
        stream = None if json_output or len(items) > 1 or pipe.target.tokenizer is None else _text_streamer(pipe)
        result = pipe.generate(ids, config, stream)
        text = pipe.decode(result.output_ids)
        if json_output:
            record = {
                "question_id": item.question_id, "prompt_ids": ids, "output_ids": result.output_ids, "text": text,
                "new_tokens": len(result.output_ids), "rounds": result.rounds,
                "accept_lengths": result.accept_lengths, "tau": result.tau, "wall_s": result.wall_s,
                "tokens_per_s": result.tokens_per_s, "stop_reason": result.stop_reason,
            }
            typer.echo(json.dumps(record))
        else:
            if stream is None:
                typer.echo(text if text is not None else ",".join(map(str, result.output_ids)))
            else:
                typer.echo("")
            typer.echo(f"[{len(result.output_ids)} tokens, {result.rounds} rounds, tau {result.tau:.2f}, "
                       f"{result.tokens_per_s:.1f} tok/s, stop: {result.stop_reason}]", err=True)


def _text_streamer(pipe):
    """Print text as rounds arrive: decode the whole output and write the part not yet shown."""
    produced: list[int] = []
    shown = [""]

    def on_tokens(tokens: list[int]) -> None:
        produced.extend(tokens)
        text = pipe.decode(produced) or ""
        sys.stdout.write(text[len(shown[0]):])
        sys.stdout.flush()
        shown[0] = text

    return on_tokens


@app.command()
@_user_errors
def train(
    target: Path = typer.Option(..., help="Target model directory the data was generated from."),
    data: Path = typer.Option(..., help="Hidden-state data directory (from `hass-deploy data`)."),
    out: Path = typer.Option(..., help="Draft directory to write (checkpointed every epoch)."),
    recipe: str = typer.Option(_TRAIN.recipe, help="hass, or eagle2 (the baseline: one step, no Top-K loss)."),
    align_steps: int = typer.Option(_TRAIN.align_steps, help="HASS harmonized forward passes per batch."),
    topk: int = typer.Option(_TRAIN.topk, help="K of the Top-K distillation loss."),
    topk_weight: float = typer.Option(_TRAIN.phases[0].topk_weight, help="Weight of the Top-K loss."),
    epochs: int = typer.Option(_TRAIN.phases[0].epochs),
    lr: float = typer.Option(_TRAIN.phases[0].lr),
    batch_size: int = typer.Option(_TRAIN.batch_size, help="Global batch (split across torchrun ranks)."),
    max_length: int = typer.Option(_TRAIN.max_length),
    precision: str = typer.Option(_TRAIN.precision, help="bf16 (autocast) or fp32."),
    schedule: str = typer.Option("single", help="single (the options above) or reference (HASS's two phases)."),
    seed: int = typer.Option(_TRAIN.seed),
    resume: bool = typer.Option(False, help="Continue an interrupted run in --out."),
    force: bool = typer.Option(False, help="Overwrite a non-empty --out."),
    device: str = typer.Option("cpu", help="cpu or cuda (cuda:LOCAL_RANK under torchrun)."),
) -> None:
    """Train a HASS (or EAGLE-2) draft head on target hidden states."""
    from hass_deploy.config import REFERENCE_SCHEDULE, Phase, TrainConfig
    from hass_deploy.training.trainer import train as run_training

    if schedule not in ("single", "reference"):
        _fail(f"--schedule must be single or reference, got {schedule!r}")
    phases = REFERENCE_SCHEDULE if schedule == "reference" else (Phase(epochs, lr, topk_weight),)
    config = TrainConfig(recipe=recipe, align_steps=align_steps, topk=topk, phases=phases, batch_size=batch_size,
                         max_length=max_length, precision=precision, seed=seed)
    metrics = run_training(target, data, out, config, resume=resume, force=force, device=device)
    typer.echo(json.dumps({"out": str(out), **{k: v for k, v in metrics.items() if k.startswith("eval_")}}))


@app.command()
@_user_errors
def data(
    target: Path = typer.Option(..., help="Target model directory (Hugging Face format, with a tokenizer)."),
    dataset: Path = typer.Option(..., help="ShareGPT JSON/JSONL, {\"text\"} or {\"ids\"} JSONL, or prompts."),
    out: Path = typer.Option(..., help="Directory for the shards and manifest.json (reruns resume)."),
    data_format: str = typer.Option(_DATA.format, "--format", help="sharegpt, text, ids, or prompts (+ --regenerate)."),
    max_samples: Optional[int] = typer.Option(_DATA.max_samples, help="Records used after the seeded shuffle."),
    max_length: int = typer.Option(_DATA.max_length, help="Tokens per sample; longer ones are truncated."),
    regenerate: bool = typer.Option(_DATA.regenerate, help="The target writes the responses (self-distillation)."),
    max_new_tokens: Optional[int] = typer.Option(_DATA.max_new_tokens, help="Per regenerated turn (default: up "
                                                 "to --max-length)."),
    temperature: float = typer.Option(_DATA.temperature, help="Of regenerated responses; 0 = greedy."),
    dtype: str = typer.Option(_DATA.dtype, help="Stored hidden states: bf16, fp16 or fp32."),
    compute_dtype: str = typer.Option(_DATA.compute_dtype, help="The target's precision while extracting: "
                                      "auto (bf16 on cuda, fp32 on cpu), bf16, fp16 or fp32."),
    device: str = typer.Option(_DATA.device, help="cpu or cuda (cuda:LOCAL_RANK under torchrun)."),
    eval_fraction: float = typer.Option(_DATA.eval_fraction, help="Held-out share (at least 1 record of >= 2)."),
    shard_size: int = typer.Option(_DATA.shard_size, help="Records per shard."),
    seed: int = typer.Option(_DATA.seed, help="Shuffle and sampling seed."),
    batch_tokens: int = typer.Option(_DATA.batch_tokens, help="Padded tokens per target pass."),
    force: bool = typer.Option(False, help="Replace data in --out from another target or other settings."),
) -> None:
    """Store a target's hidden states over a dataset for draft training (sharded safetensors + manifest.json)."""
    import os

    from hass_deploy.training.extract import generate_data

    config = DataConfig(format=data_format, max_samples=max_samples, max_length=max_length, regenerate=regenerate,
                        max_new_tokens=max_new_tokens, temperature=temperature, dtype=dtype,
                        compute_dtype=compute_dtype, device=device, eval_fraction=eval_fraction,
                        shard_size=shard_size, seed=seed, batch_tokens=batch_tokens)
    manifest = generate_data(target, dataset, out, config, force=force, progress=True)
    if os.environ.get("RANK", "0") != "0":
        return
    totals = manifest.totals
    skipped = ", ".join(f"{n} {reason}" for reason, n in totals["skipped"].items())
    typer.echo(f"train: {totals['train']['samples']} samples, {totals['train']['tokens']} tokens; eval: "
               f"{totals['eval']['samples']} samples, {totals['eval']['tokens']} tokens"
               + (f"; skipped: {skipped}" if skipped else ""), err=True)
    typer.echo(str(out))


@app.command()
@_user_errors
def export(
    target: Path = typer.Option(..., help="Target model directory (Hugging Face format)."),
    draft: Optional[Path] = typer.Option(None, help="Draft head directory (EAGLE/HASS format)."),
    no_draft: bool = typer.Option(False, "--no-draft", help="Export the target graph only (plain decoding)."),
    out: Path = typer.Option(..., help="Artifacts directory to write (graphs + manifest.json)."),
    engine: str = typer.Option(_EXPORT.engine, help="onnx, or trt: the ONNX graphs, then TensorRT plans built from "
                               "them (needs TensorRT and an NVIDIA GPU)."),
    dtype: str = typer.Option(_EXPORT.dtype, help="Weights and KV precision: fp32, fp16 or bf16."),
    max_seq_len: Optional[int] = typer.Option(None, help="KV rows S_max (default: min(max_position_embeddings, 4096))."),
    max_tree_tokens: int = typer.Option(_EXPORT.max_tree_tokens, help="Tree budget: most nodes one verify step takes."),
    max_top_k: int = typer.Option(_EXPORT.max_top_k, help="K of the draft graph's in-graph top-k."),
    prefill_chunk: int = typer.Option(_EXPORT.prefill_chunk, help="Longer prompts run as chunks of this many rows."),
    opset: int = typer.Option(_EXPORT.opset, help="ONNX opset."),
    draft_quantization: Optional[str] = typer.Option(None, help="int8: quantise the draft graph's weights for "
                                                    "ONNX Runtime CPU (output unchanged; not for TensorRT)."),
    target_quantization: Optional[str] = typer.Option(None, help="int8: the fused ONNX Runtime target graph with "
                                                     "int8 weights (lossless w.r.t. the quantised target)."),
    ort_graphs: Optional[bool] = typer.Option(None, "--ort-graphs/--no-ort-graphs", help="Also write the fused "
                                              "ONNX Runtime graphs the runtime runs (default: with fp32)."),
    attention: str = typer.Option(_EXPORT.attention, help="onnx (RMSNormalization/RotaryEmbedding: TensorRT >= "
                                  "10.15) or decomposed (plain operators: any TensorRT 10)."),
    force: bool = typer.Option(False, help="Overwrite a non-empty --out."),
) -> None:
    """Export the target and draft step graphs (ONNX, static KV buffers, tree-mask inputs) with a manifest."""
    from hass_deploy.export.onnx import export_artifacts

    if (draft is None) == (not no_draft):
        _fail("give exactly one of --draft DIR or --no-draft")
    config = ExportConfig(engine=engine, dtype=dtype, max_seq_len=max_seq_len, max_tree_tokens=max_tree_tokens,
                          max_top_k=max_top_k, prefill_chunk=prefill_chunk, opset=opset,
                          draft_quantization=draft_quantization, target_quantization=target_quantization,
                          ort_graphs=ort_graphs, attention=attention)
    manifest = export_artifacts(target, draft, out, config, force, log=lambda line: typer.echo(line, err=True))
    # The fused graphs are ONNX Runtime's by design; only the standard graphs are meant for TensorRT.
    unsupported = sorted({op for graph in manifest.graphs.values() if graph.kv_update == "runtime"
                          for op in graph.tensorrt_unsupported})
    if unsupported:
        typer.echo(f"warning: TensorRT's ONNX parser would reject: {', '.join(unsupported)}", err=True)
    typer.echo(str(out))


@app.command()
@_user_errors
def validate(
    artifacts: Path = typer.Option(..., help="`hass-deploy export` directory."),
    target: Path = typer.Option(..., help="The target model directory the graphs were exported from."),
    draft: Optional[Path] = typer.Option(None, help="The draft head directory (when the artifacts hold a draft)."),
    prompts: Optional[Path] = typer.Option(None, help="JSONL prompts (default: seeded token-id prompts)."),
    max_new_tokens: int = typer.Option(32, help="Tokens generated per prompt in the end-to-end check."),
) -> None:
    """Check the exported graphs against PyTorch: per-graph parity, then greedy token identity end to end."""
    from hass_deploy.export.parity import validate_artifacts

    ids = None
    if prompts is not None:
        from hass_deploy.models.loading import load_tokenizer
        from hass_deploy.prompts import encode, read_prompt_file

        tokenizer = load_tokenizer(target)
        ids = [encode(item, tokenizer, None) for item in read_prompt_file(prompts)]
    report = validate_artifacts(artifacts, target, draft, ids, max_new_tokens)
    typer.echo(report.render())
    if not report.passed:
        _fail("validation failed" if report.validated else "nothing could be validated on this machine (see above)")


@app.command()
@_user_errors
def bench(
    target: Path = typer.Option(..., help="Target model directory (Hugging Face format)."),
    draft: Path = typer.Option(..., help="Draft head directory (EAGLE/HASS format)."),
    baseline_draft: Optional[Path] = typer.Option(None, help="A second draft to compare, e.g. an EAGLE-2 one."),
    prompts: list[Path] = typer.Option(..., help="JSONL prompts (EAGLE questions or {\"prompt\"} lines); repeatable."),
    backend: str = typer.Option("auto", help="torch, onnxruntime, tensorrt (plans from export --engine trt), or auto: onnxruntime when --artifacts is given."),
    artifacts: Optional[Path] = typer.Option(None, help="`hass-deploy export` directory (--backend onnxruntime)."),
    baseline_artifacts: Optional[Path] = typer.Option(None, help="The baseline draft's export (onnxruntime)."),
    max_new_tokens: int = typer.Option(_BENCH.max_new_tokens),
    temperature: float = typer.Option(_SAMPLING.temperature, help="0 = greedy (outputs checked against plain)."),
    max_prompts: Optional[int] = typer.Option(_BENCH.max_prompts, help="First N prompts of each file (default: all)."),
    warmup: int = typer.Option(_BENCH.warmup, help="Untimed runs per method on the first prompt."),
    tree: Optional[str] = typer.Option(None, help="auto: choose the tree from measured costs and acceptance."),
    tree_tokens: Optional[int] = typer.Option(None, help=f"Tree nodes verified per round (default {_TREE.tokens})."),
    tree_depth: Optional[int] = typer.Option(None, help=f"Draft levels per round (default {_TREE.depth})."),
    tree_top_k: Optional[int] = typer.Option(None, help=f"Children per node and beam width (default {_TREE.top_k})."),
    lookup: bool = typer.Option(_BENCH.lookup is not None, "--lookup/--no-lookup",
                                help="Also benchmark prompt lookup (no draft model)."),
    hybrid: Optional[bool] = typer.Option(None, "--hybrid/--no-hybrid",
                                          help="Also benchmark the draft and prompt lookup in one tree (default: "
                                          "with --lookup)."),
    lookup_tokens: int = _LOOKUP_TOKENS,
    lookup_depth: int = _LOOKUP_DEPTH,
    lookup_max_ngram: int = _LOOKUP_MAX_NGRAM,
    lookup_min_ngram: int = _LOOKUP_MIN_NGRAM,
    lookup_branches: int = _LOOKUP_BRANCHES,
    hybrid_tokens: int = _HYBRID_TOKENS,
    hybrid_draft_cost: float = _HYBRID_DRAFT_COST,
    hybrid_row_cost: float = _HYBRID_ROW_COST,
    hybrid_tokens_per_step: float = _HYBRID_TOKENS_PER_STEP,
    cuda_graphs: bool = _CUDA_GRAPHS,
    ort_provider: str = _ORT_PROVIDER,
    dtype: str = typer.Option(_RUNTIME.dtype, help="fp32, bf16 or fp16."),
    device: str = typer.Option(_RUNTIME.device, help="cpu, cuda or cuda:N."),
    max_seq_len: Optional[int] = typer.Option(None, help="KV cache rows (default: min(max_position_embeddings, 4096))."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Apply the chat template (default: if present)."),
    seed: int = typer.Option(_BENCH.seed, help="Prompt i samples with seed + i."),
    out: Path = typer.Option(..., help="Directory for bench.json, bench.md and bench.png."),
) -> None:
    """Benchmark speculative against plain decoding: tau, per-depth acceptance, tokens/s, speedup, lossless check
    (the draft, a baseline draft, prompt lookup, which needs no draft model, and both in one tree: hybrid)."""
    from hass_deploy.bench import run_bench
    from hass_deploy.runtime.backends import choose_backend

    explicit = (tree_tokens, tree_depth, tree_top_k)
    if tree is not None and tree != "auto":
        _fail(f"--tree takes only `auto`, got {tree!r} (a fixed tree is --tree-tokens/--tree-depth/--tree-top-k)")
    if tree == "auto" and any(v is not None for v in explicit):
        _fail("--tree auto chooses tokens, depth and top-k itself: drop --tree-tokens/--tree-depth/--tree-top-k")
    if out.exists() and not out.is_dir():
        _fail(f"{out} exists and is not a directory")
    if max_seq_len is not None and max_seq_len < 1:
        _fail(f"--max-seq-len must be >= 1, got {max_seq_len}")
    fixed = None if tree == "auto" else TreeConfig(*(d if v is None else v for v, d in zip(
        explicit, (_TREE.tokens, _TREE.depth, _TREE.top_k))))
    if hybrid and not lookup:
        _fail("--hybrid merges prompt lookup's trees with the draft's: drop --no-lookup")
    hybrid = lookup and _BENCH.hybrid is not None if hybrid is None else hybrid
    lookup_config = _lookup_config(lookup_tokens, lookup_depth, lookup_max_ngram, lookup_min_ngram, lookup_branches)
    config = BenchConfig(max_new_tokens=max_new_tokens, sampling=SamplingConfig(temperature=temperature), tree=fixed,
                         lookup=lookup_config if lookup else None,
                         hybrid=HybridConfig(tokens=hybrid_tokens, draft_cost=hybrid_draft_cost, row_cost=hybrid_row_cost,
                                             tokens_per_step=hybrid_tokens_per_step) if hybrid else None,
                         max_prompts=max_prompts, warmup=warmup, seed=seed,
                         chat=chat, runtime=RuntimeConfig(backend=choose_backend(backend, artifacts), dtype=dtype,
                                                          device=device, max_seq_len=max_seq_len,
                                                          cuda_graphs=cuda_graphs, ort_provider=ort_provider))
    report = run_bench(target, draft, prompts, config, baseline_draft, artifacts, baseline_artifacts, out,
                       log=lambda line: typer.echo(line, err=True))
    typer.echo((out / "bench.md").read_text())
    if report.lossless is False:
        _fail(report.lossless_line())


@app.command("bench-serve")
@_user_errors
def bench_serve(
    url: str = typer.Option(_LOADTEST.url, help="The running OpenAI-compatible server (`hass-deploy serve`)."),
    prompts: list[Path] = typer.Option(..., help="JSONL prompts (EAGLE questions or {\"prompt\"} lines); repeatable; "
                                       "requests cycle through them."),
    max_prompts: Optional[int] = typer.Option(_LOADTEST.max_prompts, help="First N prompts of each file."),
    num_requests: int = typer.Option(_LOADTEST.num_requests, help="Requests sent in all."),
    concurrency: int = typer.Option(_LOADTEST.concurrency, help="Most requests in flight at once."),
    request_rate: float = typer.Option(_LOADTEST.request_rate, help="Requests/s, Poisson arrivals (inf: all at "
                                       "once)."),
    max_tokens: int = typer.Option(_LOADTEST.max_tokens, help="max_tokens of each request."),
    temperature: float = typer.Option(_LOADTEST.temperature, help="0 = greedy (what --check compares)."),
    chat: bool = typer.Option(_LOADTEST.chat, "--chat/--no-chat", help="/v1/chat/completions instead of "
                              "/v1/completions."),
    model: Optional[str] = typer.Option(_LOADTEST.model, help="Model name to request (default: the server's first)."),
    metrics_prefix: str = typer.Option(_LOADTEST.metrics_prefix, help="Prefix of the server's Prometheus counters "
                                       "(hass_deploy, vllm, ...)."),
    check: bool = typer.Option(False, "--check", help="Compare greedy responses with offline generation by --target."),
    target: Optional[Path] = typer.Option(None, help="--check: the target model directory the server serves."),
    draft: Optional[Path] = typer.Option(None, help="--check: a draft head directory (optional)."),
    artifacts: Optional[Path] = typer.Option(None, help="--check: a `hass-deploy export` directory (onnxruntime)."),
    timeout: float = typer.Option(_LOADTEST.timeout, help="Seconds per request, sent to last chunk."),
    out: Optional[Path] = typer.Option(None, help="Directory for serve_bench.json and serve_bench.md."),
    seed: int = typer.Option(_LOADTEST.seed, help="Seed of the Poisson arrival times."),
) -> None:
    """Load-test a running server: throughput, TTFT/TPOT/ITL/E2E latency, acceptance from its /metrics (and with
    --check, greedy responses against offline generation)."""
    from hass_deploy.serving.loadtest import check_line, render_markdown, run_load_test

    if not check and any(v is not None for v in (target, draft, artifacts)):
        _fail("--target, --draft and --artifacts are for --check")
    if check and target is None:
        _fail("--check needs --target (the model the server serves)")
    if check and temperature != 0:
        _fail("--check compares greedy responses: use --temperature 0")
    if out is not None and out.exists() and not out.is_dir():
        _fail(f"{out} exists and is not a directory")
    config = LoadTestConfig(url=url.rstrip("/"), model=model, num_requests=num_requests, concurrency=concurrency,
                            request_rate=request_rate, max_tokens=max_tokens, temperature=temperature, chat=chat,
                            metrics_prefix=metrics_prefix, timeout=timeout, seed=seed, max_prompts=max_prompts)
    report = run_load_test(config, prompts, out, check=check, target=target, draft=draft, artifacts=artifacts)
    typer.echo(render_markdown(report))
    if check and not report["check"]["identical"]:
        _fail(check_line(report["check"]))


@app.command()
@_user_errors
def serve(
    target: Path = typer.Option(..., help="Target model directory (Hugging Face format)."),
    draft: Optional[Path] = typer.Option(None, help="Draft head directory; without one, requests decode plainly or "
                                         "by prompt lookup."),
    artifacts: Optional[Path] = typer.Option(None, help="`hass-deploy export` directory (--backend onnxruntime)."),
    backend: str = typer.Option("auto", help="torch, onnxruntime, tensorrt (plans from export --engine trt), or auto: onnxruntime when --artifacts is given."),
    parallel: int = typer.Option(_ENGINE.parallel, help="Decoder slots: requests decoded concurrently, each with "
                                 "its own KV buffers over shared weights."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free port, printed when ready)."),
    max_queue: int = typer.Option(_ENGINE.max_queue, help="Requests waiting for a slot before new ones get 429."),
    served_model_name: Optional[str] = typer.Option(None, help="The model name clients use (default: the target "
                                                    "directory's name)."),
    shutdown_timeout: float = typer.Option(30.0, help="On SIGTERM: seconds for running requests to finish before "
                                           "they are cancelled."),
    speculation: str = typer.Option(_ENGINE.speculation, help="Per-request default (requests may override it): "
                                    "draft, lookup, hybrid (draft + lookup in one tree) or off."),
    request_timeout: Optional[float] = typer.Option(None, help="Seconds a request may take from arrival (default: "
                                                    "none; requests may set `timeout`)."),
    tree_tokens: int = typer.Option(_TREE.tokens, help="Tree nodes verified per round, root included."),
    tree_depth: int = typer.Option(_TREE.depth, help="Draft levels per round."),
    tree_top_k: int = typer.Option(_TREE.top_k, help="Children per node and beam width."),
    lookup_tokens: int = _LOOKUP_TOKENS,
    lookup_depth: int = _LOOKUP_DEPTH,
    lookup_max_ngram: int = _LOOKUP_MAX_NGRAM,
    lookup_min_ngram: int = _LOOKUP_MIN_NGRAM,
    lookup_branches: int = _LOOKUP_BRANCHES,
    lookup_corpus: Optional[Path] = _LOOKUP_CORPUS,
    hybrid_tokens: int = _HYBRID_TOKENS,
    hybrid_draft_cost: float = _HYBRID_DRAFT_COST,
    hybrid_row_cost: float = _HYBRID_ROW_COST,
    hybrid_tokens_per_step: float = _HYBRID_TOKENS_PER_STEP,
    cuda_graphs: bool = _CUDA_GRAPHS,
    ort_provider: str = _ORT_PROVIDER,
    dtype: str = typer.Option(_RUNTIME.dtype, help="fp32, bf16 or fp16 (torch backend)."),
    device: str = typer.Option(_RUNTIME.device, help="cpu or cuda (torch backend)."),
    max_seq_len: Optional[int] = typer.Option(None, help="KV rows per slot: prompt + completion (default: the "
                                              "export's, or min(max_position_embeddings, 4096))."),
    metrics_prefix: str = typer.Option("hass_deploy", help="Prefix of the Prometheus metric names."),
) -> None:
    """Serve the target (and draft) over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions,
    /v1/models, /health, /metrics."""
    from hass_deploy.runtime.backends import choose_backend
    from hass_deploy.serving.engine import Engine, EngineConfig
    from hass_deploy.serving.server import Server

    if not 0 <= port <= 65535:
        _fail(f"--port must be in 0..65535, got {port}")
    if not shutdown_timeout >= 0:
        _fail(f"--shutdown-timeout must be >= 0 seconds, got {shutdown_timeout}")
    if max_seq_len is not None and max_seq_len < 1:
        _fail(f"--max-seq-len must be >= 1, got {max_seq_len}")
    if not target.is_dir():
        _fail(f"{target}: no such model directory")
    config = EngineConfig(parallel=parallel, max_queue=max_queue, speculation=speculation,
                          request_timeout=request_timeout, tree=TreeConfig(tree_tokens, tree_depth, tree_top_k),
                          lookup=_lookup_config(lookup_tokens, lookup_depth, lookup_max_ngram, lookup_min_ngram,
                                                lookup_branches),
                          hybrid=HybridConfig(tokens=hybrid_tokens, draft_cost=hybrid_draft_cost, row_cost=hybrid_row_cost,
                                              tokens_per_step=hybrid_tokens_per_step))
    runtime = RuntimeConfig(backend=choose_backend(backend, artifacts), dtype=dtype, device=device,
                            max_seq_len=max_seq_len, cuda_graphs=cuda_graphs, ort_provider=ort_provider)
    name = served_model_name or target.resolve().name

    def load(metrics):
        return Engine.load(target, draft, config, runtime, artifacts, metrics, lookup_corpus)

    def ready(bound: int) -> None:
        typer.echo(f"serving {name} on http://{host}:{bound} ({parallel} slot{'s' * (parallel > 1)}, "
                   f"speculation {config.speculation if draft is not None else 'off/lookup'})", err=True)

    Server(load, name, host, port, shutdown_timeout, metrics_prefix, on_ready=ready).serve_until_stopped()


@app.command()
@_user_errors
def quickstart(
    workdir: Optional[Path] = typer.Option(None, help="Work directory (default: ./hass-deploy-quickstart/PRESET)."),
    preset: str = typer.Option("default", help="default (about 11 min on 2 CPU cores, target included) or "
                                               "tiny (under a minute)."),
    prompts: list[Path] = typer.Option([], help="More JSONL prompt sets to benchmark beside the held-out text."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    device: str = typer.Option("cpu", help="Where the target and drafts are trained and the data extracted (cpu "
                               "or cuda); export, validation and bench run on ONNX Runtime's CPU provider."),
) -> None:
    """The whole job on a target built here: data, HASS and EAGLE-2 drafts, ONNX export, validation, benchmark."""
    from hass_deploy.quickstart import render_summary, run_quickstart

    workdir = workdir or Path("hass-deploy-quickstart") / preset
    if workdir.exists() and not workdir.is_dir():
        _fail(f"{workdir} exists and is not a directory")
    if device != "cpu" and not device.startswith("cuda"):
        _fail(f"--device must be cpu or cuda[:N], got {device!r}")
    summary = run_quickstart(workdir, preset, tuple(prompts), progress, log=lambda line: typer.echo(line, err=True),
                             device=device)
    typer.echo(render_summary(summary))


@app.command()
@_user_errors
def widen(
    target: Path = typer.Option(..., help="Trained target model directory (Hugging Face format)."),
    out: Path = typer.Option(..., help="Directory to write: OUT/target and OUT/drafts/<each draft's directory name>."),
    hidden_size: int = typer.Option(..., help="New hidden size (>= the target's; head_dim and GQA group are kept)."),
    intermediate_size: int = typer.Option(..., help="New MLP width (>= the target's)."),
    num_layers: int = typer.Option(..., help="New number of layers (>= the target's; new ones are appended)."),
    draft: list[Path] = typer.Option([], help="A draft head of the target, widened with it; repeatable."),
    seed: int = typer.Option(Widening.seed, help="Seed of the new (random) weights."),
    dtype: str = typer.Option(Widening.dtype, help="Storage of the widened target: fp32 (logits equal the source's) "
                              "or bf16/fp16 (half the bytes; weights rounded)."),
    force: bool = typer.Option(False, help="Overwrite a non-empty --out."),
) -> None:
    """Widen a target and its drafts to a larger shape with the same logits, to measure a bigger model's speed."""
    from hass_deploy.models.widen import widen_directory

    widening = Widening(hidden_size, intermediate_size, num_layers, seed, dtype=dtype)
    widen_directory(target, out, widening, draft, force, progress=True)
    typer.echo(str(out))


def main(argv: list[str] | None = None) -> None:
    """The console script: usage mistakes (an unknown option, a value of the wrong type) are one line, exit 1."""
    try:
        code = app(args=argv, standalone_mode=False)
    except typer.Abort:
        sys.exit(1)
    except typer.TyperException as err:  # typer's click: UsageError, BadParameter, ...
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        typer.echo(f"error: {' '.join(message.split())}", err=True)
        sys.exit(1)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
