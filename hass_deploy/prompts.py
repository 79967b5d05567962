"""Prompts: files in EAGLE's question format or plain `{"prompt": ...}` lines, ids, and chat templates."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hass_deploy.errors import HassDeployError


@dataclass(frozen=True)
class Prompt:
    text: str | None  # None when given as ids
    ids: list[int] | None = None
    question_id: Any = None


def parse_prompt_ids(spec: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]."""
    try:
        ids = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise HassDeployError(f"--prompt-ids must be comma-separated integers, got {spec!r}") from None
    if not ids:
        raise HassDeployError("--prompt-ids is empty: give at least one token id")
    return ids


# Benchmark prompt sets bundled with the package (prompt_sets/README.md: sources and licenses), by name:
# `--prompts mt_bench` anywhere a prompt file is taken. Never trained on (training/decontaminate.py).
PROMPT_SETS = ("mt_bench", "humaneval", "gsm8k", "alpaca")


def prompt_set_path(name: str) -> Path:
    return Path(__file__).parent / "prompt_sets" / f"{name}.jsonl"


def prompt_file(path: str | Path) -> Path:
    """A prompt file's path: `path` itself, or a bundled set's when `path` is one of PROMPT_SETS' names and no
    such file exists."""
    path = Path(path)
    return prompt_set_path(str(path)) if str(path) in PROMPT_SETS and not path.exists() else path


def _prompt_records(path: str | Path) -> list[tuple[int, list[str], Any]]:
    """(line, turns, id) of each prompt: EAGLE question files (`{"question_id", "turns": [...]}`) and
    `{"prompt": ...}` lines."""
    path = prompt_file(path)
    if not path.is_file():
        raise HassDeployError(f"{path}: no such prompt file (or a bundled set: {', '.join(PROMPT_SETS)})")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise HassDeployError(f"{path}: not a UTF-8 text file") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise HassDeployError(f"{path}:{number}: not a JSON line") from None
        if isinstance(record, dict) and isinstance(record.get("turns"), list) and record["turns"]:
            prompts.append((number, [str(t) for t in record["turns"]], record.get("question_id")))
        elif isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append((number, [record["prompt"]], record.get("id", number)))
        else:
            raise HassDeployError(f"{path}:{number}: expected {{\"turns\": [...]}} or {{\"prompt\": ...}}")
    if not prompts:
        raise HassDeployError(f"{path}: no prompts")
    return prompts


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """The prompts of a prompt file or bundled set (a question's first turn)."""
    return [Prompt(text=turns[0], question_id=qid) for _, turns, qid in _prompt_records(path)]


def read_prompt_turns(path: str | Path) -> list[str]:
    """Every turn of every prompt (MT-bench questions have two), for keeping them out of training data."""
    return [turn for _, turns, _ in _prompt_records(path) for turn in turns]


def given_prompts(text: str | None, ids: str | None, file: str | Path | None) -> list[Prompt]:
    """The prompts of exactly one of --prompt TEXT, --prompt-ids 1,2,3 and --prompts FILE."""
    if sum(x is not None for x in (text, ids, file)) != 1:
        raise HassDeployError("give exactly one of --prompt, --prompt-ids or --prompts")
    if ids is not None:
        return [Prompt(text=None, ids=parse_prompt_ids(ids))]
    return [Prompt(text=text)] if text is not None else read_prompt_file(file)


def encode_file(path: str | Path, target_dir: str | Path, chat: bool | None = None) -> list[list[int]]:
    """Every prompt of a prompt file, encoded by the target's own tokenizer."""
    from hass_deploy.models.loading import load_tokenizer  # transformers: only when there is text to encode

    items = read_prompt_file(path)
    tokenizer = load_tokenizer(target_dir)
    return [encode(item, tokenizer, chat) for item in items]


def encode(prompt: Prompt, tokenizer: Any | None, chat: bool | None) -> list[int]:
    """Token ids of a prompt. `chat=None` applies the tokenizer's chat template when it has one."""
    if prompt.ids is not None:
        return prompt.ids
    if tokenizer is None:
        raise HassDeployError("this model directory has no tokenizer: pass --prompt-ids instead of text")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise HassDeployError("--chat was given but the tokenizer has no chat template")
    if (chat is None and has_template) or chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return list(ids)
    return list(tokenizer(prompt.text)["input_ids"])
