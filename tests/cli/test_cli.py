"""Tests for the `hass-deploy` command line: happy paths end to end, and the rule that bad input gets ONE line on
stderr and exit code 1 (never a traceback, never a silent wrong answer).

Models are tiny random directories; the tokenizer is a WordLevel one built here with the `tokenizers` library.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from typer.testing import CliRunner

from hass_deploy.cli import app
from hass_deploy.models.random_target import random_hf_model

runner = CliRunner()

WORDS = ["hello", "there", "how", "are", "you", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # older click with stderr mixed into output
        return result.output


def _stderr_separate(result) -> bool:
    try:
        result.stderr
        return True
    except ValueError:
        return False


def ok(result):
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def user_error(result, *fragments: str) -> str:
    """Exit 1 through the CLI's own handler, one `error:` line on stderr, nothing on stdout, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    # An uncaught exception also gives exit code 1 under CliRunner; a handled one is a SystemExit.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    err = _stderr(result)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output and "Traceback" not in err
    if _stderr_separate(result):
        assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a 512-token target written by `init-target`, its draft by `init-draft`, a 16-token target on which a
# random draft is accepted often enough to exercise the tree, and copies of the target with tokenizers.


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def target(root) -> Path:
    result = ok(invoke("init-target", "--out", root / "target", "--architecture", "llama", "--seed", 0))
    assert result.stdout.strip() == str(root / "target")
    return root / "target"


@pytest.fixture(scope="module")
def draft(root, target) -> Path:
    result = ok(invoke("init-draft", "--target", target, "--out", root / "draft"))
    assert result.stdout.strip() == str(root / "draft")
    return root / "draft"


@pytest.fixture(scope="module")
def small_vocab(root):
    """A 16-token target (no EOS) and its random draft: drafts get accepted, so speculative == plain is a real check."""
    model = random_hf_model("llama", "tiny", 0, vocab_size=16, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, eos_token_id=None, bos_token_id=None)
    model.save_pretrained(root / "v16")
    ok(invoke("init-draft", "--target", root / "v16", "--out", root / "v16_draft", "--seed", 0))
    return model, root / "v16", root / "v16_draft"


def _tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for word in WORDS:
        vocab[word] = len(vocab)
    while len(vocab) < 512:  # every id the model can produce decodes to a word
        vocab[f"w{len(vocab)}"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


CHAT_TEMPLATE = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}</s>{% endif %}"


@pytest.fixture(scope="module")
def with_tokenizer(root, target) -> Path:
    directory = root / "target_tok"
    shutil.copytree(target, directory)
    _tokenizer(None).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def with_chat(root, target) -> Path:
    directory = root / "target_chat"
    shutil.copytree(target, directory)
    _tokenizer(CHAT_TEMPLATE).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def question_file(root) -> Path:
    path = root / "questions.jsonl"
    path.write_text(
        json.dumps({"question_id": 81, "category": "writing", "turns": ["hello there how are you", "and then?"]}) + "\n"
        + "\n"
        + json.dumps({"prompt": "the quick brown fox"}) + "\n"
    )
    return path


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


# ---------------------------------------------------------------------------------------------------------------
# init-target / init-draft


def test_init_target_writes_a_loadable_model(root):
    from hass_deploy.models.loading import load_target

    ok(invoke("init-target", "--out", root / "qwen2", "--architecture", "qwen2", "--seed", 5))
    model = load_target(root / "qwen2", tokenizer=False)
    assert model.config.architecture == "Qwen2ForCausalLM" and model.config.qkv_bias


