"""Tests for hass_deploy.models.checkpoint: the EAGLE draft directory format (algorithm.md §1.6-1.8).

Our own drafts round-trip exactly; drafts written the way EAGLE/HASS training writes them (pytorch_model.bin of a
flat state dict, a hand-copied Llama config.json, a DDP `module.` prefix, with or without fc.bias or the embedding)
load as they are and compute the same thing; a draft that belongs to another target is refused.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hass_deploy.atomic as atomic
import hass_deploy.models.checkpoint as checkpoint
from hass_deploy.errors import DraftMismatchError, HassDeployError, ModelLoadError
from hass_deploy.models.checkpoint import (
    FORMAT_VERSION,
    METADATA_FILE,
    DraftMetadata,
    init_draft,
    load_draft,
    save_draft,
    target_identity,
)
from hass_deploy.models.loading import target_fingerprint
from hass_deploy.models.loading import load_target
from hass_deploy.models.random_target import random_hf_model

EAGLE_KEYS = {
    "embed_tokens.weight",
    "fc.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight",
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "layers.0.mlp.up_proj.weight",
    "layers.0.mlp.down_proj.weight",
    "layers.0.post_attention_layernorm.weight",
}


def _target(root: Path, name: str, arch: str = "llama", seed: int = 0, **overrides):
    directory = root / name
    random_hf_model(arch, "tiny", seed, **overrides).save_pretrained(directory)
    return load_target(directory, tokenizer=False)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    return {
        "a": _target(root, "a", seed=0),
        "b": _target(root, "b", seed=1),  # same shapes as a, another embedding
        "narrow": _target(root, "narrow", seed=0, hidden_size=32, intermediate_size=96),
        "small_vocab": _target(root, "small_vocab", seed=0, vocab_size=256),
        "qwen2": _target(root, "qwen2", arch="qwen2", seed=2),
        "qwen3": _target(root, "qwen3", arch="qwen3", seed=2),
        "biased": _target(root, "biased", seed=4, attention_bias=True, mlp_bias=True),
    }


def _metadata(target) -> DraftMetadata:
    return DraftMetadata(FORMAT_VERSION, "random-init", target_identity(target))


def _randomise_norm(head) -> None:
    """init leaves the RMSNorm weight at ones; make it distinct so a dropped/renamed tensor shows."""
    with torch.no_grad():
        head.layers[0].post_attention_layernorm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
        if head.fc.bias is not None:
            head.fc.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))


def _inputs(config, steps: int = 6, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(1, steps, config.hidden_size, generator=generator)
    ids = torch.randint(0, config.vocab_size, (1, steps), generator=generator)
    return features, ids, torch.arange(steps)[None]


def _outputs(head, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return head(*_inputs(head.config, seed=seed))


# ---------------------------------------------------------------------------------------------------------------
# init_draft + save_draft + load_draft


def test_init_draft_copies_target_embedding_and_is_seeded(targets):
    target = targets["a"]
    rng_before = torch.random.get_rng_state()
    head = init_draft(target, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global generator is left alone
    assert torch.equal(head.embed_tokens.weight, target.module.embed_tokens.weight)
    assert head.embed_tokens.weight.requires_grad is False
    assert head.fc.weight.shape == (64, 128) and head.fc.bias is None  # bias-free by default (vLLM, §1.8)
    assert torch.equal(init_draft(target, seed=7).fc.weight, head.fc.weight)
    assert not torch.equal(init_draft(target, seed=8).fc.weight, head.fc.weight)
    assert init_draft(target, fc_bias=True).fc.bias is not None


def test_round_trip_exact(targets, tmp_path):
    target = targets["a"]
    head = init_draft(target, seed=3)
    _randomise_norm(head)
    out = save_draft(head, tmp_path / "draft", _metadata(target))
    assert out == tmp_path / "draft"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", METADATA_FILE, "model.safetensors"]

    # The file holds exactly EAGLE's flat keys: no input_layernorm, no norm, no lm_head, no RoPE buffer.
    stored = load_file(out / "model.safetensors")
    assert set(stored) == EAGLE_KEYS
    for key, tensor in head.state_dict().items():
        assert torch.equal(stored[key], tensor), key

    loaded, metadata = load_draft(out, target)
    assert set(loaded.state_dict()) == EAGLE_KEYS
    for key, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert loaded.config == head.config
    assert loaded.fc.bias is None
    assert loaded.embed_tokens.weight.requires_grad is False
    assert not loaded.training
    torch.testing.assert_close(_outputs(loaded), _outputs(head), rtol=0, atol=0)
    assert metadata == _metadata(target)


def test_saved_config_and_metadata(targets, tmp_path):
    target = targets["a"]
    out = save_draft(init_draft(target), tmp_path / "draft", _metadata(target))
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    assert "bias" in config and config["bias"] is False
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["vocab_size"], config["intermediate_size"]) == (64, 512, 176)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["tie_word_embeddings"] is False
    assert "qkv_bias" not in config  # EAGLE checks this key by presence: absent for a bias-free Llama
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["recipe"] == "random-init"
    assert meta["target"] == {"architecture": "LlamaForCausalLM", "hidden_size": 64, "vocab_size": 512,
                              "num_layers": 2, "path": str(target.path),
                              "fingerprint": target_fingerprint(target.embedding)}

    with_bias = save_draft(init_draft(target, fc_bias=True), tmp_path / "biased", _metadata(target))
    assert json.loads((with_bias / "config.json").read_text())["bias"] is True
    assert "fc.bias" in load_file(with_bias / "model.safetensors")


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "biased"])
def test_round_trip_other_targets(name, targets, tmp_path):
    """q/k/v biases follow the target (Qwen2; Llama with attention_bias) through EAGLE's `qkv_bias` key; o_proj and
    the MLP never have one (§1.2), whatever the target."""
    target = targets[name]
    head = init_draft(target, seed=1, fc_bias=True)
    _randomise_norm(head)
    out = save_draft(head, tmp_path / name, _metadata(target))
    stored = set(load_file(out / "model.safetensors"))
    qkv_bias = name in ("qwen2", "biased")
    expected = EAGLE_KEYS | {"fc.bias"}
    if qkv_bias:
        expected |= {f"layers.0.self_attn.{p}_proj.bias" for p in "qkv"}
    assert stored == expected
    config = json.loads((out / "config.json").read_text())
    assert config.get("qkv_bias", False) is qkv_bias
    loaded, _ = load_draft(out, target)
    assert loaded.config.head_dim == head.config.head_dim
    for key, tensor in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    torch.testing.assert_close(_outputs(loaded), _outputs(head), rtol=0, atol=0)


def test_load_in_target_dtype(targets, tmp_path):
    target = targets["a"]
    out = save_draft(init_draft(target, seed=2), tmp_path / "draft", _metadata(target))
    bf16_target = load_target(target.path, dtype="bf16", tokenizer=False)
    head, _ = load_draft(out, bf16_target)
    assert {p.dtype for p in head.parameters()} == {torch.bfloat16}
    assert head.rotary.inv_freq.dtype == torch.float32
    explicit, _ = load_draft(out, target, dtype=torch.float16)
    assert explicit.fc.weight.dtype == torch.float16


def test_save_over_existing_draft_replaces_it_cleanly(targets, tmp_path):
    target = targets["a"]
    out = tmp_path / "draft"
    save_draft(init_draft(target, seed=1), out, _metadata(target))
    (out / "stale.txt").write_text("from an earlier run")
    second = init_draft(target, seed=2)
    save_draft(second, out, _metadata(target))
    assert not (out / "stale.txt").exists()
    assert torch.equal(load_file(out / "model.safetensors")["fc.weight"], second.fc.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft"]  # no temp or .old directory left


# ---------------------------------------------------------------------------------------------------------------
# Published EAGLE/HASS drafts load as they are


def _eagle_config(head, bias: bool) -> dict:
    """What a HASS user copies in by hand (algorithm.md §1.6): a plain Llama config, no head_dim key."""
    c = head.config
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "num_hidden_layers": 1,
        "max_position_embeddings": 2048, "rms_norm_eps": c.rms_norm_eps, "rope_scaling": None,
        "rope_theta": 10000.0, "vocab_size": c.vocab_size, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": False, "torch_dtype": "float16", "pretraining_tp": 1,
        "transformers_version": "4.28.1", "bias": bias,
    }


@pytest.fixture(scope="module")
def reference_heads(targets):
    """Original modules for target a, with and without fc bias."""
    heads = {}
    for bias in (False, True):
        head = init_draft(targets["a"], seed=11, fc_bias=bias)
        _randomise_norm(head)
        heads[bias] = head
    return heads


VARIANTS = {
    # name: (fc bias, file format, key prefix, keep embedding, storage dtype)
    "bin-bias": (True, "bin", "", True, torch.float32),
    "bin-no-bias": (False, "bin", "", True, torch.float32),
    "bin-ddp-prefix": (True, "bin", "module.", True, torch.float32),
    "bin-ddp-no-embed": (False, "bin", "module.", False, torch.float32),
    "bin-no-embed": (True, "bin", "", False, torch.float32),
    "safetensors-no-bias": (False, "safetensors", "", True, torch.float32),
    "safetensors-no-embed": (True, "safetensors", "", False, torch.float32),
    "bin-fp16": (True, "bin", "", True, torch.float16),
    "bin-bf16-ddp": (False, "bin", "module.", True, torch.bfloat16),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_published_format_loads_as_is(variant, reference_heads, targets, tmp_path):
    bias, fmt, prefix, keep_embed, storage = VARIANTS[variant]
    head = reference_heads[bias]
    state = {prefix + k: v.detach().clone().to(storage) for k, v in head.state_dict().items()
             if keep_embed or k != "embed_tokens.weight"}
    assert ("fc.bias" in head.state_dict()) is bias
    directory = tmp_path / variant
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(_eagle_config(head, bias)))
    if fmt == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, directory / "model.safetensors")

    loaded, metadata = load_draft(directory, targets["a"])
    assert metadata.recipe == "external" and metadata.format_version == FORMAT_VERSION
    assert (loaded.fc.bias is not None) is bias
    assert set(loaded.state_dict()) == set(head.state_dict())
    assert loaded.fc.weight.dtype == torch.float32  # the target's dtype, whatever the file stored
    torch.testing.assert_close(loaded.embed_tokens.weight, targets["a"].module.embed_tokens.weight,
                               atol=0 if storage == torch.float32 else 1e-2, rtol=1e-2)
    if storage == torch.float32:
        for key, tensor in head.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], tensor), key
        torch.testing.assert_close(_outputs(loaded, seed=5), _outputs(head, seed=5), rtol=0, atol=0)
    else:
        torch.testing.assert_close(_outputs(loaded, seed=5), _outputs(head, seed=5), rtol=0.05, atol=0.05)


def test_eagle_draft_config_with_copied_target_bias_keys(reference_heads, targets, tmp_path):
    """A config copied from a target with attention_bias/mlp_bias must not demand o_proj/MLP biases (EAGLE has none)."""
    head = reference_heads[False]
    directory = tmp_path / "copied"
    directory.mkdir()
    config = dict(_eagle_config(head, False), attention_bias=True, mlp_bias=True, architectures=["LlamaForCausalLMEagle"])
    (directory / "config.json").write_text(json.dumps(config))
    torch.save(head.state_dict(), directory / "pytorch_model.bin")
    loaded, _ = load_draft(directory, targets["a"])
    torch.testing.assert_close(_outputs(loaded), _outputs(head), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture(scope="module")
def draft_a(targets, tmp_path_factory):
    """A saved draft made for target a."""
    return save_draft(init_draft(targets["a"], seed=0), tmp_path_factory.mktemp("drafts") / "for_a",
                      _metadata(targets["a"]))


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_refuses_hidden_size_mismatch(draft_a, targets):
    with pytest.raises(DraftMismatchError) as err:
        load_draft(draft_a, targets["narrow"])
    message = _one_line(err)
    assert "hidden size 64" in message and "has 32" in message and str(draft_a) in message


def test_refuses_vocab_mismatch(draft_a, targets):
    with pytest.raises(DraftMismatchError) as err:
        load_draft(draft_a, targets["small_vocab"])
    message = _one_line(err)
    assert "vocabulary 512" in message and "has 256" in message


def test_refuses_draft_of_another_target_with_same_shapes(draft_a, targets):
    assert targets["b"].config == targets["a"].config
    with pytest.raises(DraftMismatchError) as err:
        load_draft(draft_a, targets["b"])
    message = _one_line(err)
    assert "made for a different target" in message and str(targets["b"].path) in message
    load_draft(draft_a, targets["a"])  # the right pairing still loads


def test_draft_in_lower_precision_is_still_recognised(targets, tmp_path):
    """The embedding check tolerates a copy stored in bf16 but not another model's table."""
    head = init_draft(targets["a"], seed=0)
    directory = tmp_path / "bf16"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(_eagle_config(head, False)))
    save_file({k: v.to(torch.bfloat16) for k, v in head.state_dict().items()}, directory / "model.safetensors")
    load_draft(directory, targets["a"])
    with pytest.raises(DraftMismatchError, match="made for a different target"):
        load_draft(directory, targets["b"])


