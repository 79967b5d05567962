"""llama.cpp side by side with our CPU decoding: the same weights (a GGUF of our target), the same prompt token ids,
the same threads, greedy, a fixed number of new tokens (a script, not a timed test).

    python benchmarks/llama_cpp.py --llama-bin-dir LLAMA/build/bin --gguf peer/models/default-f32.gguf \
        --target ~/.cache/hass-deploy/targets/default-* --prompts QS/corpus/heldout_prompts.jsonl \
        --max-prompts 12 --new-tokens 128 --threads 2 --mode plain [--ours-json ours.jsonl] [--out llama.json]
    python benchmarks/llama_cpp.py ... --mode lookup --draft 8

Needs our package (for the tokenizer and the prompt encoding), llama.cpp's binaries (llama-completion,
llama-lookup, llama-tokenize) and a GGUF of the target; nothing else. Both come from the `llama-cpp-python`
source distribution: its vendored llama.cpp builds with cmake, and its `convert_hf_to_gguf.py` converts the target
(with the GPT-2 pre-tokenizer forced and `tokenizer_config.json`'s class set to PreTrainedTokenizerFast; see the
team's CPU-peers note).

Prompts are read and encoded exactly as `hass-deploy bench` does (`load_prompt_sets`, `encode_prompt`, the chat
template when the tokenizer has one, cut from the left to leave `max_seq_len - new_tokens` rows). llama.cpp's tools
take text, so each prompt goes in as our tokenizer's decoding of those ids, as raw bytes (`--binary-file`,
`--no-escape`: no trailing-newline strip, no escape processing), and the script checks that the ids llama.cpp
actually evaluates are ours: with `llama-tokenize` before the runs, and again from the ids run (below).

Per prompt, two llama.cpp processes:
  * the timed run, with llama.cpp's normal logging:
      - plain: `llama-completion -n N --ignore-eos --temp 0 --top-k 1` (exactly N new tokens: N - 1 single-token
        evals after one prefill batch). Times from its `common_perf_print` lines: prefill = `prompt eval time`,
        decode = `eval time` + `sampling time`.
      - lookup: `llama-lookup --spec-draft-n-max D` (prompt lookup: n-gram drafts from the context). It stops at
        the end of the first round that brings it to N tokens or more, so it may generate a few more than N; the
        count is recorded and rates use it. Times from its own `encoded ... / decoded ... in S seconds` lines
        (millisecond resolution): prefill = encoded, decode = decoded (every round, sampling and drafting
        included). Its perf lines are not used: they count draft batches as prompt eval.
  * the ids run, untimed, with debug logging (it would slow the timed run): the same command with
    `LLAMA_BATCH_DEBUG=1 -lv 5`, whose greedy output is the same (the script checks that the timed run printed the
    text of these ids). The batch debug lines show every evaluated token with its position: the prompt as evaluated
    and, in plain mode, the new tokens (run with -n N+1: the last sampled token is never evaluated); in lookup
    mode the new tokens are llama-lookup's own debug lines for every sampled token, accepted draft or not.
Wall time is prefill + decode (the generation as a whole, as `hass-deploy bench` times `generate`); decode-only
tokens/s is (new tokens - 1) / decode, the first token coming from the prefill's logits. Process start and model
load are outside both (their sum is recorded as `process_s`).

`--ours-json` compares llama.cpp's greedy ids with ours: `hass-deploy generate --no-draft --json` output (one
object per line with `prompt_ids` and `output_ids`), or any JSON list / {"runs"|"outputs"|"records": [...]} of such
objects. Records are matched to prompts by `prompt_ids` (else `question_id`, else order); our output may be
shorter (it stops at EOS; llama.cpp here ignores EOS), so ids are compared over the common length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TOOLS = {"plain": ("llama-completion", "llama-cli"), "lookup": ("llama-lookup",), "tokenize": ("llama-tokenize",)}


class Fail(Exception):
    """One line for the user; the script exits 2."""


@dataclass
class PromptResult:
    prompt_set: str
    index: int
    question_id: Any
    prompt_tokens: int
    tokenize_ok: bool  # llama-tokenize of the prompt text gives our ids
    run_prompt_ok: bool | None  # the ids run evaluated exactly our prompt ids
    new_tokens: int
    prefill_ms: float
    decode_ms: float
    process_s: float
    reruns: int = 0  # runs repeated because llama.cpp's log lost its last lines
    llama_ids: list[int] | None = None  # from the ids run
    timed_text_agrees: bool | None = None  # the timed run printed the text of those ids
    drafted: int | None = None
    accepted: int | None = None
    rounds: int | None = None  # target forwards that produced tokens (prefill included)
    ours_new_tokens: int | None = None
    ours_stop_reason: str | None = None
    compared: int | None = None  # tokens compared with ours
    first_mismatch: int | None = None  # index of the first differing new token, None when all compared agree
    text: str | None = None  # llama.cpp's new text
    notes: list[str] = field(default_factory=list)

    @property
    def wall_ms(self) -> float:
        return self.prefill_ms + self.decode_ms

    @property
    def tokens_per_s(self) -> float:
        return 1e3 * self.new_tokens / self.wall_ms if self.wall_ms > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return 1e3 * (self.new_tokens - 1) / self.decode_ms if self.decode_ms > 0 else 0.0

    @property
    def tokens_per_forward(self) -> float | None:
        return self.new_tokens / self.rounds if self.rounds else None

    @property
    def name(self) -> str:
        return f"{self.prompt_set}#{self.question_id}"

    def to_json(self) -> dict:
        return {**asdict(self), "wall_ms": self.wall_ms, "tokens_per_s": self.tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s, "tokens_per_forward": self.tokens_per_forward}


# ---------------------------------------------------------------------------------------------------------- inputs


def find_tool(bin_dir: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        path = bin_dir / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise Fail(f"{bin_dir}: no executable {' or '.join(names)} (build it: cmake --build build --target {names[0]})")


def encode_prompts(args) -> tuple[list[tuple[str, int, Any, list[int]]], Any, list[str]]:
    """(set name, index, question id, ids) per prompt, encoded as `hass-deploy bench` encodes them."""
    from hass_deploy.bench.runner import encode_prompt, load_prompt_sets
    from hass_deploy.errors import HassDeployError
    from hass_deploy.models.loading import config_from_hf, load_tokenizer, read_json

    try:
        sets = load_prompt_sets(args.prompts, args.max_prompts)
        config = config_from_hf(read_json(args.target / "config.json"), str(args.target / "config.json"))
        tokenizer = load_tokenizer(args.target)
    except HassDeployError as err:
        raise Fail(str(err)) from None
    if tokenizer is None:
        raise Fail(f"{args.target}: no tokenizer: llama.cpp's tools take prompt text, so the target must ship one")
    max_seq_len = args.max_seq_len or min(config.max_position_embeddings, 4096)  # generation.default_max_seq_len
    limit = max_seq_len - args.new_tokens  # bench's _Encoder: KV room for the new tokens
    if limit < 1:
        raise Fail(f"--new-tokens {args.new_tokens} does not fit --max-seq-len {max_seq_len}")
    out, hows = [], set()
    for prompt_set in sets:
        for index, prompt in enumerate(prompt_set.prompts):
            ids, how = encode_prompt(prompt, tokenizer, config.vocab_size, args.chat)
            hows.add(how)
            out.append((prompt_set.name, index, prompt.question_id, ids[-limit:] if len(ids) > limit else ids))
    if "bytes" in hows:
        raise Fail("prompts were encoded as raw bytes (no tokenizer): llama.cpp cannot be given those ids")
    return out, tokenizer, sorted(hows)


def load_ours(path: Path) -> list[dict]:
    """Records with `output_ids` (and ideally `prompt_ids`): generate --json lines, or a JSON list or report."""
    if not path.is_file():
        raise Fail(f"{path}: no such file (--ours-json)")
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise Fail(f"{path}: neither JSON nor JSON lines ({err})") from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("runs", "outputs", "records") if isinstance(data.get(k), list)), [data])
    records = [r for r in data if isinstance(r, dict) and isinstance(r.get("output_ids"), list)
               and (r.get("method") in (None, "plain"))]
    if not records:
        raise Fail(f"{path}: no records with output_ids (bench.json does not keep outputs; use "
                   "`hass-deploy generate --no-draft --json`)")
    return records


def match_ours(records: list[dict], prompts: list[tuple[str, int, Any, list[int]]]) -> list[tuple[dict | None, str]]:
    by_ids = {tuple(r["prompt_ids"]): r for r in records if isinstance(r.get("prompt_ids"), list)}
    by_qid = {r.get("question_id"): r for r in records if r.get("question_id") is not None}
    out = []
    for position, (_, _, qid, ids) in enumerate(prompts):
        if tuple(ids) in by_ids:
            out.append((by_ids[tuple(ids)], "prompt_ids"))
        elif by_ids:
            out.append((by_qid.get(qid), "question_id (prompt_ids differ!)") if qid in by_qid else (None, "none"))
        elif qid in by_qid:
            out.append((by_qid[qid], "question_id"))
        else:
            out.append((records[position] if position < len(records) else None, "order"))
    return out


# ------------------------------------------------------------------------------------------------------ llama.cpp


class Incomplete(Exception):
    """llama.cpp's output lacks a line we need. Its tools log through an asynchronous logger that they do not flush
    at exit, so the last lines are sometimes lost (about one run in ten here): the run is repeated."""


def run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[bytes, str, float]:
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, env=None if env is None else {**os.environ, **env})
    except subprocess.TimeoutExpired:
        raise Fail(f"{Path(cmd[0]).name} took more than --timeout {timeout:g} s: {' '.join(cmd)}") from None
    except OSError as err:
        raise Fail(f"cannot run {cmd[0]}: {err}") from None
    seconds = time.perf_counter() - started
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        last = next((line for line in reversed(stderr.splitlines()) if line.strip()), "(no output)")
        raise Fail(f"{Path(cmd[0]).name} exited {proc.returncode}: {last.strip()}   [{' '.join(cmd)}]")
    return proc.stdout, stderr, seconds


def run_parsed(cmd: list[str], parse, args, env: dict | None = None):
    """(parse(stdout, stderr), stdout, process seconds, reruns): reruns while the output is incomplete."""
    for attempt in range(args.retries + 1):
        stdout, stderr, seconds = run(cmd, args.timeout, env)
        try:
            return parse(stdout, stderr), stdout, seconds, attempt
        except Incomplete as err:
            problem = err
    raise Fail(f"{Path(cmd[0]).name}: {problem} in {args.retries + 1} runs   [{' '.join(cmd)}]")


def llama_tokenize(tool: Path, args, text_file: Path) -> list[int]:
    def parse(stdout: bytes, stderr: str) -> list[int]:
        found = re.search(rb"\[([\d,\s]*)\]", stdout)
        if found is None:
            raise Incomplete("no id list printed")
        return [int(x) for x in found.group(1).split(b",") if x.strip()]

    cmd = [str(tool), "-m", str(args.gguf), "-f", str(text_file), "--ids", "--no-escape", "--log-disable"]
    return run_parsed(cmd, parse, args)[0]


def version(tool: Path, timeout: float) -> str:
    try:
        proc = subprocess.run([str(tool), "--version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except (subprocess.TimeoutExpired, OSError):
        return "unknown"
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    found = re.search(r"version:\s*(.+)", text)
    return found.group(1).strip() if found else "unknown"


def common_args(args, text_file: Path, n_ctx: int) -> list[str]:
    return ["-m", str(args.gguf), "-bf", str(text_file), "--no-escape", "-t", str(args.threads),
            "-tb", str(args.threads), "-c", str(n_ctx), "--ignore-eos", "--temp", "0", "--top-k", "1",
            "--seed", "0", "-fa", args.flash_attn, "-ctk", args.cache_type, "-ctv", args.cache_type]


def plain_cmd(tool: Path, args, text_file: Path, n_ctx: int, n_predict: int) -> list[str]:
    return [str(tool), *common_args(args, text_file, n_ctx), "-n", str(n_predict), "-no-cnv", "--no-display-prompt",
            "-sp"]


def lookup_cmd(tool: Path, args, text_file: Path, n_ctx: int) -> list[str]:
    # llama-lookup stops once it has more than -n tokens: -n N - 1 stops it at N or just after (0 = no limit)
    return [str(tool), *common_args(args, text_file, n_ctx), "-n", str(max(args.new_tokens - 1, 1)),
            "--spec-draft-n-max", str(args.draft)]


def _number(pattern: str, text: str, what: str) -> float:
    found = re.search(pattern, text)
    if found is None:
        raise Incomplete(f"no '{what}' line in the output")
    return float(found.group(1))


def parse_plain(stdout: bytes, stderr: str) -> dict:
    """llama-completion's `common_perf_print` lines (the timed run)."""
    return {
        "prefill_ms": _number(r"prompt eval time\s*=\s*([\d.]+)\s*ms", stderr, "prompt eval time"),
        "prefill_tokens": int(_number(r"prompt eval time\s*=\s*[\d.]+\s*ms\s*/\s*(\d+)\s*tokens", stderr,
                                      "prompt eval time")),
        "eval_ms": _number(r"(?<!prompt )eval time\s*=\s*([\d.]+)\s*ms", stderr, "eval time"),
        "eval_runs": int(_number(r"(?<!prompt )eval time\s*=\s*[\d.]+\s*ms\s*/\s*(\d+)\s*runs", stderr, "eval time")),
        "sampling_ms": _number(r"sampling time\s*=\s*([\d.]+)\s*ms", stderr, "sampling time"),
    }


