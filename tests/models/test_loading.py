"""Tests for hass_deploy.models.loading: HF directories -> ModelConfig + Transformer, and every refusal.

Tiny random models (hidden 64, 2 layers, vocab 512) are written by transformers itself in tmp dirs; transformers'
own forward pass is the oracle for "the weights went to the right place".
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hass_deploy.errors import ModelLoadError
from hass_deploy.models.loading import ARCHITECTURES, eos_ids, load_target, parse_dtype, read_state_dict
from hass_deploy.models.random_target import random_hf_model

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


def _write(model, directory: Path, **save_kwargs) -> Path:
    model.save_pretrained(directory, **save_kwargs)
    return directory


@pytest.fixture(scope="module")
def hf_models():
    return {arch: random_hf_model(arch, "tiny", seed=3) for arch in ARCHS}


@pytest.fixture(scope="module")
def model_dirs(hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    return {arch: _write(model, root / arch) for arch, model in hf_models.items()}


@pytest.fixture(scope="module")
def llama_dir(model_dirs):
    return model_dirs["llama"]


def _variant(source: Path, tmp_path: Path, name: str = "variant") -> Path:
    """A private copy of a model directory that a test may break."""
    out = tmp_path / name
    shutil.copytree(source, out)
    return out


_DELETE = object()  # a value for _edit_config: remove the key


def _edit_config(directory: Path, **changes) -> Path:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            raw.pop(key)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))
    return directory


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        assert torch.equal(pa[key], pb[key]), key


# ---------------------------------------------------------------------------------------------------------------
# Configs of the four architectures


@pytest.mark.parametrize("arch", ARCHS)
def test_config_fields_per_architecture(arch, model_dirs, hf_models):
    target = load_target(model_dirs[arch], tokenizer=False)
    c = target.config
    hf = hf_models[arch].config
    assert c.architecture == type(hf_models[arch]).__name__
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (512, 64, 176, 2)
    # GQA: 4 query heads share 2 KV heads, and the projections have those shapes.
    assert (c.num_heads, c.num_kv_heads) == (4, 2)
    assert c.head_dim == (32 if arch == "qwen3" else 16)  # Qwen3 decouples head_dim from hidden/heads
    attn = target.module.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * c.head_dim, 64)
    assert attn.k_proj.weight.shape == (2 * c.head_dim, 64)
    assert attn.v_proj.weight.shape == (2 * c.head_dim, 64)
    assert attn.o_proj.weight.shape == (64, 4 * c.head_dim)
    assert c.qkv_bias is (arch == "qwen2")
    assert (attn.q_proj.bias is not None) is (arch == "qwen2")
    assert attn.o_proj.bias is None
    assert c.qk_norm is (arch == "qwen3")
    assert hasattr(attn, "q_norm") is (arch == "qwen3")
    assert c.rms_norm_eps == hf.rms_norm_eps
    assert c.max_position_embeddings == 512
    assert c.rope_parameters["rope_theta"] == pytest.approx(hf.rope_parameters["rope_theta"])
    assert c.tie_word_embeddings is False
    assert target.tokenizer is None  # the directory ships no tokenizer


@pytest.mark.parametrize("arch", ARCHS)
def test_weights_land_where_transformers_has_them(arch, model_dirs, hf_models):
    """Same logits as transformers on a short prompt: every tensor went to the right module."""
    target = load_target(model_dirs[arch], tokenizer=False)
    ids = torch.tensor([[5, 17, 300, 2, 99, 511, 0]])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        ours = target.module.logits(target.module(ids, positions))
        theirs = hf_models[arch](ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_mistral_sliding_window_is_read(tmp_path):
    directory = _write(random_hf_model("mistral", "tiny", seed=0, sliding_window=8), tmp_path / "m")
    assert load_target(directory, tokenizer=False).config.sliding_window == 8


def test_llama_attention_bias_biases_qkv_and_o(tmp_path):
    directory = _write(random_hf_model("llama", "tiny", seed=0, attention_bias=True), tmp_path / "b")
    target = load_target(directory, tokenizer=False)
    assert target.config.qkv_bias and target.config.o_bias
    assert target.module.layers[1].self_attn.o_proj.bias is not None


def test_tied_embeddings_share_storage(tmp_path):
    model = random_hf_model("llama", "tiny", seed=1, tie_word_embeddings=True)
    directory = _write(model, tmp_path / "tied")
    target = load_target(directory, tokenizer=False)
    assert target.config.tie_word_embeddings is True
    module = target.module
    assert module.lm_head.weight is module.embed_tokens.weight
    assert module.lm_head.weight.data_ptr() == module.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(module.embed_tokens.weight, model.model.embed_tokens.weight)
    # An in-place change through one name is seen through the other: shared storage, not two equal copies.
    with torch.no_grad():
        module.embed_tokens.weight[3, 0] = 123.0
    assert module.lm_head.weight[3, 0].item() == 123.0


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_is_honoured_and_rope_stays_fp32(name, dtype, model_dirs, hf_models):
    target = load_target(model_dirs["qwen3"], dtype=name, tokenizer=False)
    for key, param in target.module.named_parameters():
        assert param.dtype == dtype, key
        assert param.device.type == "cpu", key
    assert target.module.rotary.inv_freq.dtype == torch.float32
    reference = hf_models["qwen3"].model.layers[1].mlp.down_proj.weight.detach().to(dtype)
    assert torch.equal(target.module.layers[1].mlp.down_proj.weight, reference)
    # and it runs in that dtype
    with torch.no_grad():
        hidden = target.module(torch.tensor([[1, 2, 3]]), torch.arange(3)[None])
    assert hidden.dtype == dtype
    assert torch.isfinite(hidden.float()).all()


def test_rope_inv_freq_values(llama_dir):
    target = load_target(llama_dir, dtype="bf16", tokenizer=False)
    expected = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    torch.testing.assert_close(target.module.rotary.inv_freq, expected)


# ---------------------------------------------------------------------------------------------------------------
# Weight formats


@pytest.fixture(scope="module")
def format_dirs(hf_models, llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    model = hf_models["llama"]
    dirs = {"single": llama_dir}
    dirs["sharded"] = _write(model, root / "sharded", max_shard_size="20KB")
    state = load_file(llama_dir / "model.safetensors")  # the HF keys, with their "model." prefix

    binary = root / "bin"
    binary.mkdir()
    shutil.copy(llama_dir / "config.json", binary / "config.json")
    torch.save(state, binary / "pytorch_model.bin")
    dirs["bin"] = binary

    legacy = root / "legacy_bin"  # torch.save's pre-1.6 (non-zip) format
    legacy.mkdir()
    shutil.copy(llama_dir / "config.json", legacy / "config.json")
    torch.save(state, legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    dirs["legacy_bin"] = legacy

    sharded_bin = root / "sharded_bin"
    sharded_bin.mkdir()
    shutil.copy(llama_dir / "config.json", sharded_bin / "config.json")
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    weight_map = {}
    for file, part in halves.items():
        torch.save({k: state[k] for k in part}, sharded_bin / file)
        weight_map.update({k: file for k in part})
    (sharded_bin / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    dirs["sharded_bin"] = sharded_bin
    return dirs


def test_sharded_fixture_really_is_sharded(format_dirs):
    shards = list(format_dirs["sharded"].glob("model-*.safetensors"))
    assert len(shards) > 2
    assert (format_dirs["sharded"] / "model.safetensors.index.json").exists()
    assert not (format_dirs["sharded"] / "model.safetensors").exists()


@pytest.mark.parametrize("fmt", ["sharded", "bin", "legacy_bin", "sharded_bin"])
def test_weight_formats_give_identical_parameters(fmt, format_dirs, hf_models):
    reference = load_target(format_dirs["single"], tokenizer=False).module
    other = load_target(format_dirs[fmt], tokenizer=False).module
    _assert_same_params(reference, other)
    torch.testing.assert_close(other.lm_head.weight, hf_models["llama"].lm_head.weight)


def test_read_state_dict_prefers_safetensors_index(format_dirs):
    state = read_state_dict(format_dirs["sharded"])
    assert "model.embed_tokens.weight" in state and "lm_head.weight" in state
    assert len(state) == 2 * 9 + 3  # 9 tensors per layer, embed, norm, lm_head


def test_old_checkpoints_with_rotary_buffer_load(llama_dir, tmp_path):
    """Old HF checkpoints saved `rotary_emb.inv_freq`; it is recomputed, not a strict-load failure."""
    directory = _variant(llama_dir, tmp_path)
    state = load_file(directory / "model.safetensors")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, directory / "model.safetensors")
    target = load_target(directory, tokenizer=False)
    assert not torch.equal(target.module.rotary.inv_freq, torch.ones(8))


# ---------------------------------------------------------------------------------------------------------------
# Refusals: each one a ModelLoadError whose message names the problem


def _refused(path, match, **kwargs) -> str:
    with pytest.raises(ModelLoadError, match=match) as info:
        load_target(path, tokenizer=False, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message  # one line on the CLI
    return message


def test_missing_directory(tmp_path):
    message = _refused(tmp_path / "nowhere", "no such model directory")
    assert "nowhere" in message


def test_file_instead_of_directory(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    _refused(path, "not a model directory or a GGUF file")


def test_directory_without_config(llama_dir, tmp_path):
    directory = _variant(llama_dir, tmp_path)
    (directory / "config.json").unlink()
    _refused(directory, r"no config\.json \(not a Hugging Face model directory\)")


@pytest.mark.parametrize("text", ["{not json", "", "\x00\x01garbage"])
def test_malformed_config_json(text, llama_dir, tmp_path):
    directory = _variant(llama_dir, tmp_path)
    (directory / "config.json").write_text(text)
    _refused(directory, r"config\.json: malformed JSON")


@pytest.mark.parametrize("text", ["[1, 2]", '"LlamaForCausalLM"', "null", "42"])
def test_config_json_that_is_not_an_object(text, llama_dir, tmp_path):
    directory = _variant(llama_dir, tmp_path)
    (directory / "config.json").write_text(text)
    _refused(directory, r"config\.json: malformed JSON \(expected an object")


@pytest.mark.parametrize("architectures", [["GPT2LMHeadModel"], [], None, "LlamaForCausalLM"])
def test_unsupported_architecture_lists_supported_ones(architectures, llama_dir, tmp_path):
    directory = _edit_config(_variant(llama_dir, tmp_path), architectures=architectures)
    message = _refused(directory, "unsupported architecture")
    assert "supported: " + ", ".join(ARCHITECTURES) in message
    if architectures:
        assert repr(architectures[0]) in message


def test_unsupported_activation(llama_dir, tmp_path):
    directory = _edit_config(_variant(llama_dir, tmp_path), hidden_act="gelu")
    _refused(directory, r"hidden_act 'gelu' is not supported")


def test_sliding_window_on_non_mistral(model_dirs, tmp_path):
    directory = _edit_config(_variant(model_dirs["qwen2"], tmp_path), use_sliding_window=True, sliding_window=16)
    _refused(directory, "use_sliding_window is not supported")


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads"])
def test_missing_key_in_config(key, llama_dir, tmp_path):
    directory = _edit_config(_variant(llama_dir, tmp_path), **{key: _DELETE})
    _refused(directory, rf"config\.json: missing key '{key}'")


@pytest.mark.parametrize("key, value", [("hidden_size", "64"), ("vocab_size", None), ("num_hidden_layers", None),
                                        ("num_attention_heads", 0), ("intermediate_size", -1)])
def test_ill_typed_size_in_config(key, value, llama_dir, tmp_path):
    directory = _edit_config(_variant(llama_dir, tmp_path), **{key: value})
    _refused(directory, rf"config\.json: {key} must be a positive integer, got {value!r}")


def test_ill_typed_field_transformers_validates(llama_dir, tmp_path):
    """transformers' strict config dataclass rejects it; that must still be a one-line ModelLoadError."""
    directory = _edit_config(_variant(llama_dir, tmp_path), rms_norm_eps="tiny")
    _refused(directory, r"config\.json: .*rms_norm_eps")