def test_refuses_two_layer_draft(draft_a, tmp_path, targets):
    directory = tmp_path / "two_layers"
    directory.mkdir()
    for file in draft_a.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        load_draft(directory, targets["a"])
    assert "not an EAGLE/HASS draft head (num_hidden_layers = 2)" in _one_line(err)


def test_refuses_a_full_model_directory_as_draft(targets):
    with pytest.raises(ModelLoadError, match="not an EAGLE/HASS draft head"):
        load_draft(targets["a"].path, targets["a"])


def test_refuses_missing_dir(tmp_path, targets):
    with pytest.raises(ModelLoadError) as err:
        load_draft(tmp_path / "nope", targets["a"])
    assert "nope: no such draft directory" in _one_line(err)


def test_refuses_dir_without_config(tmp_path, targets):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_draft(tmp_path / "empty", targets["a"])


def _copy_draft(source: Path, directory: Path) -> Path:
    directory.mkdir()
    for file in source.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    return directory


def test_refuses_missing_and_extra_tensors(draft_a, tmp_path, targets):
    directory = _copy_draft(draft_a, tmp_path / "d")
    state = load_file(directory / "model.safetensors")
    up = state.pop("layers.0.mlp.up_proj.weight")
    save_file(state, directory / "model.safetensors")
    with pytest.raises(ModelLoadError) as err:
        load_draft(directory, targets["a"])
    assert "draft weights do not match" in _one_line(err) and "up_proj" in str(err.value)

    state["layers.0.mlp.up_proj.weight"] = up
    state["layers.0.input_layernorm.weight"] = torch.ones(64)  # layer 0 of a draft has no input norm
    save_file(state, directory / "model.safetensors")
    with pytest.raises(ModelLoadError) as err:
        load_draft(directory, targets["a"])
    assert "input_layernorm" in _one_line(err)


