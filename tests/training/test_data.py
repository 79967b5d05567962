"""Training data (`hass-deploy data`): loss masks from chat templates, hidden states equal to the target's own,
the shard/manifest round trip, resume, the held-out split, two torchrun-style ranks, --regenerate, bad input.

Targets are tiny random Llamas with tokenizers built in `chat_targets.py`; datasets are a few records.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from typer.testing import CliRunner

from chat_targets import BPE_VOCAB, CHATML, SENTENCES, WORD_TEMPLATE, bpe_tokenizer, word_tokenizer, write_target
from hass_deploy.cli import app
from hass_deploy.errors import ConfigError, HassDeployError
from hass_deploy.models.loading import load_target, load_target_head
from hass_deploy.prompts import Prompt, encode
from hass_deploy.training import extract
from hass_deploy.training.data import DataManifest, HiddenStateDataset, check_data_matches_target, trained_conversations
from hass_deploy.training.extract import DataConfig, generate_data

# The last assistant turn alone gets an empty <think> block, as Qwen3's template does: not prefix-stable.
THINK = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
         "<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The generation prompt opens a turn the assistant's messages are not rendered with.
UNSTABLE = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>bot\n{% endif %}")
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
             + CHATML)


# ---------------------------------------------------------------------------------------------------------------
# Helpers and fixtures


@pytest.fixture(scope="module")
def word_target(tmp_path_factory) -> Path:
    return write_target(tmp_path_factory.mktemp("word"), word_tokenizer(WORD_TEMPLATE))


@pytest.fixture(scope="module")
def bpe_targets(tmp_path_factory):
    made: dict[str, Path] = {}

    def make(template: str = CHATML) -> Path:
        if template not in made:
            made[template] = write_target(tmp_path_factory.mktemp("bpe"), bpe_tokenizer(template), vocab_size=BPE_VOCAB)
        return made[template]

    return make


def conv(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": who, "value": text} for who, text in turns]}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(target: Path, dataset: Path, out: Path, **settings) -> DataManifest:
    settings = {"dtype": "fp32", "eval_fraction": 0.0, **settings}
    return generate_data(target, dataset, out, DataConfig(**settings))


def samples(directory: Path, split: str = "train") -> list[tuple[int, dict]]:
    """(record index, sample) pairs, in the dataset's record order."""
    data = HiddenStateDataset(directory, split)
    return sorted(zip(data.record_indices(), (data[i] for i in range(len(data)))), key=lambda pair: pair[0])


def masked_runs(sample: dict) -> list[tuple[int, list[int]]]:
    """(start, ids) of each contiguous run of trained tokens."""
    ids, mask = sample["input_ids"].tolist(), sample["loss_mask"].tolist()
    runs: list[tuple[int, list[int]]] = []
    for t, (token, trained) in enumerate(zip(ids, mask)):
        if trained and (t == 0 or not mask[t - 1]):
            runs.append((t, []))
        if trained:
            runs[-1][1].append(token)
    return runs