def parse_lookup(stdout: bytes, stderr: str) -> dict:
    """llama-lookup's own summary lines (its perf lines count draft batches as prompt eval)."""
    return {
        "prefill_tokens": int(_number(r"encoded\s+(\d+)\s+tokens in", stderr, "encoded")),
        "prefill_ms": 1e3 * _number(r"encoded\s+\d+\s+tokens in\s+([\d.]+)\s+seconds", stderr, "encoded"),
        "new_tokens": int(_number(r"decoded\s+(\d+)\s+tokens in", stderr, "decoded")),
        "decode_ms": 1e3 * _number(r"decoded\s+\d+\s+tokens in\s+([\d.]+)\s+seconds", stderr, "decoded"),
        "drafted": int(_number(r"n_drafted\s*=\s*(\d+)", stderr, "n_drafted")),
        "accepted": int(_number(r"n_accept\s*=\s*(\d+)", stderr, "n_accept")),
        "perf_seen": int(_number(r"graphs reused\s*=\s*(\d+)", stderr, "graphs reused")),  # the last line logged
    }


_BATCH_TOKEN = re.compile(r"id = +(-?\d+) \(.*?\), pos = +(-?\d+), n_seq_id", re.DOTALL)
_SAMPLED = re.compile(r"the sampled target token (?:matches the \d+th drafted token )?\((-?\d+), '")