def test_refuses_corrupt_weights(draft_a, tmp_path, targets):
    directory = _copy_draft(draft_a, tmp_path / "d")
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="cannot read weights"):
        load_draft(directory, targets["a"])


@pytest.mark.parametrize("text, match", [
    ('{"format_version": 1}', "malformed draft metadata"),
    ('["random-init"]', "malformed JSON"),
    ('{"format_version": "1", "recipe": "x", "target": {}}', "malformed draft metadata"),
])
def test_refuses_malformed_metadata(text, match, draft_a, tmp_path, targets):
    directory = _copy_draft(draft_a, tmp_path / "d")
    (directory / METADATA_FILE).write_text(text)
    with pytest.raises(ModelLoadError, match=match):
        load_draft(directory, targets["a"])


def test_refuses_newer_format(draft_a, tmp_path, targets):
    directory = _copy_draft(draft_a, tmp_path / "d")
    meta = json.loads((directory / METADATA_FILE).read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (directory / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(HassDeployError, match=f"draft format {FORMAT_VERSION + 1} is newer"):
        load_draft(directory, targets["a"])


# ---------------------------------------------------------------------------------------------------------------
# save_draft is atomic


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_write_leaves_existing_draft_intact(targets, tmp_path, monkeypatch):
    target = targets["a"]
    out = save_draft(init_draft(target, seed=1), tmp_path / "draft", _metadata(target))
    before = _snapshot(out)

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_draft(init_draft(target, seed=2), out, _metadata(target))
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["draft"]  # no temp directory left behind
    load_draft(out, target)


def test_failed_write_of_new_draft_leaves_nothing(targets, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", fail)
    with pytest.raises(OSError):
        save_draft(init_draft(targets["a"]), tmp_path / "draft", _metadata(targets["a"]))
    assert list(tmp_path.iterdir()) == []


def test_failed_swap_puts_previous_draft_back(targets, tmp_path, monkeypatch):
    """If moving the new directory into place fails, the old one is restored, not left aside as .draft.old."""
    target = targets["a"]
    out = save_draft(init_draft(target, seed=1), tmp_path / "draft", _metadata(target))
    before = _snapshot(out)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".draft.") and not Path(src).name.endswith(".old") and Path(dst) == out:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_draft(init_draft(target, seed=2), out, _metadata(target))
    monkeypatch.undo()
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["draft"]


# ---------------------------------------------------------------------------------------------------------------
# Packed drafts: no embedding copy, bf16, a probe of the target's rows


def test_packed_draft_is_small_and_computes_what_the_draft_does_in_bf16(targets, tmp_path):
    target = targets["a"]
    head = init_draft(target, seed=3, vocabulary=torch.arange(0, 512, 3))
    _randomise_norm(head)
    full = save_draft(head, tmp_path / "full", _metadata(target))
    packed = checkpoint.pack_draft(full, tmp_path / "packed")
    stored = load_file(packed / "model.safetensors")
    assert "embed_tokens.weight" not in stored and set(stored) == EAGLE_KEYS - {"embed_tokens.weight"} | {"d2t", "t2d"}
    assert {v.dtype for k, v in stored.items() if k not in ("d2t", "t2d")} == {torch.bfloat16}
    assert torch.equal(stored["d2t"], load_file(full / "model.safetensors")["d2t"])  # the token map stays exact
    assert json.loads((packed / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (packed / checkpoint.TOKEN_MAP_FILE).read_bytes() == (full / checkpoint.TOKEN_MAP_FILE).read_bytes()
    assert (packed / "model.safetensors").stat().st_size < (full / "model.safetensors").stat().st_size / 2

    loaded, metadata = load_draft(packed, target, dtype=torch.float32)
    assert metadata == _metadata(target)
    assert torch.equal(loaded.embed_tokens.weight, target.embedding)  # taken from the target
    assert torch.equal(loaded.vocabulary(), head.vocabulary())
    rounded = init_draft(target, seed=3, vocabulary=torch.arange(0, 512, 3))
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() if k != "embed_tokens.weight" and v.is_floating_point()
                             else v for k, v in head.state_dict().items()})
    torch.testing.assert_close(_outputs(loaded), _outputs(rounded), rtol=0, atol=0)


def test_packed_draft_still_refuses_another_target(draft_a, targets, tmp_path):
    packed = checkpoint.pack_draft(draft_a, tmp_path / "packed", conversations=["x1", "y2"])
    assert (packed / checkpoint.CONVERSATIONS_FILE).read_text() == "x1\ny2\n"
    load_draft(packed, targets["a"])
    with pytest.raises(DraftMismatchError, match="made for a different target"):
        load_draft(packed, targets["b"])
    with pytest.raises(ModelLoadError, match="is it packed already"):
        checkpoint.pack_draft(packed, tmp_path / "again")
    with pytest.raises(HassDeployError, match="not empty|exists"):
        checkpoint.pack_draft(draft_a, packed)
    save_file({"ids": torch.tensor([0, 9999]), "rows": torch.zeros(2, 64)}, packed / checkpoint.PROBE_FILE)
    with pytest.raises(ModelLoadError, match="malformed target probe"):
        load_draft(packed, targets["a"])
