"""Dataset records -> token ids and loss masks, for the three input formats of `hass-deploy data`.

* sharegpt: conversations (`{"conversations": [{"from", "value"}]}` or `{"messages": [{"role", "content"}]}`, JSON
  list or JSONL) rendered with the tokenizer's chat template. The loss mask is computed from the template, never
  from hard-coded token offsets (the reference's Llama-2/3 forks of that arithmetic, algorithm.md §2): for every
  assistant turn i the conversation is rendered up to turn i with the generation prompt (`prompt`) and up to and
  including turn i (`full`); `prompt` must be a token prefix of `full`, and the tokens in between are the assistant's,
  end-of-turn tokens included (the draft has to predict those too).
* text: `{"text": ...}` lines; every token but the first is trained.
* prompts: EAGLE question files (`{"question_id", "turns": [...]}`) or `{"prompt": ...}` lines, for `--regenerate`.
* ids: pre-tokenized `{"ids": [...]}` lines, optionally with `"loss_mask": [0/1, ...]` (default: all but the first
  token); no tokenizer needed.

A tokenizer without a chat template cannot render conversations the way the target sees them, so sharegpt data
needs one (a clear error, no guessed "role: content" fallback); prompt files without a template are encoded as
plain text, the same way `hass-deploy generate` encodes them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hass_deploy.errors import HassDeployError
from hass_deploy.training.decontaminate import Blocklist
from hass_deploy.training.jsonstream import JsonRecords

# ShareGPT speaker names (several dumps use the product's name for the assistant) -> chat-template roles.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system"}

EXPECTED = {
    "sharegpt": '{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]} '
                'or {"messages": [{"role": ..., "content": ...}, ...]}',
    "text": '{"text": ...}',
    "prompts": '{"turns": [...]} (EAGLE questions) or {"prompt": ...}',
    "ids": '{"ids": [token ids], optional "loss_mask": [0/1 per token]}',
}


class SkipRecord(Exception):
    """A record that yields no training sample (counted and reported, not an error)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One usable dataset record: chat messages (sharegpt, prompts) or a text."""

    index: int  # 0-based position in the dataset file, stored with each of its samples
    where: str  # "file:line" (JSONL) or "file: record N" (JSON list), for error messages
    messages: tuple[dict[str, str], ...] = ()  # {"role", "content"}
    text: str | None = None
    ids: tuple[int, ...] = ()  # pre-tokenized records
    loss_mask: tuple[bool, ...] | None = None
    conversation: str | None = None  # ShareGPT's id without its `_N` part suffix: the parts of one conversation

    def texts(self) -> list[str]:
        """The record's text: its turns, or its text (none for pre-tokenized ids)."""
        return [m["content"] for m in self.messages] + ([self.text] if self.text is not None else [])


@dataclass(frozen=True)
class Sample:
    record: int  # Record.index
    input_ids: list[int]
    loss_mask: list[bool]


TRUNCATED_TAIL = "cut off at the end of the file"
BENCHMARK = "shares text with a benchmark prompt"


def read_records(path: str | Path, data_format: str, regenerate: bool,
                 blocklist: Blocklist | None = None) -> tuple[list[Record], Counter]:
    """Parse a dataset file, streamed (jsonstream.py); returns the usable records and the count of skipped ones per
    reason.

    A record in the wrong shape is an error naming its line; a well-formed record that cannot train anything (a
    conversation without an assistant turn), one that shares text with a prompt of `blocklist` (decontaminate.py),
    and a last record cut off by a partial download are skipped and counted.
    """
    path = Path(path)
    if not path.is_file():
        raise HassDeployError(f"{path}: no such dataset file")
    stream = JsonRecords(path)
    records: list[Record] = []
    skipped: Counter = Counter()
    for index, (where, raw) in enumerate(stream):
        try:
            record = _parse(raw, data_format, regenerate, index, where)
        except SkipRecord as skip:
            skipped[skip.reason] += 1
            continue
        if blocklist is not None and blocklist.matches(record.texts()):
            skipped[BENCHMARK] += 1
        else:
            records.append(record)
    if stream.truncated:
        if not stream.read:
            raise HassDeployError(f"{path}: the file ends inside its first record (a partial download?): no "
                                  "complete records")
        skipped[TRUNCATED_TAIL] += 1
    if not records and not skipped:
        raise HassDeployError(f"{path}: empty dataset (no records)")
    return records, skipped