def rendered(tokenizer, messages, generation_prompt=False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def greedy(module, ids: list[int], max_new: int, eos: tuple[int, ...]) -> list[int]:
    """Plain greedy decoding without a KV cache: the oracle for --regenerate."""
    out: list[int] = []
    with torch.no_grad():
        while len(out) < max_new:
            seq = torch.tensor([ids + out])
            hidden = module(seq, torch.arange(seq.shape[1])[None])
            out.append(int(module.logits(hidden[0, -1]).argmax()))
            if out[-1] in eos:
                break
    return out


# ---------------------------------------------------------------------------------------------------------------
# Loss masks


def test_sharegpt_mask_is_exactly_the_assistant_turns(word_target, tmp_path):
    records = [
        conv(("human", "hello there"), ("gpt", "how are you")),
        conv(("system", "you are a cat"), ("human", "what is a good name"), ("gpt", "i am fine"),
             ("human", "tell me a story"), ("gpt", "once upon a time the fox")),
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the quick brown fox"},
                      {"role": "user", "content": "thanks"}]},
        conv(("human", "hello")),  # no assistant turn: skipped and counted
    ]
    manifest = run(word_target, write_jsonl(tmp_path / "chat.jsonl", records), tmp_path / "out")
    tokenizer = load_target(word_target).tokenizer
    got = samples(tmp_path / "out")
    assert [r for r, _ in got] == [0, 1, 2]
    for r, sample in got:
        messages = [{"role": m["role"], "content": m["content"]} for m in records[r].get("messages", [])] or [
            {"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
            for t in records[r]["conversations"]]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        # the conversation up to its last answer (a trailing user turn trains nothing and is dropped)
        assert sample["input_ids"].tolist() == rendered(tokenizer, messages[: last + 1])
        decoded = [tokenizer.decode(ids, skip_special_tokens=True) for _, ids in masked_runs(sample)]
        assert decoded == [m["content"] for m in messages if m["role"] == "assistant"]
        for start, ids in masked_runs(sample):  # each run: the message's words and the <|end|> that closes it
            assert ids[-1] == tokenizer.eos_token_id
    assert manifest.totals["skipped"] == {"no assistant turn": 1}
    assert manifest.totals["train"]["loss_tokens"] == sum(int(s["loss_mask"].sum()) for _, s in got)


def test_assistant_turns_before_any_user_turn_are_context(word_target, tmp_path):
    records = [conv(("gpt", "hello there"), ("human", "how are you"), ("gpt", "i am fine")), conv(("gpt", "hello"))]
    manifest = run(word_target, write_jsonl(tmp_path / "chat.jsonl", records), tmp_path / "out")
    tokenizer = load_target(word_target).tokenizer
    (_, sample), = samples(tmp_path / "out")
    assert [tokenizer.decode(ids, skip_special_tokens=True) for _, ids in masked_runs(sample)] == ["i am fine"]
    assert manifest.totals["skipped"] == {"no assistant turn after a user turn within --max-length": 1}


def test_byte_level_chatml_masks_and_json_list_input(bpe_targets, tmp_path):
    records = [conv(("human", SENTENCES[0]), ("gpt", SENTENCES[1]), ("human", SENTENCES[3]), ("gpt", SENTENCES[4])),
               conv(("system", SENTENCES[5]), ("human", SENTENCES[2]), ("gpt", " spaced  out \n text"))]
    (tmp_path / "chat.json").write_text(json.dumps(records, indent=2))
    run(bpe_targets(), tmp_path / "chat.json", tmp_path / "out")
    tokenizer = load_target(bpe_targets()).tokenizer
    for r, sample in samples(tmp_path / "out"):
        answers = [t["value"] for t in records[r]["conversations"] if t["from"] == "gpt"]
        decoded = [tokenizer.decode(ids, skip_special_tokens=True) for _, ids in masked_runs(sample)]
        assert decoded == [a + "\n" for a in answers]  # the template's "<|im_end|>\n" closes each turn


def test_template_that_rerenders_earlier_turns_gives_one_sample_per_turn(bpe_targets, tmp_path):
    record = conv(("human", SENTENCES[0]), ("gpt", SENTENCES[1]), ("human", SENTENCES[3]), ("gpt", SENTENCES[4]))
    run(bpe_targets(THINK), write_jsonl(tmp_path / "chat.jsonl", [record]), tmp_path / "out")
    tokenizer = load_target(bpe_targets(THINK)).tokenizer
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in record["conversations"]]
    got = [s for _, s in samples(tmp_path / "out")]
    assert sorted(len(s["input_ids"]) for s in got) == sorted([len(rendered(tokenizer, messages[:2])),
                                                               len(rendered(tokenizer, messages))])
    for sample in got:  # each sample is exactly what the target saw when it wrote its (last) turn
        n = len(sample["input_ids"])
        turns = 2 if n == len(rendered(tokenizer, messages[:2])) else 4
        assert sample["input_ids"].tolist() == rendered(tokenizer, messages[:turns])
        decoded = [tokenizer.decode(ids, skip_special_tokens=True) for _, ids in masked_runs(sample)]
        assert decoded == ["<think>\n\n</think>\n\n" + messages[turns - 1]["content"] + "\n"]