def batch_tokens(stderr: str) -> dict[int, int]:
    """position -> token id of the evaluated tokens (LLAMA_BATCH_DEBUG prints every batch and ubatch). The warm-up
    batch before the prompt also starts at position 0: a batch at position 0 starts the map afresh; a position
    evaluated twice (a rejected draft, then the accepted token) keeps the later token."""
    seen: dict[int, int] = {}
    for token, pos in _BATCH_TOKEN.findall(stderr):
        if int(pos) == 0:
            seen = {}
        seen[int(pos)] = int(token)
    return seen


def plain_ids_parser(prompt_tokens: int, new_tokens: int):
    def parse(stdout: bytes, stderr: str) -> tuple[list, list[int]]:
        parse_plain(stdout, stderr)  # logged to the end
        evaluated = batch_tokens(stderr)
        new = [evaluated.get(prompt_tokens + k) for k in range(new_tokens)]
        if None in new:
            raise Incomplete(f"the ids run shows {sum(x is not None for x in new)} of {new_tokens} new tokens")
        return [evaluated.get(p) for p in range(prompt_tokens)], new

    return parse


def lookup_ids_parser(prompt_tokens: int):
    def parse(stdout: bytes, stderr: str) -> tuple[list, list[int]]:
        summary = parse_lookup(stdout, stderr)
        sampled = [int(x) for x in _SAMPLED.findall(stderr)]
        if len(sampled) != summary["new_tokens"]:
            raise Incomplete(f"the ids run shows {len(sampled)} of {summary['new_tokens']} sampled tokens")
        evaluated = batch_tokens(stderr)
        return [evaluated.get(p) for p in range(prompt_tokens)], sampled

    return parse


