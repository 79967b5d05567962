"""Function-preserving widening: the widened target's logits are the original's for every architecture and shape,
its drafts predict what they predicted (so speculative decoding accepts exactly as before), every new weight
that may be random is, and the written directories load and pair like any others."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ARCHITECTURES, make_decoder
from hass_deploy.config import GenerationConfig, TreeConfig
from hass_deploy.errors import ConfigError, DraftMismatchError, HassDeployError, ModelLoadError
from hass_deploy.models.checkpoint import (METADATA_FILE, DraftMetadata, FORMAT_VERSION, init_draft, load_draft,
                                           save_draft, target_identity)
from hass_deploy.models.loading import TargetModel, build_target, load_target, target_fingerprint
from hass_deploy.models.random_target import random_hf_model
from hass_deploy.models.widen import (WIDEN_FILE, Widening, scales_for, widen_directory, widen_draft,
                                      widen_target_state, widened_config)

# Fixture targets (tests/conftest.py TINY): hidden 48, intermediate 96, 2 layers; head_dim 12 with 2 kv heads,
# except Qwen3 (head_dim 32, decoupled; 1 kv head): its hidden sizes must be multiples of 48 (whole kv heads).
SHAPES = {
    "hidden": (96, 96, 2),
    "intermediate": (48, 160, 2),
    "layers": (48, 96, 4),
    "all": (96, 200, 3),
}
TOLERANCE = 1e-4  # fp32 logits (the construction is exact in real arithmetic; rounding gives ~1e-7)


def prompt(length: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 95, (1, length), generator=torch.Generator().manual_seed(seed))


def widen_module(target: TargetModel, widening: Widening):
    config, state = widen_target_state(target.module.state_dict(), target.config, widening)
    return build_target(config, state, torch.float32)


@torch.no_grad()
def features_and_logits(module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = module(ids, torch.arange(ids.shape[1])[None])  # [1, T, H]
    return hidden, module.logits(hidden)


def accepting_draft(target: TargetModel, seed: int = 3):
    """A draft that passes the feature straight through (fc = [0 | I], damped layer): it proposes what the target
    just predicted, which tiny random targets often repeat, so rounds accept 0, 1 or 2 tokens, not always 0."""
    head = init_draft(target, seed=seed)
    hidden = target.config.hidden_size
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, hidden:] = torch.eye(hidden)
        head.layers[0].self_attn.o_proj.weight.mul_(0.1)
        head.layers[0].mlp.down_proj.weight.mul_(0.1)
    return head


# ---------------------------------------------------------------------------------------------------------------
# The target


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("shape", SHAPES)
def test_widened_target_has_the_same_logits(arch, shape, targets):
    target = targets[arch]
    widening = Widening(*SHAPES[shape], seed=1)
    wide = widen_module(target, widening)
    assert (wide.config.hidden_size, wide.config.intermediate_size, wide.config.num_layers) == SHAPES[shape]
    assert wide.config.head_dim == target.config.head_dim
    ids = prompt(seed=len(shape))
    hidden, logits = features_and_logits(target.module, ids)
    wide_hidden, wide_logits = features_and_logits(wide, ids)
    assert (wide_logits - logits).abs().max().item() <= TOLERANCE
    assert torch.equal(wide_logits.argmax(-1), logits.argmax(-1))
    # The feature (lm_head input, what drafts read) is t x the original on the old dims and exactly 0 on the new.
    original = target.config.hidden_size
    feature = scales_for(target.config, widening).feature
    assert (wide_hidden[..., :original] / feature - hidden).abs().max().item() <= TOLERANCE
    assert torch.count_nonzero(wide_hidden[..., original:]) == 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_head_counts_grow_with_the_hidden_size_keeping_the_gqa_group(arch, targets):
    config = targets[arch].config
    wide = widened_config(config, Widening(4 * config.hidden_size, config.intermediate_size, config.num_layers))
    assert wide.num_kv_heads == 4 * config.num_kv_heads
    assert wide.num_heads // wide.num_kv_heads == config.num_heads // config.num_kv_heads
    assert wide.head_dim == config.head_dim and wide.rms_norm_eps == config.rms_norm_eps


def test_new_weights_are_random_and_writers_of_new_dims_are_zero(targets):
    """Readers of anything new are random (no kernel can skip them); whatever writes the residual's new dims, or
    writes from new heads, units and layers into it, is 0. Llama here: tied embeddings, GQA."""
    target = targets["llama"]
    c = target.config
    _, state = widen_target_state(target.module.state_dict(), c, Widening(96, 200, 3, seed=1))
    hidden, inter, q_rows = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim
    kv_rows = c.num_kv_heads * c.head_dim

    def random(t: torch.Tensor) -> bool:
        return t.numel() > 0 and bool(torch.all(t != 0)) and 0.005 < t.std().item() < 0.05

    layer = "layers.0."
    assert random(state[layer + "self_attn.q_proj.weight"][q_rows:])  # new heads
    assert random(state[layer + "self_attn.q_proj.weight"][:q_rows, hidden:])  # columns reading padded dims
    assert random(state[layer + "self_attn.k_proj.weight"][kv_rows:])
    assert random(state[layer + "mlp.gate_proj.weight"][inter:]) and random(state[layer + "mlp.up_proj.weight"][inter:])
    assert random(state[layer + "input_layernorm.weight"][hidden:])
    o_proj, down = state[layer + "self_attn.o_proj.weight"], state[layer + "mlp.down_proj.weight"]
    assert torch.count_nonzero(o_proj[hidden:]) == 0 and torch.count_nonzero(o_proj[:, q_rows:]) == 0
    assert torch.count_nonzero(down[hidden:]) == 0 and torch.count_nonzero(down[:, inter:]) == 0
    assert torch.count_nonzero(state["embed_tokens.weight"][:, hidden:]) == 0
    assert "lm_head.weight" not in state  # tied: the embedding is the head, as HF stores it
    appended = "layers.2."
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                 "mlp.gate_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
        assert random(state[appended + name]), name
    for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
        assert torch.count_nonzero(state[appended + name]) == 0, name
    # The original block holds the original weights (q_proj reads a norm's output: unscaled).
    assert torch.equal(state[layer + "self_attn.q_proj.weight"][:q_rows, :hidden],
                       target.module.layers[0].self_attn.q_proj.weight)


def test_untied_lm_head_gets_random_columns_and_biases_grow(targets):
    """Qwen2: untied lm_head (random new columns), q/k/v biases (new heads' biases random, old ones kept)."""
    target = targets["qwen2"]
    c = target.config
    _, state = widen_target_state(target.module.state_dict(), c, Widening(96, 96, 2))
    assert torch.all(state["lm_head.weight"][:, c.hidden_size:] != 0)
    assert torch.equal(state["lm_head.weight"][:, :c.hidden_size], target.module.lm_head.weight)
    q_rows = c.num_heads * c.head_dim
    bias = state["layers.1.self_attn.q_proj.bias"]
    assert torch.equal(bias[:q_rows], target.module.layers[1].self_attn.q_proj.bias)
    assert torch.all(bias[q_rows:] != 0)


def test_seed_changes_only_the_new_weights(targets):
    target = targets["mistral"]
    _, a = widen_target_state(target.module.state_dict(), target.config, Widening(96, 96, 2, seed=0))
    _, b = widen_target_state(target.module.state_dict(), target.config, Widening(96, 96, 2, seed=0))
    _, other = widen_target_state(target.module.state_dict(), target.config, Widening(96, 96, 2, seed=1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    q = "layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], other[q]) and torch.equal(a[q][:48, :48], other[q][:48, :48])


@pytest.mark.parametrize("arch,tied,biases", [("qwen3", False, False), ("llama", True, False), ("llama", False, True)])
def test_every_norm_and_bias_is_exact_even_with_a_large_eps(arch, tied, biases, tmp_path):
    """With eps 0.1 any slip in a norm's eps or weight shows in the logits. Qwen3's per-head q/k norms share
    config.json's one rms_norm_eps and their input does not grow, so it must stay (no weight could undo a changed
    eps); a tied Llama gives features of scale 1/c, so its draft's norm needs eps (H/H')^2. Llama's attention_bias
    and mlp_bias add q/k/v/o and gate/up/down biases (o and down write the stream: scaled, padded with 0)."""
    extra = dict(attention_bias=True, mlp_bias=True) if biases else {}
    random_hf_model(arch, "tiny", seed=5, vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=0.1,
                    tie_word_embeddings=tied, **extra).save_pretrained(tmp_path)
    target = load_target(tmp_path, tokenizer=False)
    biased = [tensor for name, tensor in target.module.state_dict().items() if name.endswith(".bias")]
    assert len(biased) == (14 if biases else 0)  # q, k, v, o, gate, up, down in both layers
    for tensor in biased:  # transformers initialises biases to 0; make them count
        tensor.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(tensor.numel()))
    widening = Widening(192, 128, 3, seed=2)
    config, state = widen_target_state(target.module.state_dict(), target.config, widening)
    assert config.rms_norm_eps == target.config.rms_norm_eps == 0.1
    if arch == "qwen3":
        assert torch.equal(state["layers.0.self_attn.q_norm.weight"], target.module.layers[0].self_attn.q_norm.weight)
    wide_target = build_target(config, state, torch.float32)
    head = accepting_draft(target)
    wide_head = widen_draft(head, target.config, widening, wide_target.embed_tokens.weight)
    assert wide_head.config.rms_norm_eps == pytest.approx(0.1 * (48 / 192) ** (2 if tied else 1))
    ids = prompt(seed=9)
    positions = torch.arange(ids.shape[1])[None]
    features, logits = features_and_logits(target.module, ids)
    wide_features, wide_logits = features_and_logits(wide_target, ids)
    assert (wide_logits - logits).abs().max().item() <= TOLERANCE
    with torch.no_grad():
        draft_logits = target.module.logits(head(features, ids, positions))
        wide_draft_logits = wide_target.logits(wide_head(wide_features, ids, positions))
    assert (wide_draft_logits - draft_logits).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("hidden,intermediate,layers,message", [
    (24, 96, 2, "--hidden-size 24 is smaller"),
    (96, 64, 2, "--intermediate-size 64 is smaller"),
    (96, 96, 1, "--num-layers 1 is smaller"),
])
def test_smaller_shapes_are_refused(arch, hidden, intermediate, layers, message, targets):
    with pytest.raises(ConfigError, match=message):
        widened_config(targets[arch].config, Widening(hidden, intermediate, layers))


def test_hidden_size_must_keep_head_dim_and_gqa_group(targets):
    with pytest.raises(ConfigError, match="--hidden-size 54 is not a multiple of head_dim 12"):
        widened_config(targets["llama"].config, Widening(54, 96, 2))
    # Qwen3's head_dim 32 is decoupled from its hidden size 48: whole head counts are what it needs.
    with pytest.raises(ConfigError, match="cannot keep the GQA group of 4: 1 kv heads x 64/48.*multiple of 48"):
        widened_config(targets["qwen3"].config, Widening(64, 96, 2))
    assert widened_config(targets["qwen3"].config, Widening(144, 96, 2)).num_kv_heads == 3
    with pytest.raises(ConfigError, match="cannot keep the GQA group of 2.*use a multiple of 24"):
        widened_config(targets["llama"].config, Widening(60, 96, 2))  # 2 kv heads x 60/48
    with pytest.raises(ConfigError, match="--num-layers must be a positive integer"):
        Widening(96, 96, 0)


# ---------------------------------------------------------------------------------------------------------------
# Drafts


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_widened_draft_predicts_what_it_predicted(arch, targets):
    target = targets[arch]
    widening = Widening(96, 200, 3, seed=4)
    config, state = widen_target_state(target.module.state_dict(), target.config, widening)
    wide_target = build_target(config, state, torch.float32)
    head = accepting_draft(target)
    wide_head = widen_draft(head, target.config, widening, wide_target.embed_tokens.weight)
    assert wide_head.config.hidden_size == 96 and wide_head.config.intermediate_size == 200
    assert torch.equal(wide_head.embed_tokens.weight, wide_target.embed_tokens.weight)
    ids = prompt(seed=11)
    positions = torch.arange(ids.shape[1])[None]
    features, _ = features_and_logits(target.module, ids)
    wide_features, _ = features_and_logits(wide_target, ids)
    with torch.no_grad():
        predicted = head(features, ids, positions)  # [1, T, H]
        wide_predicted = wide_head(wide_features, ids, positions)  # [1, T, H']
        logits, wide_logits = target.module.logits(predicted), wide_target.logits(wide_predicted)
    hidden, feature = target.config.hidden_size, scales_for(target.config, widening).feature
    assert (wide_predicted[..., :hidden] / feature - predicted).abs().max().item() <= TOLERANCE
    assert torch.count_nonzero(wide_predicted[..., hidden:]) == 0  # fed back as features: must stay padded
    assert (wide_logits - logits).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_speculative_decoding_accepts_exactly_as_before(arch, targets):
    target = targets[arch]
    widening = Widening(96, 160, 3, seed=6)
    wide_target = widen_module(target, widening)
    head = accepting_draft(target)
    wide_head = widen_draft(head, target.config, widening, wide_target.embed_tokens.weight)
    wide = TargetModel(target.path, wide_target.config, wide_target, target.eos_token_ids, None)
    config = GenerationConfig(max_new_tokens=40, tree=TreeConfig(tokens=12, depth=4, top_k=4), eos_token_ids=())
    ids = prompt(12, seed=ARCHITECTURES.index(arch)).tolist()[0]
    before = make_decoder(target, head).generate(ids, config)
    after = make_decoder(wide, wide_head).generate(ids, config)
    assert sum(before.accept_lengths) > 0  # otherwise equal acceptance would prove little
    assert after.output_ids == before.output_ids
    assert after.accept_lengths == before.accept_lengths and after.tau == before.tau
    assert after.depth_accepts == before.depth_accepts
    assert make_decoder(wide).generate(ids, config).output_ids == before.output_ids


# ---------------------------------------------------------------------------------------------------------------
# Directories


@pytest.fixture(scope="module")
def widened(tmp_path_factory, hf_dirs, targets):
    """Llama (tied) and Qwen3 (q/k norm) widened on disk with two drafts each (one a trained recipe)."""
    root = tmp_path_factory.mktemp("widen")
    out = {}
    for arch in ("llama", "qwen3"):
        target = targets[arch]
        drafts = []
        for name, recipe, head in (("hass", "hass", accepting_draft(target)),
                                   ("random", "random-init", init_draft(target, seed=8))):
            path = root / arch / "sources" / name
            save_draft(head, path, DraftMetadata(FORMAT_VERSION, recipe, target_identity(target)))
            drafts.append(path)
        widening = Widening(192 if arch == "qwen3" else 96, 128, 3, seed=3)
        result = widen_directory(hf_dirs[arch], root / arch / "out", widening, drafts)
        assert result == root / arch / "out"
        out[arch] = (root / arch / "out", widening, drafts)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_written_target_loads_with_the_same_logits(arch, widened, targets, hf_dirs):
    out, widening, _ = widened[arch]
    target = targets[arch]
    loaded = load_target(out / "target", tokenizer=False)
    assert loaded.config == widened_config(target.config, widening)
    raw = json.loads((out / "target" / "config.json").read_text())
    original_raw = json.loads((hf_dirs[arch] / "config.json").read_text())
    assert raw["rms_norm_eps"] == original_raw["rms_norm_eps"] and raw["dtype"] == "float32"
    assert raw["num_hidden_layers"] == 3 and raw["hidden_size"] == widening.hidden_size
    assert (out / "target" / "generation_config.json").read_bytes() == \
        (hf_dirs[arch] / "generation_config.json").read_bytes()
    assert loaded.eos_token_ids == target.eos_token_ids
    ids = prompt(seed=13)
    _, logits = features_and_logits(target.module, ids)
    _, wide_logits = features_and_logits(loaded.module, ids)
    assert (wide_logits - logits).abs().max().item() <= TOLERANCE
    # The streamed file holds exactly what the in-memory widening builds.
    _, state = widen_target_state(target.module.state_dict(), target.config, widening)
    assert all(torch.equal(loaded.module.state_dict()[k], v) for k, v in state.items())
    provenance = json.loads((out / "target" / WIDEN_FILE).read_text())
    assert provenance["source_fingerprint"] == target_fingerprint(target.module)
    assert provenance["scales"]["hidden"] == pytest.approx(math.sqrt(widening.hidden_size / 48))


def test_written_target_is_an_ordinary_hf_directory(widened, targets):
    """transformers itself reads it (config.json valid, layer_types as long as the layers) and agrees."""
    from transformers import AutoModelForCausalLM

    out, _, _ = widened["qwen3"]
    model = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()
    ids = prompt(seed=17)
    _, logits = features_and_logits(targets["qwen3"].module, ids)
    with torch.no_grad():
        hf_logits = model(ids).logits
    assert (hf_logits - logits).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_written_drafts_pair_with_the_written_target(arch, widened, targets):
    out, widening, sources = widened[arch]
    target = targets[arch]
    loaded = load_target(out / "target", tokenizer=False)
    assert sorted(p.name for p in (out / "drafts").iterdir()) == ["hass", "random"]
    for source in sources:
        head, metadata = load_draft(out / "drafts" / source.name, loaded)  # the identity check passes
        original, original_metadata = load_draft(source, target)
        assert metadata.recipe == original_metadata.recipe
        assert metadata.target == target_identity(loaded)  # path OUT/target, the widened fingerprint
        assert head.config.hidden_size == widening.hidden_size
        ids = prompt(seed=19)
        positions = torch.arange(ids.shape[1])[None]
        features, _ = features_and_logits(target.module, ids)
        wide_features, _ = features_and_logits(loaded.module, ids)
        with torch.no_grad():
            logits = target.module.logits(original(features, ids, positions))
            wide_logits = loaded.module.logits(head(wide_features, ids, positions))
        assert (wide_logits - logits).abs().max().item() <= TOLERANCE
        # A widened draft belongs to the widened target only.
        with pytest.raises(DraftMismatchError):
            load_draft(out / "drafts" / source.name, target)


def test_tokenizer_files_are_copied(tmp_path, hf_dirs):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    source = tmp_path / "source"
    shutil.copytree(hf_dirs["mistral"], source)
    backend = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(96)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(source)
    widen_directory(source, tmp_path / "out", Widening(72, 96, 2))  # not a power of 2: 3 kv heads, 6 query heads
    loaded = load_target(tmp_path / "out" / "target")
    assert loaded.tokenizer is not None and loaded.tokenizer("w3 w5")["input_ids"] == [3, 5]
    assert loaded.config.num_heads == 6 and loaded.config.num_kv_heads == 3


def test_refusals_leave_out_untouched(tmp_path, hf_dirs, widened):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HassDeployError, match="not empty.*--force"):
        widen_directory(hf_dirs["llama"], out, Widening(96, 96, 2))
    with pytest.raises(DraftMismatchError):  # a Qwen3 draft with the Llama target
        widen_directory(hf_dirs["llama"], out, Widening(96, 96, 2), [widened["qwen3"][2][0]], force=True)
    with pytest.raises(ConfigError, match="smaller"):
        widen_directory(hf_dirs["llama"], out, Widening(24, 96, 2), force=True)
    with pytest.raises(ModelLoadError, match="no such model directory"):
        widen_directory(tmp_path / "missing", out, Widening(96, 96, 2), force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(HassDeployError, match="inside"):
        widen_directory(out, tmp_path, Widening(96, 96, 2), force=True)
    llama_sources = widened["llama"][2]
    with pytest.raises(HassDeployError, match="two drafts"):
        widen_directory(hf_dirs["llama"], tmp_path / "new", Widening(96, 96, 2), [llama_sources[0]] * 2)
    assert not (tmp_path / "new").exists()
    widen_directory(hf_dirs["llama"], out, Widening(96, 96, 2), force=True)
    assert sorted(p.name for p in out.iterdir()) == ["target"]


def test_a_widened_draft_records_the_widened_target(widened):
    out, _, sources = widened["llama"]
    meta = json.loads((out / "drafts" / sources[0].name / METADATA_FILE).read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["recipe"] == "hass"
    assert meta["target"]["hidden_size"] == 96 and meta["target"]["num_layers"] == 3
    assert Path(meta["target"]["path"]) == out / "target"


def test_a_large_target_is_written_in_shards_that_load_as_one(tmp_path, hf_dirs, targets, monkeypatch):
    """Above SHARD_BYTES per file the weights go to several safetensors files and an HF index (memory stays at
    one shard); the directory loads with the same logits, and transformers reads it too."""
    from transformers import AutoModelForCausalLM

    from hass_deploy.models import widen

    monkeypatch.setattr(widen, "SHARD_BYTES", 64 * 1024)
    out = widen_directory(hf_dirs["qwen2"], tmp_path / "out", Widening(96, 128, 3))
    shards = sorted(p.name for p in (out / "target").glob("*.safetensors"))
    assert len(shards) > 2 and (out / "target" / "model.safetensors.index.json").exists()
    ids = prompt(seed=19)
    _, logits = features_and_logits(targets["qwen2"].module, ids)
    _, wide_logits = features_and_logits(load_target(out / "target", tokenizer=False).module, ids)
    assert (wide_logits - logits).abs().max().item() <= TOLERANCE
    with torch.no_grad():
        hf_logits = AutoModelForCausalLM.from_pretrained(out / "target", dtype=torch.float32).eval()(ids).logits
    assert (hf_logits - logits).abs().max().item() <= TOLERANCE


def test_bf16_storage_halves_the_bytes_and_rounds_the_weights(tmp_path, hf_dirs, targets):
    """--dtype bf16: the tensors and config.json say bfloat16, the files are half the fp32 ones, and the logits
    are the source's up to bf16 rounding of the weights (exact ones need fp32)."""
    from safetensors import safe_open

    fp32 = widen_directory(hf_dirs["llama"], tmp_path / "fp32", Widening(96, 128, 3))
    bf16 = widen_directory(hf_dirs["llama"], tmp_path / "bf16", Widening(96, 128, 3, dtype="bf16"))
    with safe_open(str(bf16 / "target" / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} == {torch.bfloat16}
    assert json.loads((bf16 / "target" / "config.json").read_text())["dtype"] == "bfloat16"
    size = lambda out: (out / "target" / "model.safetensors").stat().st_size  # noqa: E731
    assert size(bf16) < 0.55 * size(fp32)
    ids = prompt(seed=21)
    _, logits = features_and_logits(targets["llama"].module, ids)
    _, wide_logits = features_and_logits(load_target(bf16 / "target", tokenizer=False).module, ids)
    assert 0 < (wide_logits - logits).abs().max().item() < 0.1
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        Widening(96, 128, 3, dtype="int4")