def test_template_with_a_different_generation_prompt_is_refused(bpe_targets, tmp_path):
    dataset = write_jsonl(tmp_path / "chat.jsonl", [conv(("human", SENTENCES[0]), ("gpt", SENTENCES[1]))])
    with pytest.raises(HassDeployError, match=r"chat\.jsonl:1: the chat template is not prefix-stable"):
        run(bpe_targets(UNSTABLE), dataset, tmp_path / "out")


def test_conversations_the_template_rejects_are_skipped_and_counted(bpe_targets, tmp_path):
    records = [conv(("system", "be brief"), ("human", SENTENCES[0]), ("gpt", SENTENCES[1])),
               conv(("human", SENTENCES[2]), ("gpt", SENTENCES[3]))]
    manifest = run(bpe_targets(NO_SYSTEM), write_jsonl(tmp_path / "chat.jsonl", records), tmp_path / "out")
    assert manifest.totals["skipped"] == {"rejected by the chat template: no system messages": 1}
    assert [r for r, _ in samples(tmp_path / "out")] == [1]


def test_text_format_trains_every_token_but_the_first(word_target, tmp_path):
    texts = ["the quick brown fox jumps over the lazy dog", "hello there", "cat"]
    manifest = run(word_target, write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts]), tmp_path / "out",
                   format="text", max_length=5)
    tokenizer = load_target(word_target).tokenizer
    got = samples(tmp_path / "out")
    assert [r for r, _ in got] == [0, 1]  # one token trains nothing
    for r, sample in got:
        ids = tokenizer(texts[r])["input_ids"][:5]
        assert sample["input_ids"].tolist() == ids
        assert sample["loss_mask"].tolist() == [False] + [True] * (len(ids) - 1)
    assert manifest.totals["skipped"] == {"no trained token within --max-length": 1}
    assert manifest.max_length == 5


def test_ids_format_with_and_without_masks(word_target, tmp_path):
    records = [{"ids": [5, 6, 7, 8]}, {"ids": [9, 10, 11], "loss_mask": [0, 0, 1]}]
    run(word_target, write_jsonl(tmp_path / "ids.jsonl", records), tmp_path / "out", format="ids")
    got = {r: s for r, s in samples(tmp_path / "out")}
    assert got[0]["loss_mask"].tolist() == [False, True, True, True]
    assert got[1]["input_ids"].tolist() == [9, 10, 11] and got[1]["loss_mask"].tolist() == [False, False, True]


# ---------------------------------------------------------------------------------------------------------------
# Hidden states


def _random_ids(count: int, vocab: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 40, (count,), generator=generator).tolist()
    return [{"ids": torch.randint(0, vocab, (n,), generator=generator).tolist()} for n in lengths]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_hidden_states_equal_the_target_batched_or_not(hf_dirs, targets, arch, tmp_path):
    """Right-padded batches (mistral: sequences past its 12-token sliding window) change nothing."""
    dataset = write_jsonl(tmp_path / "ids.jsonl", _random_ids(12, targets[arch].config.vocab_size))
    run(hf_dirs[arch], dataset, tmp_path / "batched", format="ids", batch_tokens=4096)
    run(hf_dirs[arch], dataset, tmp_path / "single", format="ids", batch_tokens=1)
    module = targets[arch].module
    batched, single = samples(tmp_path / "batched"), samples(tmp_path / "single")
    assert len(batched) == len(single) == 12
    with torch.no_grad():
        for (_, a), (_, b) in zip(batched, single):
            ids = a["input_ids"]
            expected = module(ids[None], torch.arange(len(ids))[None])[0]  # [N, H]
            assert a["hidden"].dtype == torch.float32
            torch.testing.assert_close(a["hidden"], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b["hidden"], expected, atol=1e-5, rtol=1e-5)


def test_bf16_storage_is_the_rounded_fp32_states(hf_dirs, targets, tmp_path):
    dataset = write_jsonl(tmp_path / "ids.jsonl", _random_ids(5, 96))
    run(hf_dirs["llama"], dataset, tmp_path / "fp32", format="ids")
    run(hf_dirs["llama"], dataset, tmp_path / "bf16", format="ids", dtype="bf16")
    for (_, full), (_, half) in zip(samples(tmp_path / "fp32"), samples(tmp_path / "bf16")):
        assert half["hidden"].dtype == torch.bfloat16
        torch.testing.assert_close(half["hidden"].float(), full["hidden"], atol=1e-2, rtol=1e-2)
    fp32, bf16 = (DataManifest.read(tmp_path / d) for d in ("fp32", "bf16"))
    assert bf16.dtype == "bf16" and fp32.shards[0].bytes > bf16.shards[0].bytes