def test_heads_not_divisible_by_kv_heads(llama_dir, tmp_path):
    directory = _edit_config(_variant(llama_dir, tmp_path), num_key_value_heads=3)
    _refused(directory, "num_heads 4 is not a multiple of num_kv_heads 3")


def test_unsupported_rope_type(llama_dir, tmp_path):
    directory = _edit_config(_variant(llama_dir, tmp_path),
                             rope_parameters={"rope_type": "made-up", "rope_theta": 10000.0})
    _refused(directory, "unsupported rope_type 'made-up'")


def test_missing_weights(llama_dir, tmp_path):
    directory = _variant(llama_dir, tmp_path)
    (directory / "model.safetensors").unlink()
    _refused(directory, r"no weights \(model\.safetensors or pytorch_model\.bin\)")


def test_missing_shard(format_dirs, tmp_path):
    directory = _variant(format_dirs["sharded"], tmp_path)
    victim = sorted(directory.glob("model-*.safetensors"))[1]
    victim.unlink()
    _refused(directory, f"weight shard {victim.name} is missing")


def test_malformed_shard_index(format_dirs, tmp_path):
    directory = _variant(format_dirs["sharded"], tmp_path)
    (directory / "model.safetensors.index.json").write_text('{"weight_map": ["model-00001.safetensors"]}')
    _refused(directory, "malformed index")
    (directory / "model.safetensors.index.json").write_text("[]")
    _refused(directory, r"index\.json: malformed JSON")


