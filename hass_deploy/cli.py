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

from hass_deploy.config import GenerationConfig, RuntimeConfig, SamplingConfig, TrainConfig, TreeConfig
from hass_deploy.errors import HassDeployError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, export and serve HASS speculative-decoding draft heads, losslessly.")

_TREE, _SAMPLING, _GEN, _RUNTIME = TreeConfig(), SamplingConfig(), GenerationConfig(), RuntimeConfig()
_TRAIN = TrainConfig()


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
    dtype: str = typer.Option(_RUNTIME.dtype, help="fp32, bf16 or fp16."),
    backend: str = typer.Option(_RUNTIME.backend, help="Runtime backend."),
    max_seq_len: Optional[int] = typer.Option(None, help="KV cache rows (default: min(max_position_embeddings, 4096))."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Apply the chat template (default: if present)."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object per prompt on stdout."),
) -> None:
    """Generate with speculative decoding (or plain decoding with --no-draft)."""
    from hass_deploy.generation import Pipeline
    from hass_deploy.prompts import Prompt, parse_prompt_ids, read_prompt_file

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
        seed=seed,
    )
    runtime = RuntimeConfig(backend=backend, dtype=dtype, max_seq_len=max_seq_len)
    if prompt_ids is not None:
        items = [Prompt(text=None, ids=parse_prompt_ids(prompt_ids))]
    elif prompt is not None:
        items = [Prompt(text=prompt)]
    else:
        items = read_prompt_file(prompts)
    pipe = Pipeline.load(target, draft, runtime, config)
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
) -> None:
    """Train a HASS (or EAGLE-2) draft head on target hidden states."""
    from hass_deploy.config import REFERENCE_SCHEDULE, Phase, TrainConfig
    from hass_deploy.training.trainer import train as run_training

    if schedule not in ("single", "reference"):
        _fail(f"--schedule must be single or reference, got {schedule!r}")
    phases = REFERENCE_SCHEDULE if schedule == "reference" else (Phase(epochs, lr, topk_weight),)
    config = TrainConfig(recipe=recipe, align_steps=align_steps, topk=topk, phases=phases, batch_size=batch_size,
                         max_length=max_length, precision=precision, seed=seed)
    metrics = run_training(target, data, out, config, resume=resume, force=force)
    typer.echo(json.dumps({"out": str(out), **{k: v for k, v in metrics.items() if k.startswith("eval_")}}))


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