# ---------------------------------------------------------------------------------------------------------------
# Round trip, manifest, identity


def test_round_trip_manifest_and_reader(word_target, tmp_path):
    records = [conv(("human", "hello there"), ("gpt", " ".join(["the quick brown fox"] * (i + 1)))) for i in range(7)]
    manifest = run(word_target, write_jsonl(tmp_path / "chat.jsonl", records), tmp_path / "out", shard_size=3,
                   eval_fraction=0.3)
    raw = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(raw) >= {"format", "format_version", "complete", "target", "dtype", "max_length", "dataset",
                        "settings", "tensors", "shards", "totals"}
    assert set(raw["target"]) == {"fingerprint", "architecture", "hidden_size", "vocab_size", "path"}
    assert raw["complete"] and raw["target"]["architecture"] == "LlamaForCausalLM"
    target = load_target(word_target)
    assert (manifest.hidden_size, manifest.vocab_size, manifest.dtype) == (48, 128, "fp32")
    assert [s.file for s in manifest.shards] == ["train-00000.safetensors", "train-00001.safetensors",
                                                 "eval-00000.safetensors"]
    train, held_out = HiddenStateDataset(tmp_path / "out"), HiddenStateDataset(tmp_path / "out", "eval")
    assert (len(train), len(held_out)) == (5, 2) == (manifest.totals["train"]["samples"],
                                                     manifest.totals["eval"]["samples"])
    assert train.lengths() == [len(train[i]["input_ids"]) for i in range(len(train))]
    assert sum(train.lengths()) == manifest.totals["train"]["tokens"]
    item = train[-1]
    assert set(item) == {"input_ids", "loss_mask", "hidden"}
    assert item["input_ids"].dtype == torch.int64 and item["loss_mask"].dtype == torch.bool
    assert item["hidden"].shape == (len(item["input_ids"]), 48)
    with pytest.raises(IndexError):
        train[len(train)]
    clone = pickle.loads(pickle.dumps(train))  # DataLoader workers under spawn
    assert torch.equal(clone[1]["hidden"], train[1]["hidden"])
    loader = torch.utils.data.DataLoader(train, batch_size=None, num_workers=1)
    assert torch.equal(next(iter(loader))["hidden"], train[0]["hidden"])
    train.verify()

    check_data_matches_target(manifest, target)
    check_data_matches_target(manifest, load_target_head(word_target))  # the trainer's lighter target
    other = write_target(tmp_path / "other", word_tokenizer(WORD_TEMPLATE), seed=1)
    with pytest.raises(HassDeployError, match="was generated from another target"):
        check_data_matches_target(train.manifest, load_target(other))


def test_eval_split_sizes_and_disjointness(word_target, tmp_path):
    ids = _random_ids(8, 128)
    dataset = write_jsonl(tmp_path / "ids.jsonl", ids)
    run(word_target, dataset, tmp_path / "quarter", format="ids", eval_fraction=0.25, shard_size=2)
    train = HiddenStateDataset(tmp_path / "quarter", "train").record_indices()
    held_out = HiddenStateDataset(tmp_path / "quarter", "eval").record_indices()
    assert len(held_out) == 2 and sorted(train + held_out) == list(range(8))
    run(word_target, dataset, tmp_path / "none", format="ids", eval_fraction=0.0)
    assert len(HiddenStateDataset(tmp_path / "none", "eval")) == 0
    two = write_jsonl(tmp_path / "two.jsonl", ids[:2])
    manifest = run(word_target, two, tmp_path / "two", format="ids", eval_fraction=0.05)
    assert (manifest.totals["train"]["samples"], manifest.totals["eval"]["samples"]) == (1, 1)
    one = write_jsonl(tmp_path / "one.jsonl", ids[:1])
    assert run(word_target, one, tmp_path / "one", format="ids", eval_fraction=0.05).totals["eval"]["samples"] == 0
    few = run(word_target, dataset, tmp_path / "few", format="ids", max_samples=3)
    assert few.totals["train"]["records"] == 3