def _parse(raw: Any, data_format: str, regenerate: bool, index: int, where: str) -> Record:
    if data_format == "text":
        if not isinstance(raw, dict) or not isinstance(raw.get("text"), str):
            raise _wrong_format(raw, data_format, where)
        if not raw["text"].strip():
            raise SkipRecord("empty text")
        return Record(index, where, text=raw["text"])
    if data_format == "ids":
        return _ids_record(raw, index, where)
    if data_format == "prompts":
        if isinstance(raw, dict) and isinstance(raw.get("turns"), list) and raw["turns"] \
                and all(isinstance(t, str) for t in raw["turns"]):
            turns = raw["turns"]
        elif isinstance(raw, dict) and isinstance(raw.get("prompt"), str):
            turns = [raw["prompt"]]
        else:
            raise _wrong_format(raw, data_format, where)
        # Each question turn is answered by the target: an empty assistant message marks where.
        return Record(index, where, messages=tuple(m for t in turns for m in ({"role": "user", "content": t},
                                                                              {"role": "assistant", "content": ""})))
    messages = _conversation(raw, where)
    roles = [m["role"] for m in messages]
    unknown = [r for r in roles if r not in ROLES.values()]
    if unknown:
        raise SkipRecord(f"unknown role {unknown[0]!r}")
    if regenerate and "user" not in roles:
        raise SkipRecord("no user turn")
    if not regenerate and "assistant" not in roles:
        raise SkipRecord("no assistant turn")
    name = raw.get("id")
    return Record(index, where, messages=messages,
                  conversation=re.sub(r"_\d+$", "", name) if isinstance(name, str) and name else None)


def _ids_record(raw: Any, index: int, where: str) -> Record:
    ids = raw.get("ids") if isinstance(raw, dict) else None
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise _wrong_format(raw, "ids", where)
    mask = raw.get("loss_mask")
    if mask is not None and (not isinstance(mask, list) or len(mask) != len(ids) or any(m not in (0, 1) for m in mask)):
        raise HassDeployError(f"{where}: \"loss_mask\" must be a list of 0/1, one per token id ({len(ids)})")
    if not ids:
        raise SkipRecord("no token ids")
    return Record(index, where, ids=tuple(ids), loss_mask=None if mask is None else tuple(bool(m) for m in mask))


def _conversation(raw: Any, where: str) -> tuple[dict[str, str], ...]:
    if isinstance(raw, dict) and isinstance(raw.get("conversations"), list):
        turns, role_key, text_key = raw["conversations"], "from", "value"
    elif isinstance(raw, dict) and isinstance(raw.get("messages"), list):
        turns, role_key, text_key = raw["messages"], "role", "content"
    else:
        raise _wrong_format(raw, "sharegpt", where)
    messages = []
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) \
                or not isinstance(turn.get(text_key), str):
            raise HassDeployError(f"{where}: turn {number} must be {{\"{role_key}\": ..., \"{text_key}\": ...}} "
                                  "with string values")
        messages.append({"role": ROLES.get(turn[role_key].lower(), turn[role_key]), "content": turn[text_key]})
    return tuple(messages)


def _wrong_format(raw: Any, data_format: str, where: str) -> HassDeployError:
    hint = ""
    if isinstance(raw, dict):
        for other, keys in (("sharegpt", ("conversations", "messages")), ("text", ("text",)),
                            ("prompts", ("turns", "prompt")), ("ids", ("ids",))):
            if other != data_format and any(k in raw for k in keys):
                hint = f" (this looks like --format {other})"
                break
    return HassDeployError(f"{where}: expected {EXPECTED[data_format]} for --format {data_format}{hint}")