def text_agrees(stdout: bytes, expected: bytes, prompt: bytes | None) -> bool:
    """The timed run printed exactly the text of the ids: llama-completion prints the new text, then "\n\n";
    llama-lookup "\n\n", the prompt, the new text, "\n\n" twice (a lost log line may drop the last of these)."""
    if prompt is not None:
        if not stdout.startswith(b"\n\n" + prompt):
            return False
        stdout = stdout[2 + len(prompt):]
    return stdout.startswith(expected) and stdout[len(expected):] in (b"", b"\n\n", b"\n\n\n\n")


# ------------------------------------------------------------------------------------------------------ the bench


def bench(args) -> dict:
    for path, what in ((args.gguf, "GGUF file"), (args.target / "config.json", "target config.json")):
        if not path.is_file():
            raise Fail(f"{path}: no such {what}")
    for path in args.prompts:
        if not path.is_file():
            raise Fail(f"{path}: no such prompt file")
    if args.ours_json is not None and not args.ours_json.is_file():
        raise Fail(f"{args.ours_json}: no such file (--ours-json)")
    tool = find_tool(args.llama_bin_dir, TOOLS[args.mode])
    tokenize_tool = find_tool(args.llama_bin_dir, TOOLS["tokenize"])
    prompts, tokenizer, encodings = encode_prompts(args)
    ours = match_ours(load_ours(args.ours_json), prompts) if args.ours_json is not None else [(None, "")] * len(prompts)
    longest = max(len(ids) for *_, ids in prompts)
    n_ctx = 256 * math.ceil((longest + args.new_tokens + args.draft + 8) / 256)
    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    log(f"{len(prompts)} prompts ({', '.join(encodings)}), {tool.name}, {args.gguf.name}, {args.threads} threads, "
        f"n_ctx {n_ctx}")

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    with tempfile.TemporaryDirectory(prefix="llama-cpp-bench-") as workdir:
        return _bench(args, tool, tokenize_tool, prompts, ours, n_ctx, decode, encodings, log, Path(workdir))