def test_parts_of_one_conversation_are_never_split_between_train_and_held_out():
    """ShareGPT cuts long conversations into records ID_0, ID_1, ...: whichever split gets one gets all of them."""
    names = [f"c{i // 3}" if i < 12 else None for i in range(20)]  # 4 conversations of 3 parts, 8 single records
    for seed in range(20):
        for fraction in (0.1, 0.25, 0.5):
            plans = extract.plan_shards(names, DataConfig(eval_fraction=fraction, seed=seed, shard_size=4))
            split_of = {r: p.split for p in plans for r in p.records}
            assert sorted(split_of) == list(range(20))
            for c in range(4):
                assert len({split_of[i] for i in range(3 * c, 3 * c + 3)}) == 1
            assert "train" in split_of.values()
    # Without conversation names the shuffle is the one of records it always was.
    singles = extract.plan_shards([None] * 20, DataConfig(eval_fraction=0.25, seed=3, shard_size=4))
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()
    assert [r for p in singles if p.split == "eval" for r in p.records] == order[:5]


def test_a_truncated_download_and_benchmark_prompts_are_skipped_and_counted(word_target, tmp_path):
    records = [conv(("human", f"hello {w}"), ("gpt", "the quick brown fox")) for w in ("there", "again", "friend")]
    records.append(conv(("human", "Calculate the atomic mass for lithium."), ("gpt", "the fox")))  # alpaca's, verbatim
    text = json.dumps(records, indent=2)
    cut = tmp_path / "partial.json"
    cut.write_text(text[: text.rindex("the quick brown fox") + 5])  # inside the third record
    manifest = run(word_target, cut, tmp_path / "cut")
    assert manifest.totals["records"] == 3 and manifest.totals["train"]["samples"] == 2
    assert manifest.totals["skipped"] == {"cut off at the end of the file": 1}
    assert manifest.summary().startswith("3 records read; ")
    whole = tmp_path / "whole.json"
    whole.write_text(text)
    assert run(word_target, whole, tmp_path / "whole").totals["skipped"] == {"shares text with a benchmark prompt": 1}
    assert run(word_target, whole, tmp_path / "kept", exclude="none").totals["train"]["samples"] == 4


# ---------------------------------------------------------------------------------------------------------------
# Resume and ranks


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_interrupted_run_resumes_to_identical_files(word_target, tmp_path, monkeypatch):
    dataset = write_jsonl(tmp_path / "ids.jsonl", _random_ids(10, 128))
    settings = dict(format="ids", shard_size=3, eval_fraction=0.2, dtype="bf16")
    run(word_target, dataset, tmp_path / "whole", **settings)

    real, calls = extract._make_shard, []

    def interrupted(*args, **kwargs):
        calls.append(args[1].file)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "_make_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(word_target, dataset, tmp_path / "resumed", **settings)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["manifest.json", "train-00000.safetensors"]
    with pytest.raises(HassDeployError, match="incomplete"):
        HiddenStateDataset(tmp_path / "resumed")
    (tmp_path / "resumed" / ".train-00001.safetensors.tmp-1").write_bytes(b"half a shard")  # a crash mid-write

    calls.clear()
    monkeypatch.setattr(extract, "_make_shard", lambda *a, **k: (calls.append(a[1].file), real(*a, **k)))
    run(word_target, dataset, tmp_path / "resumed", **settings)
    assert calls == ["train-00001.safetensors", "train-00002.safetensors", "eval-00000.safetensors"]
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")
    calls.clear()
    run(word_target, dataset, tmp_path / "resumed", **settings)  # finished: nothing to redo
    assert calls == [] and _files(tmp_path / "resumed") == _files(tmp_path / "whole")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, args: tuple, settings: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    generate_data(*args, DataConfig(**settings))
    assert not dist.is_initialized()  # the group generate_data set up, it tore down