@pytest.mark.parametrize("cut", ["half", "header", "garbage"])
def test_truncated_or_corrupt_safetensors(cut, llama_dir, tmp_path):
    directory = _variant(llama_dir, tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"half": data[: len(data) // 2], "header": data[:20], "garbage": b"\x07" * 64}[cut])
    message = _refused(directory, r"model\.safetensors: cannot read weights")
    assert str(weights) in message


@pytest.mark.parametrize("cut", ["half", "garbage"])
def test_truncated_or_corrupt_pytorch_bin(cut, format_dirs, tmp_path):
    directory = _variant(format_dirs["bin"], tmp_path)
    weights = directory / "pytorch_model.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if cut == "half" else b"not a pickle at all")
    _refused(directory, r"pytorch_model\.bin: cannot read weights")


class _NotATensor:
    pass


def test_pickle_with_python_objects_is_refused_in_one_line(format_dirs, tmp_path):
    directory = _variant(format_dirs["bin"], tmp_path)
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "extra": _NotATensor()}, directory / "pytorch_model.bin")
    _refused(directory, r"cannot read weights \(it pickles Python objects other than tensors")


def test_weights_disagree_with_config_shapes(llama_dir, tmp_path):
    directory = _edit_config(_variant(llama_dir, tmp_path), intermediate_size=128)
    message = _refused(directory, "weights do not match config.json")
    assert "size mismatch" in message and "mlp" in message