def _bench(args, tool: Path, tokenize_tool: Path, prompts, ours, n_ctx: int, decode, encodings, log,
           workdir: Path) -> dict:
    files = []
    for number, (*_, ids) in enumerate(prompts):
        files.append(workdir / f"prompt-{number}.txt")
        files[-1].write_bytes(decode(ids).encode("utf-8"))

    # 1. does llama.cpp tokenize each prompt's text back to our ids?
    tokenized_ok = []
    for (name, _, qid, ids), file in zip(prompts, files):
        theirs = llama_tokenize(tokenize_tool, args, file)
        tokenized_ok.append(theirs == ids)
        if theirs != ids:
            at = next((i for i, (a, b) in enumerate(zip(theirs, ids)) if a != b), min(len(theirs), len(ids)))
            log(f"TOKENIZATION MISMATCH {name}#{qid}: llama-tokenize gives {len(theirs)} ids, ours {len(ids)}, "
                f"first difference at {at}")

    def timed(file: Path):
        if args.mode == "plain":
            return run_parsed(plain_cmd(tool, args, file, n_ctx, args.new_tokens), parse_plain, args)
        return run_parsed(lookup_cmd(tool, args, file, n_ctx), parse_lookup, args)

    # 2. warm-up (page cache, clocks): untimed runs of the first prompt
    for _ in range(args.warmup):
        timed(files[0])

    # 3. per prompt: the timed run, then the ids run
    results = []
    debug = {"LLAMA_BATCH_DEBUG": "1"}
    for number, ((name, index, qid, ids), file) in enumerate(zip(prompts, files)):
        t, stdout, process_s, reruns = timed(file)
        r = PromptResult(prompt_set=name, index=index, question_id=qid, prompt_tokens=len(ids),
                         tokenize_ok=tokenized_ok[number], run_prompt_ok=None, new_tokens=0, prefill_ms=0.0,
                         decode_ms=0.0, process_s=process_s, reruns=reruns)
        if args.mode == "plain":
            r.new_tokens = t["eval_runs"] + 1  # N samples: the first from the prefill's logits, then one per eval
            r.prefill_ms, r.decode_ms = t["prefill_ms"], t["eval_ms"] + t["sampling_ms"]
            r.rounds = r.new_tokens
            # ids run: N + 1 samples evaluate the first N new tokens
            (fed, r.llama_ids), _, _, more = run_parsed(
                plain_cmd(tool, args, file, n_ctx, r.new_tokens + 1) + ["-lv", "5"],
                plain_ids_parser(len(ids), r.new_tokens), args, debug)
        else:
            r.new_tokens, r.prefill_ms, r.decode_ms = t["new_tokens"], t["prefill_ms"], t["decode_ms"]
            r.drafted, r.accepted = t["drafted"], t["accepted"]
            r.rounds = r.new_tokens - r.accepted  # every round ends with exactly one token that was not a draft's
            (fed, r.llama_ids), _, _, more = run_parsed(lookup_cmd(tool, args, file, n_ctx) + ["-lv", "5"],
                                                        lookup_ids_parser(len(ids)), args, debug)
            if len(r.llama_ids) != r.new_tokens:
                r.notes.append(f"the ids run made {len(r.llama_ids)} tokens, the timed run {r.new_tokens}")
        r.reruns += more
        if t["prefill_tokens"] != len(ids):
            r.notes.append(f"the prefill evaluated {t['prefill_tokens']} tokens, the prompt has {len(ids)}")
        if r.new_tokens != args.new_tokens:
            r.notes.append(f"{r.new_tokens} new tokens")
        r.run_prompt_ok = fed == ids
        if not r.run_prompt_ok:
            r.notes.append("the ids run evaluated another prompt")
        r.text = decode(r.llama_ids)
        prompt_bytes = decode(ids).encode("utf-8") if args.mode == "lookup" else None
        r.timed_text_agrees = text_agrees(stdout, r.text.encode("utf-8"), prompt_bytes)
        if not r.timed_text_agrees:
            r.notes.append("the timed run's text is not the ids run's")
        record, how = ours[number]
        if record is not None:
            mine = [int(x) for x in record["output_ids"]]
            r.ours_new_tokens, r.ours_stop_reason = len(mine), record.get("stop_reason")
            r.compared = min(len(mine), len(r.llama_ids))
            r.first_mismatch = next((i for i in range(r.compared) if mine[i] != r.llama_ids[i]), None)
            if how != "prompt_ids":
                r.notes.append(f"ours matched by {how}")
        elif args.ours_json is not None:
            r.notes.append("no record of ours for this prompt")
        results.append(r)
        log(f"{r.name}: {r.new_tokens} tokens, {r.tokens_per_s:.0f} tok/s"
            + ("" if r.first_mismatch is None else f", differs from ours at new token {r.first_mismatch}")
            + "".join(f"; {note}" for note in r.notes))

    return report(args, tool, results, n_ctx, encodings)