def test_two_ranks_write_what_one_process_writes(word_target, tmp_path):
    records = [conv(("human", "hello there"), ("gpt", " ".join(["how are you"] * (1 + i % 4)))) for i in range(9)]
    dataset = write_jsonl(tmp_path / "chat.jsonl", records)
    settings = dict(shard_size=2, eval_fraction=0.2)
    run(word_target, dataset, tmp_path / "single", **settings)
    mp.spawn(_rank_worker, args=(2, _free_port(), (word_target, dataset, tmp_path / "ranks"),
                                 {"dtype": "fp32", **settings}), nprocs=2, join=True)
    assert _files(tmp_path / "ranks") == _files(tmp_path / "single")
    assert len(DataManifest.read(tmp_path / "ranks").shards) == 5


# ---------------------------------------------------------------------------------------------------------------
# --regenerate


def test_regenerated_prompts_are_the_targets_greedy_answers(word_target, tmp_path):
    lines = [{"question_id": 81, "turns": ["hello there how are you", "tell me a story"]},
             {"prompt": "what is a good name for a cat"}]
    run(word_target, write_jsonl(tmp_path / "prompts.jsonl", lines), tmp_path / "out", format="prompts",
        regenerate=True, max_new_tokens=6)
    target = load_target(word_target)
    tokenizer, eos = target.tokenizer, target.eos_token_ids
    by_record: dict[int, list[dict]] = {}
    for r, sample in samples(tmp_path / "out"):
        by_record.setdefault(r, []).append(sample)
        for start, ids in masked_runs(sample):  # every response is the greedy continuation of what precedes it
            context = sample["input_ids"][:start].tolist()
            assert ids == greedy(target.module, context, 6, eos)
            assert len(ids) <= 6
    # First turns: the prompt encoded as `hass-deploy generate` encodes it, then the greedy answer's text.
    for r, text in ((0, lines[0]["turns"][0]), (1, lines[1]["prompt"])):
        first = by_record[r][0]
        start, ids = masked_runs(first)[0]
        prompt = encode(Prompt(text=text), tokenizer, None)
        assert first["input_ids"][:start].tolist() == prompt
        answer = greedy(target.module, prompt, 6, eos)
        assert tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(answer, skip_special_tokens=True)
    # The second turn is prompted with the conversation so far, the first answer rendered as text.
    first_answer = masked_runs(by_record[0][0])[0][1]
    reply = tokenizer.decode([t for t in first_answer if t not in eos], skip_special_tokens=True)
    second_prompt = rendered(tokenizer, [{"role": "user", "content": lines[0]["turns"][0]},
                                         {"role": "assistant", "content": reply},
                                         {"role": "user", "content": lines[0]["turns"][1]}], generation_prompt=True)
    last = by_record[0][-1]
    start, _ = masked_runs(last)[-1]
    assert last["input_ids"][:start].tolist() == second_prompt


def test_regenerate_replaces_sharegpt_answers_within_max_length(word_target, tmp_path):
    records = [conv(("human", "hello there"), ("gpt", "the lazy dog")), conv(("human", "what is a good name"))]
    run(word_target, write_jsonl(tmp_path / "chat.jsonl", records), tmp_path / "out", regenerate=True, max_length=12)
    target = load_target(word_target)
    got = samples(tmp_path / "out")
    assert [r for r, _ in got] == [0, 1]  # a conversation without answers is usable once the target writes them
    for _, sample in got:
        assert len(sample["input_ids"]) <= 12
        for start, ids in masked_runs(sample):
            assert ids == greedy(target.module, sample["input_ids"][:start].tolist(), 12 - start, target.eos_token_ids)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear line each