def test_weights_disagree_with_config_layer_count(llama_dir, tmp_path):
    directory = _edit_config(_variant(llama_dir, tmp_path), num_hidden_layers=3)
    message = _refused(directory, "weights do not match config.json")
    assert "Missing key(s)" in message and "layers.2." in message


def test_unexpected_tensor_in_checkpoint(llama_dir, tmp_path):
    directory = _variant(llama_dir, tmp_path)
    state = load_file(directory / "model.safetensors")
    state["model.extra_head.weight"] = torch.zeros(3)
    save_file(state, directory / "model.safetensors")
    message = _refused(directory, "weights do not match config.json")
    assert "extra_head.weight" in message


def test_missing_tensor_in_checkpoint(llama_dir, tmp_path):
    directory = _variant(llama_dir, tmp_path)
    state = load_file(directory / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, directory / "model.safetensors")
    message = _refused(directory, "weights do not match config.json")
    assert "norm.weight" in message


@pytest.mark.parametrize("name", ["fp8", "float32", "FP16", ""])
def test_unsupported_dtype(name, llama_dir):
    message = _refused(llama_dir, "unsupported dtype", dtype=name)
    assert repr(name) in message and "fp32, bf16, fp16" in message
    with pytest.raises(ModelLoadError):
        parse_dtype(name)


# ---------------------------------------------------------------------------------------------------------------
# Stop tokens


def test_eos_generation_config_list_wins(llama_dir, tmp_path):
    directory = _edit_config(_variant(llama_dir, tmp_path), eos_token_id=2)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert load_target(directory, tokenizer=False).eos_token_ids == (7, 9)


def test_eos_generation_config_int_wins(llama_dir, tmp_path):
    directory = _edit_config(_variant(llama_dir, tmp_path), eos_token_id=[2, 3])
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert load_target(directory, tokenizer=False).eos_token_ids == (11,)


def test_eos_falls_back_to_config(llama_dir, tmp_path):
    directory = _edit_config(_variant(llama_dir, tmp_path), eos_token_id=[4, 5])
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1}))
    assert load_target(directory, tokenizer=False).eos_token_ids == (4, 5)
    (directory / "generation_config.json").unlink()
    assert load_target(directory, tokenizer=False).eos_token_ids == (4, 5)


def test_no_eos_anywhere(llama_dir, tmp_path):
    directory = _edit_config(_variant(llama_dir, tmp_path), eos_token_id=_DELETE)
    (directory / "generation_config.json").unlink()
    assert eos_ids(directory, json.loads((directory / "config.json").read_text())) == ()


def test_default_written_dir_uses_config_eos(llama_dir):
    assert load_target(llama_dir, tokenizer=False).eos_token_ids == (2,)