def report(args, tool: Path, results: list[PromptResult], n_ctx: int, encodings) -> dict:
    new = sum(r.new_tokens for r in results)
    wall = sum(r.wall_ms for r in results) / 1e3
    decode = sum(r.decode_ms for r in results) / 1e3
    rounds = sum(r.rounds or 0 for r in results)
    compared = [r for r in results if r.compared is not None]
    overall = {
        "prompts": len(results), "new_tokens": new, "wall_s": wall,
        "prefill_s": sum(r.prefill_ms for r in results) / 1e3, "decode_s": decode,
        "tokens_per_s": new / wall if wall else 0.0,  # all tokens over all time
        "decode_tokens_per_s": sum(r.new_tokens - 1 for r in results) / decode if decode else 0.0,
        "mean_tokens_per_s": statistics.fmean(r.tokens_per_s for r in results),  # hass-deploy bench's mean
        "median_tokens_per_s": statistics.median(r.tokens_per_s for r in results),
        "mean_decode_tokens_per_s": statistics.fmean(r.decode_tokens_per_s for r in results),
        "tokens_per_forward": new / rounds if rounds else None,
        "tokenization_agrees": sum(r.tokenize_ok for r in results),
        "run_prompt_agrees": sum(bool(r.run_prompt_ok) for r in results),
        "timed_text_agrees": sum(bool(r.timed_text_agrees) for r in results),
        "reruns": sum(r.reruns for r in results),
        "greedy_compared": len(compared),
        "greedy_identical": sum(r.first_mismatch is None for r in compared),
        "first_mismatches": {r.name: r.first_mismatch for r in compared if r.first_mismatch is not None},
    }
    if args.mode == "lookup":
        overall["drafted"] = sum(r.drafted or 0 for r in results)
        overall["accepted"] = sum(r.accepted or 0 for r in results)
    return {
        "tool": str(tool), "version": version(tool, args.timeout), "gguf": str(args.gguf), "target": str(args.target),
        "prompts": [str(p) for p in args.prompts], "prompt_encoding": encodings, "mode": args.mode,
        "draft": args.draft if args.mode == "lookup" else None, "new_tokens": args.new_tokens,
        "threads": args.threads, "flash_attn": args.flash_attn, "cache_type": args.cache_type, "n_ctx": n_ctx,
        "warmup": args.warmup,
        "command": " ".join(plain_cmd(tool, args, Path("PROMPT.txt"), n_ctx, args.new_tokens)
                            if args.mode == "plain" else lookup_cmd(tool, args, Path("PROMPT.txt"), n_ctx)),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "overall": overall, "runs": [r.to_json() for r in results],
    }