# ---------------------------------------------------------------------------------------------------------------
# Tokenization


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, messages: list[dict[str, str]] | tuple, generation_prompt: bool) -> list[int]:
    """Token ids of a conversation through the chat template (special tokens come from the template itself)."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as err:  # e.g. "Conversation roles must alternate user/assistant/user/assistant/..."
        raise SkipRecord(f"rejected by the chat template: {err}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """What the target is prompted with before an assistant turn: the template's generation prompt, or, without a
    template, the plain text of the (single) user turn, as `hass-deploy generate` encodes prompts."""
    if has_chat_template(tokenizer):
        return render(tokenizer, messages, generation_prompt=True)
    return list(tokenizer(messages[-1]["content"])["input_ids"])


def chain_turns(record: int, turns: list[tuple[list[int], list[int]]]) -> list[Sample]:
    """Join (prompt, completion) pairs of successive assistant turns into samples whose mask covers the completions.

    A turn continues the current sample when its prompt starts with everything so far, which is the case for
    templates that render earlier turns the same way whatever follows. Templates that do not (Qwen3 wraps only the
    last assistant turn in an empty <think> block) start a new sample at that turn, so every sample is exactly
    what the target saw when it wrote that turn.
    """
    samples: list[Sample] = []
    ids: list[int] = []
    mask: list[bool] = []
    for prompt, completion in turns:
        if ids and prompt[: len(ids)] != ids:
            samples.append(Sample(record, ids, mask))
            ids, mask = [], []
        mask = mask + [False] * (len(prompt) - len(ids)) + [True] * len(completion)
        ids = prompt + completion
    if ids:
        samples.append(Sample(record, ids, mask))
    return samples


def conversation_samples(tokenizer: Any, record: Record, max_length: int) -> list[Sample]:
    """Samples of a conversation with its own assistant turns (masks from the chat template, see module doc).
    Assistant turns before the first user turn answer nothing and are context only, as in the reference."""
    turns = []
    messages = list(record.messages)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or not any(m["role"] == "user" for m in messages[:i]):
            continue
        prompt = render(tokenizer, messages[:i], generation_prompt=True)
        if len(prompt) >= max_length:  # this turn and later ones would be truncated away
            break
        full = render(tokenizer, messages[: i + 1], generation_prompt=False)
        if full[: len(prompt)] != prompt:
            raise HassDeployError(
                f"{record.where}: the chat template is not prefix-stable: the conversation before assistant message "
                f"{i + 1} rendered with add_generation_prompt=True is not a token prefix of the conversation rendered "
                f"with that message ({_first_difference(tokenizer, prompt, full)}), so the assistant tokens cannot be "
                "located; fix the template or convert the data to --format text")
        turns.append((prompt, full[len(prompt):]))
    if not turns:
        raise SkipRecord("no assistant turn after a user turn within --max-length")
    return chain_turns(record.index, turns)


def _first_difference(tokenizer: Any, prompt: list[int], full: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    return (f"at token {at}: {tokenizer.decode(prompt[at:at + 8])!r} with the generation prompt, "
            f"{tokenizer.decode(full[at:at + 8])!r} with the message")


def text_samples(tokenizer: Any, record: Record) -> list[Sample]:
    """Plain text: every token but the first (nothing predicts it) is trained."""
    ids = list(tokenizer(record.text)["input_ids"])
    return [Sample(record.index, ids, [False] + [True] * (len(ids) - 1))]


def ids_samples(record: Record) -> list[Sample]:
    """Pre-tokenized ids with their own mask, or every token but the first trained."""
    mask = list(record.loss_mask) if record.loss_mask is not None else [False] + [True] * (len(record.ids) - 1)
    return [Sample(record.index, list(record.ids), mask)]


Generate = Callable[[list[int], int, int], list[int]]  # (prompt ids, record index, turn) -> new ids


def regenerated_samples(tokenizer: Any, record: Record, generate: Generate, eos: tuple[int, ...],
                        max_length: int) -> list[Sample]:
    """Self-distillation: the target writes every assistant turn of the record (its own text is ignored), and one
    after a trailing user turn; an assistant turn before any user turn is dropped, as the reference does.

    The stored completion is exactly the token sequence the target produced (EOS included when it stopped there);
    the next turn's prompt renders that answer's text through the template like any conversation.
    """
    plan = list(record.messages)
    if plan[-1]["role"] == "user":
        plan.append({"role": "assistant", "content": ""})
    messages: list[dict[str, str]] = []
    turns: list[tuple[list[int], list[int]]] = []
    for message in plan:
        if message["role"] != "assistant":
            messages.append(message)
            continue
        if not any(m["role"] == "user" for m in messages):
            continue
        prompt = prompt_ids(tokenizer, messages)
        if len(prompt) >= max_length:
            if not turns:
                raise SkipRecord("prompt longer than --max-length")
            break
        completion = generate(prompt, record.index, len(turns))
        turns.append((prompt, completion))
        if not has_chat_template(tokenizer):
            break  # no template to render a second turn with: the first prompt only
        text_ids = completion[:-1] if completion and completion[-1] in eos else completion
        messages.append({"role": "assistant", "content": tokenizer.decode(text_ids, skip_special_tokens=True)})
    return chain_turns(record.index, turns)