def test_init_target_refuses_non_empty_dir_without_force(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    user_error(invoke("init-target", "--out", tmp_path), str(tmp_path), "not empty", "--force")
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert not (tmp_path / "config.json").exists()
    ok(invoke("init-target", "--out", tmp_path, "--force"))
    assert (tmp_path / "config.json").exists()


def test_init_target_refuses_a_file_as_out(tmp_path):
    (tmp_path / "file").write_text("x")
    user_error(invoke("init-target", "--out", tmp_path / "file"), "not a directory")
    assert (tmp_path / "file").read_text() == "x"


def test_init_target_unknown_architecture(tmp_path):
    user_error(invoke("init-target", "--out", tmp_path / "t", "--architecture", "gpt2"),
               "unknown architecture 'gpt2'", "llama, mistral, qwen2, qwen3")


def test_init_draft_output(draft, target):
    assert sorted(p.name for p in draft.iterdir()) == ["config.json", "hass_deploy.json", "model.safetensors"]
    meta = json.loads((draft / "hass_deploy.json").read_text())
    assert meta["recipe"] == "random-init" and meta["target"]["path"] == str(target)
    assert json.loads((draft / "config.json").read_text())["num_hidden_layers"] == 1


def test_init_draft_refuses_non_empty_dir_without_force(target, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    user_error(invoke("init-draft", "--target", target, "--out", out), str(out), "not empty", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    ok(invoke("init-draft", "--target", target, "--out", out, "--force"))
    assert (out / "model.safetensors").exists() and not (out / "notes.txt").exists()


def test_init_draft_refuses_a_file_as_out(target, tmp_path):
    (tmp_path / "file").write_text("x")
    user_error(invoke("init-draft", "--target", target, "--out", tmp_path / "file"), "not a directory")


def test_init_draft_missing_target(tmp_path):
    user_error(invoke("init-draft", "--target", tmp_path / "nope", "--out", tmp_path / "d"), "no such model directory")
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------------------------
# generate: happy paths

RECORD_KEYS = {"question_id", "prompt_ids", "output_ids", "text", "new_tokens", "rounds", "accept_lengths", "tau",
               "wall_s", "tokens_per_s", "stop_reason"}


def _greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _check_record(record: dict, prompt_ids: list[int], max_new: int) -> None:
    assert set(record) == RECORD_KEYS
    assert record["prompt_ids"] == prompt_ids
    assert record["new_tokens"] == len(record["output_ids"]) == max_new
    assert record["stop_reason"] == "max_new_tokens"
    accept = record["accept_lengths"]
    assert record["rounds"] == len(accept) and all(a >= 0 for a in accept)
    # The first token comes from the prefill; each round then yields accepted + 1 (the last one possibly cut short).
    assert 1 + sum(a + 1 for a in accept[:-1]) < record["new_tokens"] <= 1 + sum(a + 1 for a in accept)
    assert record["tau"] == pytest.approx(sum(a + 1 for a in accept) / len(accept))
    assert record["wall_s"] > 0
    assert record["tokens_per_s"] == pytest.approx(record["new_tokens"] / record["wall_s"], rel=1e-6)


def test_generate_json_greedy_draft_equals_no_draft(target, draft):
    common = ("generate", "--target", target, "--prompt-ids", "5,17,300,2,99", "--max-new-tokens", 12, "--json")
    plain = records(ok(invoke(*common, "--no-draft")))
    spec = records(ok(invoke(*common, "--draft", draft)))
    assert len(plain) == len(spec) == 1
    for record in (plain[0], spec[0]):
        _check_record(record, [5, 17, 300, 2, 99], 12)
        assert record["text"] is None  # no tokenizer in the directory
        assert record["question_id"] is None
    assert spec[0]["output_ids"] == plain[0]["output_ids"]
    assert plain[0]["accept_lengths"] == [0] * plain[0]["rounds"]


def test_speculative_greedy_is_lossless_with_accepted_drafts(small_vocab):
    model, target, draft = small_vocab
    common = ("generate", "--target", target, "--prompt-ids", "1,2,3", "--max-new-tokens", 40, "--json")
    plain = records(ok(invoke(*common, "--no-draft")))[0]
    spec = records(ok(invoke(*common, "--draft", draft, "--tree-tokens", 6, "--tree-depth", 3, "--tree-top-k", 3)))[0]
    _check_record(plain, [1, 2, 3], 40)
    _check_record(spec, [1, 2, 3], 40)
    assert sum(spec["accept_lengths"]) > 0  # the tree path really ran and committed draft tokens
    assert spec["rounds"] < plain["rounds"]
    assert spec["output_ids"] == plain["output_ids"] == _greedy_reference(model, [1, 2, 3], 40)


def test_prompt_lookup_needs_no_draft_and_is_lossless(small_vocab):
    model, target, draft = small_vocab
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    common = ("generate", "--target", target, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", 40,
              "--json")
    plain = records(ok(invoke(*common, "--no-draft")))[0]
    looked_up = records(ok(invoke(*common, "--no-draft", "--lookup")))[0]
    hybrid = records(ok(invoke(*common, "--draft", draft, "--lookup")))[0]  # with a draft: both in one tree
    costly = records(ok(invoke(*common, "--draft", draft, "--lookup", "--hybrid-tokens", 5,
                               "--hybrid-draft-cost", 100)))[0]
    narrow = records(ok(invoke(*common, "--no-draft", "--lookup", "--lookup-tokens", 3, "--lookup-depth", 2,
                               "--lookup-max-ngram", 2, "--lookup-min-ngram", 2, "--lookup-branches", 1)))[0]
    for record in (plain, looked_up, hybrid, costly, narrow):
        _check_record(record, prompt, 40)
        assert record["output_ids"] == _greedy_reference(model, prompt, 40)
    assert sum(hybrid["accept_lengths"]) > 0 and max(costly["accept_lengths"]) <= 4
    assert sum(looked_up["accept_lengths"]) > 0 and looked_up["rounds"] < plain["rounds"]
    assert max(narrow["accept_lengths"]) <= 2 and sum(narrow["accept_lengths"]) > 0


@pytest.mark.parametrize("option, value, pattern", [
    ("--lookup-tokens", "0", r"lookup[-_]tokens must be >= 1.*got 0$"),
    ("--lookup-depth", "0", r"lookup[-_]depth must be >= 1.*got 0$"),
    ("--lookup-min-ngram", "5", r"lookup[-_]min[-_]ngram <= .*lookup[-_]max[-_]ngram.*got 5 and 4$"),
    ("--lookup-branches", "0", r"lookup[-_]branches must be >= 1.*got 0$"),
    ("--hybrid-tokens", "0", r"hybrid[-_]tokens must be >= 1.*got 0$"),
    ("--hybrid-draft-cost", "-0.5", r"hybrid[-_]draft[-_]cost must be >= 0.*got -0.5$"),
])
def test_bad_lookup_sizes_are_one_line(target, option, value, pattern):
    line = user_error(_gen(target, "--no-draft", "--lookup", "--prompt-ids", "1,2", option, value))
    assert re.search(pattern, line), (pattern, line)


def test_a_static_lookup_corpus(small_vocab, tmp_path):
    """Token ids of a corpus propose where the prompt has no match; the output is plain decoding's all the same, and
    a bad corpus is one line before any model loads."""
    model, target, _ = small_vocab
    common = ("generate", "--target", target, "--no-draft", "--prompt-ids", "1,2,3", "--max-new-tokens", 24, "--json")
    plain = records(ok(invoke(*common)))[0]
    numpy.save(tmp_path / "corpus.npy", numpy.array([3] + plain["output_ids"]))  # what the target will say
    with_corpus = records(ok(invoke(*common, "--lookup", "--lookup-corpus", tmp_path / "corpus.npy")))[0]
    assert with_corpus["output_ids"] == plain["output_ids"]
    assert with_corpus["accept_lengths"][0] > 0  # the first round already copies from the corpus
    assert "--lookup-corpus is prompt lookup's" in user_error(invoke(*common, "--lookup-corpus", tmp_path / "x.npy"))
    assert "no such file" in user_error(invoke(*common, "--lookup", "--lookup-corpus", tmp_path / "x.npy"))
    (tmp_path / "big.txt").write_text("1 2 99999")
    assert "outside the target's vocabulary" in user_error(invoke(*common, "--lookup", "--lookup-corpus",
                                                                  tmp_path / "big.txt"))


def test_sampling_is_reproducible_with_a_seed(small_vocab):
    _, target, draft = small_vocab
    args = ("generate", "--target", target, "--draft", draft, "--prompt-ids", "4,5", "--max-new-tokens", 20,
            "--temperature", 1.0, "--top-p", 0.9, "--json")
    first = records(ok(invoke(*args, "--seed", 3)))[0]["output_ids"]
    assert records(ok(invoke(*args, "--seed", 3)))[0]["output_ids"] == first
    assert all(0 <= t < 16 for t in first) and len(first) == 20


def test_generate_plain_output_without_tokenizer(target):
    result = ok(invoke("generate", "--target", target, "--no-draft", "--prompt-ids", "1,2,3", "--max-new-tokens", 5))
    json_ids = records(ok(invoke("generate", "--target", target, "--no-draft", "--prompt-ids", "1,2,3",
                                 "--max-new-tokens", 5, "--json")))[0]["output_ids"]
    assert result.stdout.strip() == ",".join(map(str, json_ids))
    if _stderr_separate(result):
        assert result.stderr.startswith("[5 tokens, ") and "stop: max_new_tokens" in result.stderr


def test_generate_dtype_bf16_runs(target, draft):
    result = ok(invoke("generate", "--target", target, "--draft", draft, "--prompt-ids", "1,2,3",
                       "--max-new-tokens", 4, "--dtype", "bf16", "--json"))
    assert records(result)[0]["new_tokens"] == 4


def test_cache_full_stops_cleanly(target):
    record = records(ok(invoke("generate", "--target", target, "--no-draft", "--prompt-ids", "1,2,3",
                               "--max-new-tokens", 50, "--max-seq-len", 6, "--json")))[0]
    assert record["stop_reason"] == "cache_full"
    # 3 prompt rows + 3 verified tokens fill the 6 rows; the last sampled token needs no row of its own.
    assert 1 <= record["new_tokens"] <= 6 - 3 + 1


# ---------------------------------------------------------------------------------------------------------------
# generate: text prompts and tokenizers


def test_prompts_file_needs_a_tokenizer(target, question_file):
    user_error(invoke("generate", "--target", target, "--no-draft", "--prompts", question_file),
               "no tokenizer", "--prompt-ids")


def test_prompt_text_needs_a_tokenizer(target):
    user_error(invoke("generate", "--target", target, "--no-draft", "--prompt", "hello"), "no tokenizer", "--prompt-ids")


def test_prompt_text_end_to_end(with_tokenizer, draft):
    tokenizer = _load_tokenizer(with_tokenizer)
    result = ok(invoke("generate", "--target", with_tokenizer, "--draft", draft, "--prompt", "hello there fox",
                       "--max-new-tokens", 6, "--json"))
    record = records(result)[0]
    assert record["prompt_ids"] == [3, 4, 11]  # no chat template: the plain encoding
    assert record["text"] == tokenizer.decode(record["output_ids"], skip_special_tokens=True)
    assert record["text"].split() and all(w.startswith("w") or w in WORDS for w in record["text"].split())

    streamed = ok(invoke("generate", "--target", with_tokenizer, "--draft", draft, "--prompt", "hello there fox",
                         "--max-new-tokens", 6))
    assert streamed.stdout == record["text"] + "\n"


def test_prompts_file_end_to_end(with_tokenizer, question_file):
    result = ok(invoke("generate", "--target", with_tokenizer, "--no-draft", "--prompts", question_file,
                       "--max-new-tokens", 3, "--json"))
    first, second = records(result)
    assert first["question_id"] == 81 and first["prompt_ids"] == [3, 4, 5, 6, 7]  # the first turn only
    assert second["question_id"] == 3 and second["prompt_ids"] == [8, 9, 10, 11]  # {"prompt"} lines: line number
    assert first["new_tokens"] == second["new_tokens"] == 3
    plain = ok(invoke("generate", "--target", with_tokenizer, "--no-draft", "--prompts", question_file,
                      "--max-new-tokens", 3))
    assert plain.stdout.splitlines() == [first["text"], second["text"]]


def test_chat_flag_without_template(with_tokenizer):
    args = ("generate", "--target", with_tokenizer, "--no-draft", "--prompt", "hello you", "--max-new-tokens", 1,
            "--json")
    user_error(invoke(*args, "--chat"), "--chat", "no chat template")
    assert records(ok(invoke(*args)))[0]["prompt_ids"] == [3, 7]
    assert records(ok(invoke(*args, "--no-chat")))[0]["prompt_ids"] == [3, 7]


def test_chat_template_applied_by_default(with_chat):
    args = ("generate", "--target", with_chat, "--no-draft", "--prompt", "hello you", "--max-new-tokens", 1, "--json")
    templated = [1, 3, 7, 2]  # "<s> hello you </s>"
    assert records(ok(invoke(*args)))[0]["prompt_ids"] == templated
    assert records(ok(invoke(*args, "--chat")))[0]["prompt_ids"] == templated
    assert records(ok(invoke(*args, "--no-chat")))[0]["prompt_ids"] == [3, 7]


# ---------------------------------------------------------------------------------------------------------------
# generate: every refusal is one line and exit code 1


def _gen(target, *extra):
    return invoke("generate", "--target", target, *extra)


def test_missing_target_dir(tmp_path):
    user_error(_gen(tmp_path / "nope", "--no-draft", "--prompt-ids", "1"), str(tmp_path / "nope"),
               "no such model directory")


def test_unsupported_architecture(target, tmp_path):
    directory = tmp_path / "gpt2"
    shutil.copytree(target, directory)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (directory / "config.json").write_text(json.dumps(config))
    user_error(_gen(directory, "--no-draft", "--prompt-ids", "1"), "unsupported architecture 'GPT2LMHeadModel'",
               "LlamaForCausalLM")


def test_malformed_config_is_one_line(target, tmp_path):
    directory = tmp_path / "bad"
    shutil.copytree(target, directory)
    config = json.loads((directory / "config.json").read_text())
    config["rms_norm_eps"] = "small"  # transformers' own validation message spans several lines
    (directory / "config.json").write_text(json.dumps(config))
    user_error(_gen(directory, "--no-draft", "--prompt-ids", "1"), "config.json", "rms_norm_eps")


def test_draft_target_mismatch(root, draft):
    ok(invoke("init-target", "--out", root / "other", "--seed", 1))
    user_error(_gen(root / "other", "--draft", draft, "--prompt-ids", "1"), "made for a different target")


def test_missing_draft_dir(target, tmp_path):
    user_error(_gen(target, "--draft", tmp_path / "nodraft", "--prompt-ids", "1"), "no such draft directory")


def test_prompt_longer_than_cache(target):
    user_error(_gen(target, "--no-draft", "--prompt-ids", "1,2,3,4,5", "--max-seq-len", 4),
               "prompt of 5 tokens is longer than the KV cache (4 rows)", "--max-seq-len")


@pytest.mark.parametrize("spec", ["", " ", ",", " , "])
def test_empty_prompt_ids(target, spec):
    user_error(_gen(target, "--no-draft", "--prompt-ids", spec), "--prompt-ids is empty")


@pytest.mark.parametrize("spec", ["1,a", "1.5", "1;2", "0x10"])
def test_non_integer_prompt_ids(target, spec):
    user_error(_gen(target, "--no-draft", "--prompt-ids", spec), "--prompt-ids must be comma-separated integers",
               repr(spec))


@pytest.mark.parametrize("spec, bad", [("1,512", "512"), ("-1", "-1"), ("99999", "99999")])
def test_token_id_outside_vocab(target, spec, bad):
    user_error(_gen(target, "--no-draft", "--prompt-ids", spec), f"token id {bad} is outside the vocabulary (size 512)")


def test_both_draft_and_no_draft(target, draft):
    user_error(_gen(target, "--draft", draft, "--no-draft", "--prompt-ids", "1"), "exactly one of --draft DIR or --no-draft")


def test_neither_draft_nor_no_draft(target):
    user_error(_gen(target, "--prompt-ids", "1"), "exactly one of --draft DIR or --no-draft")


@pytest.mark.parametrize("sources", [("--prompt-ids", "1", "--prompt", "hi"), ("--prompt", "a", "--prompts", "f.jsonl"),
                                     ()])
def test_two_or_no_prompt_sources(target, sources):
    user_error(_gen(target, "--no-draft", *sources), "exactly one of --prompt, --prompt-ids or --prompts")


@pytest.mark.parametrize("option, value, pattern", [
    # Patterns name the option (with - or _) and echo the bad value; the exact wording belongs to config.py.
    ("--temperature", "-0.5", r"temperature must be .*>= 0.*got -0\.5$"),
    ("--temperature", "nan", r"temperature must be .*>= 0.*got nan$"),
    ("--top-p", "0", r"top[-_]p must be in \(0, 1\].*got 0\.0$"),
    ("--top-p", "1.5", r"top[-_]p must be in \(0, 1\].*got 1\.5$"),
    ("--top-k", "-1", r"top[-_]k must be .*>= 0.*got -1$"),
    ("--tree-tokens", "0", r"tree[-_]tokens must be >= 1.*got 0$"),
    ("--tree-depth", "0", r"tree[-_]depth must be >= 1.*got 0$"),
    ("--tree-top-k", "0", r"tree[-_]top[-_]k must be >= 1.*got 0$"),
    ("--max-new-tokens", "0", r"max[-_]new[-_]tokens must be >= 1.*got 0$"),
    ("--max-seq-len", "0", r"max[-_]seq[-_]len must be >= 1.*got 0$"),
    ("--dtype", "fp8", r"unsupported dtype 'fp8'; choose one of fp32, bf16, fp16"),
    ("--backend", "tensorrt-llm", r"unknown backend 'tensorrt-llm'"),
    ("--ort-provider", "cuda-graph", r"--ort-provider must be auto or tensorrt, got 'cuda-graph'$"),
    ("--ort-provider", "tensorrt", r"--ort-provider tensorrt runs on an NVIDIA GPU: add --device cuda$"),
])
def test_bad_option_values(target, draft, option, value, pattern):
    line = user_error(_gen(target, "--draft", draft, "--prompt-ids", "1,2", option, value))
    assert re.search(pattern, line), (pattern, line)


def test_malformed_prompts_files(with_tokenizer, tmp_path):
    cases = {
        "not_json.jsonl": ('{"prompt": "hello"}\nthis is not json\n', "not_json.jsonl:2: not a JSON line"),
        "wrong_shape.jsonl": ('{"question": "hello"}\n', "wrong_shape.jsonl:1: expected"),
        "empty_turns.jsonl": ('{"question_id": 1, "turns": []}\n', "empty_turns.jsonl:1: expected"),
        "a_list.jsonl": ('["hello"]\n', "a_list.jsonl:1: expected"),
        "blank.jsonl": ("\n\n", "blank.jsonl: no prompts"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        user_error(_gen(with_tokenizer, "--no-draft", "--prompts", tmp_path / name), message)
    (tmp_path / "binary.jsonl").write_bytes(b"\x80\x81\xfe\xff{}\n")
    user_error(_gen(with_tokenizer, "--no-draft", "--prompts", tmp_path / "binary.jsonl"), "not a UTF-8 text file")
    user_error(_gen(with_tokenizer, "--no-draft", "--prompts", tmp_path / "absent.jsonl"), "no such prompt file")


def test_multi_line_user_error_is_printed_as_one_line(target, monkeypatch):
    """Some messages quote a library's multi-line text; the CLI still prints exactly one line."""
    from hass_deploy.errors import ModelLoadError
    from hass_deploy.generation import Pipeline

    def load(*args, **kwargs):
        raise ModelLoadError("config.json: Validation error for field 'x':\n    TypeError: expected int")

    monkeypatch.setattr(Pipeline, "load", load)
    line = user_error(_gen(target, "--no-draft", "--prompt-ids", "1"))
    assert line == "error: config.json: Validation error for field 'x': TypeError: expected int"


def test_bug_keeps_its_traceback(target, monkeypatch):
    """Only HassDeployError is turned into one line; anything else is a bug and must not be swallowed."""
    from hass_deploy.generation import Pipeline

    def load(*args, **kwargs):
        raise RuntimeError("internal bug")

    monkeypatch.setattr(Pipeline, "load", load)
    result = _gen(target, "--no-draft", "--prompt-ids", "1")
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)


# ---------------------------------------------------------------------------------------------------------------
# widen (the tiny target: hidden 64, intermediate 176, 2 layers, 4 heads of 16 over 2 kv heads)

WIDE = ("--hidden-size", 128, "--intermediate-size", 256, "--num-layers", 3)


def test_widen_then_generate_gives_the_same_tokens_and_acceptance(root, target, draft):
    out = root / "wide"
    result = ok(invoke("widen", "--target", target, "--draft", draft, "--out", out, *WIDE))
    assert result.stdout.strip() == str(out)
    assert sorted(p.name for p in (out / "drafts").iterdir()) == ["draft"]
    args = ("--prompt-ids", "5,6,7,8", "--max-new-tokens", 12, "--json")
    before = records(ok(invoke("generate", "--target", target, "--draft", draft, *args)))[0]
    after = records(ok(invoke("generate", "--target", out / "target", "--draft", out / "drafts" / "draft", *args)))[0]
    assert after["output_ids"] == before["output_ids"] and after["accept_lengths"] == before["accept_lengths"]
    assert json.loads((out / "target" / "config.json").read_text())["hidden_size"] == 128


@pytest.mark.parametrize("shape,fragment", [
    (("--hidden-size", 32, "--intermediate-size", 256, "--num-layers", 3), "--hidden-size 32 is smaller"),
    (("--hidden-size", 128, "--intermediate-size", 100, "--num-layers", 3), "--intermediate-size 100 is smaller"),
    (("--hidden-size", 128, "--intermediate-size", 256, "--num-layers", 1), "--num-layers 1 is smaller"),
    (("--hidden-size", 72, "--intermediate-size", 256, "--num-layers", 3), "not a multiple of head_dim 16"),
    (("--hidden-size", 80, "--intermediate-size", 256, "--num-layers", 3), "cannot keep the GQA group of 2"),
    (("--hidden-size", 128, "--intermediate-size", 256, "--num-layers", 0), "--num-layers must be a positive"),
])
def test_widen_bad_shapes_are_one_line(target, tmp_path, shape, fragment):
    user_error(invoke("widen", "--target", target, "--out", tmp_path / "out", *shape), fragment)
    assert not (tmp_path / "out").exists()


def test_widen_bad_directories_are_one_line(target, draft, small_vocab, tmp_path):
    out = tmp_path / "out"
    user_error(invoke("widen", "--target", tmp_path / "missing", "--out", out, *WIDE), "no such model directory")
    broken = tmp_path / "broken"
    shutil.copytree(target, broken)
    (broken / "config.json").write_text("{not json")
    user_error(invoke("widen", "--target", broken, "--out", out, *WIDE), "malformed JSON")
    user_error(invoke("widen", "--target", target, "--draft", tmp_path / "nodraft", "--out", out, *WIDE),
               "no such draft directory")
    user_error(invoke("widen", "--target", target, "--draft", small_vocab[2], "--out", out, *WIDE), "hidden size")
    assert not out.exists()
    afile = tmp_path / "file"
    afile.write_text("x")
    user_error(invoke("widen", "--target", target, "--out", afile, *WIDE), "is not a directory")
    assert afile.read_text() == "x"


def test_widen_refuses_non_empty_out_without_force(target, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    user_error(invoke("widen", "--target", target, "--out", out, *WIDE), "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    ok(invoke("widen", "--target", target, "--out", out, *WIDE, "--force"))
    assert sorted(p.name for p in out.iterdir()) == ["target"]


# ---------------------------------------------------------------------------------------------------------------
# The installed console script


def test_console_script_missing_dir_exits_1_with_one_line(tmp_path):
    script = Path(sys.executable).with_name("hass-deploy")
    if not script.exists():
        pytest.skip("hass-deploy console script is not installed next to this interpreter")
    missing = tmp_path / "no-such-model"
    proc = subprocess.run([str(script), "generate", "--target", str(missing), "--no-draft", "--prompt-ids", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: {missing}: no such model directory or GGUF file"]
    assert "Traceback" not in proc.stderr


def test_quickstart_bad_options_are_one_line(tmp_path):
    """Checked before anything is built: an unknown preset, a missing prompt file, a work dir that is a file."""
    user_error(runner.invoke(app, ["quickstart", "--preset", "huge", "--workdir", str(tmp_path / "w")]),
               "unknown preset 'huge'")
    user_error(runner.invoke(app, ["quickstart", "--prompts", str(tmp_path / "nope.jsonl"), "--workdir",
                                   str(tmp_path / "w")]), "no such prompt file")
    afile = tmp_path / "file"
    afile.write_text("x")
    user_error(runner.invoke(app, ["quickstart", "--workdir", str(afile)]), "is not a directory")
    assert not (tmp_path / "w").exists()


def _byte_tokenizer():
    """A byte-level BPE tokenizer without merges: one token per UTF-8 byte, so multi-byte characters span tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def test_streamed_text_never_shows_half_a_character(root, monkeypatch):
    """`generate` streams through serving's TextStream: rounds that end inside a multi-byte character release
    nothing of it until it is complete, and the whole text equals the decoded output."""
    from hass_deploy import cli
    from hass_deploy.generation import Pipeline
    from hass_deploy.runtime.decoder import GenerationResult

    directory = root / "bytes"
    random_hf_model("llama", "tiny", 0, vocab_size=256, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=1).save_pretrained(directory)
    tokenizer = _byte_tokenizer()
    tokenizer.save_pretrained(directory)
    text = "héllo wörld ✓ 日本"
    output = tokenizer(text)["input_ids"]
    assert len(output) > len(text)  # some characters are several tokens
    rounds = [output[i:i + 3] for i in range(0, len(output), 3)]  # 3-token rounds: several end mid-character

    def generate(self, prompt_ids, config, on_tokens=None):
        for tokens in rounds:
            on_tokens(tokens)
        return GenerationResult(prompt_ids=prompt_ids, output_ids=output, accept_lengths=[2] * len(rounds),
                                stop_reason="max_new_tokens", wall_s=1.0)

    writes: list[str] = []
    monkeypatch.setattr(Pipeline, "generate", generate)
    monkeypatch.setattr(cli, "_write", writes.append)
    result = ok(invoke("generate", "--target", directory, "--no-draft", "--prompt", "hi", "--no-chat"))
    assert "".join(writes) + result.stdout == text + "\n"
    assert all("\ufffd" not in chunk for chunk in writes) and len([w for w in writes if w]) > 1


def test_help_does_not_import_torch():
    """`hass-deploy --help` and a command's --help read only the config dataclasses: torch is not imported."""
    script = ("import sys\nfrom hass_deploy.cli import main\nfor argv in (['--help'], ['generate', '--help'], "
              "['serve', '--help']):\n    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"
    assert "--tree-tokens" in result.stdout and "--lookup-corpus" in result.stdout