@pytest.mark.parametrize("content, message", [
    ("", "empty dataset"),
    ("\n  \n", "empty dataset"),
    ('{"conversations": []}\n{"foo": 1}\n', r"bad\.jsonl:2: expected \{\"conversations\""),
    ('{"text": "hello"}\n', "looks like --format text"),
    ('{"conversations": [{"from": "human"}]}\n', r"bad\.jsonl:1: turn 1 must be"),
    ('{"conversations": []}\n\n{oops\n', r"bad\.jsonl:3: not a JSON line"),
    ('[{"conversations": []}, 7]', r"bad\.jsonl: record 2: expected"),
    ('[{"conversations": ', "ends inside its first record"),
    ('[{"conversations": []} {"conversations": []}]', r"expected ',' or '\]' after record 1"),
    ('[{"conversations": [}, {"conversations": []}]', "record 1: malformed JSON"),
    ('{"conversations": [{"from": "human", "value": "hi"}]}\n' * 2, r"no usable samples \(2 records skipped: 2 no "
                                                                    "assistant turn\\)"),
])
def test_bad_datasets(word_target, tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(HassDeployError, match=message):
        run(word_target, tmp_path / "bad.jsonl", tmp_path / "out")


def test_bad_ids_and_missing_files(word_target, tmp_path):
    with pytest.raises(HassDeployError, match="no such dataset file"):
        run(word_target, tmp_path / "absent.jsonl", tmp_path / "out")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(HassDeployError, match="not a UTF-8 text file"):
        run(word_target, tmp_path / "binary.jsonl", tmp_path / "out")
    write_jsonl(tmp_path / "ids.jsonl", [{"ids": [1, 2]}, {"ids": [1, 500]}])
    with pytest.raises(HassDeployError, match=r"ids\.jsonl:2: token id 500 .* outside the target's vocabulary"):
        run(word_target, tmp_path / "ids.jsonl", tmp_path / "out", format="ids")
    write_jsonl(tmp_path / "mask.jsonl", [{"ids": [1, 2], "loss_mask": [1]}])
    with pytest.raises(HassDeployError, match=r"mask\.jsonl:1: \"loss_mask\" must be"):
        run(word_target, tmp_path / "mask.jsonl", tmp_path / "out", format="ids")


def test_bad_settings():
    with pytest.raises(ConfigError, match="--format prompts needs --regenerate"):
        DataConfig(format="prompts")
    with pytest.raises(ConfigError, match="not to --format text"):
        DataConfig(format="text", regenerate=True)
    for bad in (dict(format="csv"), dict(dtype="int8"), dict(dtype="auto"), dict(compute_dtype="fp64"),
                dict(max_length=1), dict(eval_fraction=1.0), dict(shard_size=0), dict(batch_tokens=0),
                dict(max_samples=0), dict(temperature=-1.0)):
        with pytest.raises(ConfigError):
            DataConfig(**bad)


def test_targets_without_tokenizer_or_template(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [conv(("human", "hello"), ("gpt", "there"))])
    plain = write_target(tmp_path / "plain", word_tokenizer(None))
    with pytest.raises(HassDeployError, match="has no chat template.*--format text"):
        run(plain, chat, tmp_path / "out")
    bare = write_target(tmp_path / "bare", None)
    with pytest.raises(HassDeployError, match="no tokenizer"):
        run(bare, write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}]), tmp_path / "out", format="text")


def test_output_from_another_target_or_other_settings_is_refused(word_target, tmp_path):
    dataset = write_jsonl(tmp_path / "ids.jsonl", _random_ids(4, 128))
    run(word_target, dataset, tmp_path / "out", format="ids")
    other = write_target(tmp_path / "other", word_tokenizer(WORD_TEMPLATE), seed=3)
    with pytest.raises(HassDeployError, match="holds data generated from another target.*--force"):
        run(other, dataset, tmp_path / "out", format="ids")
    with pytest.raises(HassDeployError, match=r"different settings \(max_length: 256 then, 16 now\)"):
        run(word_target, dataset, tmp_path / "out", format="ids", max_length=16)
    manifest = generate_data(other, dataset, tmp_path / "out", DataConfig(format="ids", dtype="fp32",
                                                                          eval_fraction=0.0), force=True)
    check_data_matches_target(manifest, load_target(other))
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(HassDeployError, match="not empty and holds no manifest.json"):
        run(word_target, dataset, tmp_path / "stuff", format="ids")
    with pytest.raises(HassDeployError, match="exists and is not a directory"):
        run(word_target, dataset, tmp_path / "stuff" / "notes.txt", format="ids")