def table(rep: dict) -> str:
    lookup = rep["mode"] == "lookup"
    head = ["prompt", "P", "tok", "new", "prefill ms", "decode ms", "tok/s", "decode tok/s"]
    head += ["tok/fwd", "acc/drafted"] if lookup else []
    head += ["greedy vs ours"]
    rows = []
    for r in rep["runs"]:
        greedy = ("-" if r["compared"] is None else "identical" if r["first_mismatch"] is None
                  else f"differs at {r['first_mismatch']}")
        if r["compared"] is not None:
            greedy += f" ({r['compared']})"
        row = [f"{r['prompt_set']}#{r['question_id']}", str(r["prompt_tokens"]), "ok" if r["tokenize_ok"] else "DIFF",
               str(r["new_tokens"]), f"{r['prefill_ms']:.1f}", f"{r['decode_ms']:.1f}", f"{r['tokens_per_s']:.0f}",
               f"{r['decode_tokens_per_s']:.0f}"]
        row += [f"{r['tokens_per_forward']:.2f}", f"{r['accepted']}/{r['drafted']}"] if lookup else []
        rows.append(row + [greedy])
    o = rep["overall"]
    total = ["overall", "", f"{o['tokenization_agrees']}/{o['prompts']}", str(o["new_tokens"]),
             f"{1e3 * o['prefill_s']:.1f}", f"{1e3 * o['decode_s']:.1f}", f"{o['tokens_per_s']:.0f}",
             f"{o['decode_tokens_per_s']:.0f}"]
    total += [f"{o['tokens_per_forward']:.2f}", f"{o['accepted']}/{o['drafted']}"] if lookup else []
    total += [f"{o['greedy_identical']}/{o['greedy_compared']} identical" if o["greedy_compared"] else "-"]
    rows.append(total)
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                           for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ("-" if i == 0 else ":") for i, w in enumerate(widths)) + "|"
    title = (f"llama.cpp {rep['mode']}" + (f" (draft {rep['draft']})" if lookup else "")
             + f", {Path(rep['gguf']).name}, {rep['threads']} threads, {rep['new_tokens']} new tokens, "
             f"KV {rep['cache_type']}, -fa {rep['flash_attn']}, version {rep['version']}")
    tail = (f"mean over prompts {o['mean_tokens_per_s']:.0f} tok/s (median {o['median_tokens_per_s']:.0f}), "
            f"decode-only mean {o['mean_decode_tokens_per_s']:.0f}; tok/s columns: new tokens / (prefill + decode)")
    return "\n".join([title, "", line(head), sep, *map(line, rows), "", tail])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-bin-dir", type=Path, required=True, help="llama.cpp build/bin (llama-completion, ...)")
    p.add_argument("--gguf", type=Path, required=True, help="the target converted to GGUF")
    p.add_argument("--target", type=Path, required=True, help="our target model directory (for its tokenizer)")
    p.add_argument("--prompts", type=Path, action="append", required=True, help="prompt file (repeatable)")
    p.add_argument("--max-prompts", type=int, default=None, help="first N prompts of each file")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=("plain", "lookup"), default="plain")
    p.add_argument("--draft", type=int, default=8, help="lookup: at most N drafted tokens per round")
    p.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto", help="llama.cpp's -fa")
    p.add_argument("--cache-type", default="f16",
                   help="llama.cpp's KV cache type, -ctk/-ctv (its default f16; f32 for our numerics)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the chat template (default: when the tokenizer has one, as bench does)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="KV rows our bench would use (default min(max_position_embeddings, 4096)): prompts are cut "
                        "from the left to leave --new-tokens of them")
    p.add_argument("--ours-json", type=Path, default=None, help="our greedy outputs (generate --json) to compare")
    p.add_argument("--warmup", type=int, default=1, help="untimed llama.cpp runs of the first prompt first")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per llama.cpp process")
    p.add_argument("--retries", type=int, default=4, help="reruns of a llama.cpp process whose log lost lines")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.new_tokens < 1 or args.threads < 1 or args.draft < 0 or args.warmup < 0 or args.retries < 0:
        p.error("--new-tokens and --threads must be >= 1, --draft, --warmup and --retries >= 0")
    if args.max_prompts is not None and args.max_prompts < 1:
        p.error("--max-prompts must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rep = bench(args)
    except Fail as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(rep))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rep, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