def test_damaged_shards_are_named(word_target, tmp_path):
    dataset = write_jsonl(tmp_path / "ids.jsonl", _random_ids(6, 128))
    run(word_target, dataset, tmp_path / "out", format="ids", shard_size=3)
    shard = tmp_path / "out" / "train-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(HassDeployError, match=r"train-00001\.safetensors: truncated or corrupted shard"):
        HiddenStateDataset(tmp_path / "out")
    shard.write_bytes(b"\x00" * 16 + data[16:])
    with pytest.raises(HassDeployError, match=r"train-00001\.safetensors: corrupted shard"):
        HiddenStateDataset(tmp_path / "out")
    shard.unlink()
    with pytest.raises(HassDeployError, match=r"train-00001\.safetensors: shard missing"):
        HiddenStateDataset(tmp_path / "out")
    with pytest.raises(HassDeployError, match="no manifest.json"):
        HiddenStateDataset(tmp_path)
    with pytest.raises(HassDeployError, match="unknown split"):
        HiddenStateDataset(tmp_path / "out", "test")
    shard.write_bytes(data[:-4] + bytes(4))  # same size, flipped content: only the stored hash can tell
    HiddenStateDataset(tmp_path / "out", "train")
    with pytest.raises(HassDeployError, match="do not match their stored hash"):
        HiddenStateDataset(tmp_path / "out").verify()


# ---------------------------------------------------------------------------------------------------------------
# The command


runner = CliRunner()


def test_the_target_runs_in_bf16_on_a_gpu_and_fp32_on_a_cpu(word_target, tmp_path):
    assert DataConfig().compute_dtype == "auto" and DataConfig().resolved().compute_dtype == "fp32"
    assert DataConfig(device="cuda").resolved().compute_dtype == "bf16"
    assert DataConfig(device="cuda:1", compute_dtype="fp32").resolved().compute_dtype == "fp32"  # asked for
    # The manifest records what ran, resolved: CPU data made when fp32 was the default still resumes.
    manifest = run(word_target, write_jsonl(tmp_path / "text.jsonl", [{"text": "hello there"}]), tmp_path / "out",
                   format="text")
    assert manifest.settings["compute_dtype"] == "fp32"
    assert run(word_target, tmp_path / "text.jsonl", tmp_path / "out", format="text",
               compute_dtype="fp32").settings == manifest.settings


def test_data_command(word_target, tmp_path):
    dataset = write_jsonl(tmp_path / "chat.jsonl", [conv(("human", "hello"), ("gpt", "there how are you"))] * 3)
    result = runner.invoke(app, ["data", "--target", str(word_target), "--dataset", str(dataset), "--out",
                                 str(tmp_path / "out"), "--max-length", "64", "--shard-size", "2"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "out")
    manifest = DataManifest.read(tmp_path / "out")
    assert manifest.dtype == "bf16" and manifest.max_length == 64
    assert (manifest.totals["train"]["samples"], manifest.totals["eval"]["samples"]) == (2, 1)

    result = runner.invoke(app, ["data", "--target", str(word_target), "--dataset", str(dataset), "--out",
                                 str(tmp_path / "other"), "--format", "prompts"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: --format prompts needs --regenerate: prompt files hold no responses, so the target "
                     "has to write them"]

    if not torch.cuda.is_available():
        result = runner.invoke(app, ["data", "--target", str(word_target), "--dataset", str(dataset), "--out",
                                     str(tmp_path / "gpu"), "--device", "cuda"])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
        assert [line for line in result.stderr.splitlines() if line.strip()] == [
            "error: --device cuda: this torch sees no CUDA device"]


def test_trained_conversations_names_every_conversation_the_data_drew_on(word_target, tmp_path):
    records = [{"id": f"c{i // 2}_{i % 2}", **conv(("human", f"hi {i}"), ("gpt", f"hello {i}"))} for i in range(10)]
    records.append(conv(("human", "no id"), ("gpt", "yes")))  # a record without an id: named by its index
    dataset = tmp_path / "chat.json"
    dataset.write_text(json.dumps(records))
    run(word_target, dataset, tmp_path / "data", format="sharegpt", max_samples=6, eval_fraction=0.3, seed=3)
    indices = [i for split in ("train", "eval") for i in HiddenStateDataset(tmp_path / "data", split).record_indices()]
    expected = sorted({f"c{i // 2}" if i < 10 else str(i) for i in indices})
    assert trained_conversations(tmp_path / "data") == expected and 0 < len(expected) < 7
    dataset.write_text(json.dumps(records[:-1]))
    with pytest.raises(HassDeployError, match="gone or changed"):
        trained_conversations(tmp_path / "data")
