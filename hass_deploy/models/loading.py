"""Hugging Face model directory -> `ModelConfig` + our `Transformer` with its weights.

The architecture table is data: a new Llama-family member is a row, not a file. Weights are read from
`model.safetensors` (single or sharded through its index) or, as a fallback, `pytorch_model*.bin`; the module
is built on the meta device and the tensors are assigned, so loading costs one read of the checkpoint.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hass_deploy.errors import ModelLoadError
from hass_deploy.models.gguf import resolve_target
from hass_deploy.models.target import ModelConfig, Rotary, Transformer

# torch's type for each precision a user names (`config.DTYPES`): the one table, read through `parse_dtype`.
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Architecture:
    """How one HF architecture maps onto `ModelConfig` fields (config.json key names or constants)."""

    qkv_bias: str | bool  # a config key to read, or a constant
    o_bias: str | bool
    qk_norm: bool
    sliding_window: bool  # honour `sliding_window` (Mistral); others must not ask for it


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture(qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=False, sliding_window=False),
    "MistralForCausalLM": Architecture(qkv_bias=False, o_bias=False, qk_norm=False, sliding_window=True),
    "Qwen2ForCausalLM": Architecture(qkv_bias=True, o_bias=False, qk_norm=False, sliding_window=False),
    "Qwen3ForCausalLM": Architecture(qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=True, sliding_window=False),
}


@dataclass(frozen=True)
class TargetModel:
    """A loaded target: its config, module, stop tokens and (optional) tokenizer."""

    path: Path
    config: ModelConfig
    module: Transformer
    eos_token_ids: tuple[int, ...]
    tokenizer: Any | None  # a transformers tokenizer, or None for a directory without one

    @property
    def embedding(self) -> torch.Tensor:
        return self.module.embed_tokens.weight

    @property
    def lm_head(self) -> torch.Tensor:
        return self.module.lm_head.weight


@dataclass(frozen=True)
class TargetHead:
    """The parts of a target that a draft trainer, or a runtime whose layers are exported graphs, needs: its config,
    embedding and lm_head (fp32), and optionally its stop tokens and tokenizer; not its layers."""

    path: Path
    config: ModelConfig
    embedding: torch.Tensor  # [V, H]
    lm_head: torch.Tensor  # [V, H]
    eos_token_ids: tuple[int, ...] = ()
    tokenizer: Any | None = None


def target_fingerprint(embedding: torch.Tensor | Transformer) -> str:
    """A short hash of the target's embedding table [V, H] (a strided sample, in fp32): the identity that draft
    heads and training data are checked against, cheap even for 100k-token vocabularies."""
    import hashlib

    if isinstance(embedding, Transformer):
        embedding = embedding.embed_tokens.weight

    stride = max(1, embedding.shape[0] // 4096)
    sample = embedding.detach()[::stride].float().contiguous().cpu()
    return hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16]


def parse_dtype(name: str) -> torch.dtype:
    """torch's dtype for a precision name (fp32, bf16, fp16)."""
    if name not in TORCH_DTYPES:
        raise ModelLoadError(f"unsupported dtype {name!r}; choose one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path.parent}: no {path.name} (not a Hugging Face model directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(data, dict):  # every file read here is an object; a list would fail later with a traceback
        raise ModelLoadError(f"{path}: malformed JSON (expected an object, got {type(data).__name__})")
    return data


def _flag(raw: dict, rule: str | bool) -> bool:
    return bool(raw.get(rule, False)) if isinstance(rule, str) else rule


def config_from_hf(raw: dict, source: str = "config.json") -> ModelConfig:
    """Normalise a raw HF `config.json` dict into a `ModelConfig`, refusing what we do not implement."""
    architectures = raw.get("architectures") or []
    name = architectures[0] if architectures else None
    if name not in ARCHITECTURES:
        raise ModelLoadError(
            f"{source}: unsupported architecture {name!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[name]
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (silu only)")
    if raw.get("use_sliding_window") and not arch.sliding_window:
        raise ModelLoadError(f"{source}: {name} with use_sliding_window is not supported")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        # a null, a string or a 0 here would otherwise surface as a transformers validation error or a ZeroDivisionError
        if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], int) or raw[key] < 1):
            raise ModelLoadError(f"{source}: {key} must be a positive integer, got {raw[key]!r}")
    hf = _hf_config(raw, source)
    try:
        heads = raw["num_attention_heads"]
        return ModelConfig(
            architecture=name,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rope_parameters=dict(hf.rope_parameters),
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            qkv_bias=_flag(raw, arch.qkv_bias),
            o_bias=_flag(raw, arch.o_bias),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=arch.qk_norm,
            sliding_window=raw.get("sliding_window") if arch.sliding_window else None,
        )
    except KeyError as err:
        raise ModelLoadError(f"{source}: missing key {err.args[0]!r}") from None
    except ValueError as err:
        raise ModelLoadError(f"{source}: {err}") from None


def _hf_config(raw: dict, source: str):
    """transformers' own config class normalises rope settings (rope_scaling -> rope_parameters) and defaults."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        fields = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "transformers_version")}
        return AutoConfig.for_model(raw.get("model_type", "llama"), **fields)
    except (ValueError, KeyError, TypeError, StrictDataclassError) as err:  # strict-dataclass type checks of a field
        raise ModelLoadError(f"{source}: {' '.join(str(err).split())}") from None


def read_state_dict(directory: Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory (all, or only `names`): safetensors (single or sharded) first, then
    pytorch_model*.bin. Selected safetensors tensors are read alone, so a trainer that needs only the embedding
    and lm_head of a 70B target does not read the 70B."""
    from safetensors import safe_open

    files: list[Path]
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ModelLoadError(f"{index}: malformed index (no \"weight_map\" object of tensor -> file)")
            files = [directory / f for f in sorted(set(weight_map.values()))]
            break
        if (directory / single).exists():
            files = [directory / single]
            break
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{directory}: no weights (model.safetensors or pytorch_model.bin)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt") as handle:
                    state.update({k: handle.get_tensor(k) for k in handle.keys() if names is None or k in names})
            else:
                # mmap needs the zip format; a legacy (pre-1.6) torch.save file is still a valid checkpoint
                state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file)))
        except FileNotFoundError:
            raise ModelLoadError(f"{directory}: weight shard {file.name} is missing") from None
        except pickle.UnpicklingError:  # torch's message is a multi-paragraph how-to for unsafe loading
            raise ModelLoadError(f"{file}: cannot read weights (it pickles Python objects other than tensors; "
                                 "only weights_only checkpoints are loaded)") from None
        except Exception as err:  # a truncated or foreign file: say which one, not a deep traceback
            raise ModelLoadError(f"{file}: cannot read weights ({type(err).__name__}: {err})") from None
    return state if names is None else {k: v for k, v in state.items() if k in names}


def _target_state(state: dict[str, torch.Tensor], config: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq"):  # old checkpoints saved the RoPE buffer; we recompute it
            continue
        out[key.removeprefix("model.")] = tensor.to(dtype)
    if config.tie_word_embeddings:
        out["lm_head.weight"] = out.get("embed_tokens.weight")
    return out


def build_target(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str = "cpu", source: str = "checkpoint") -> Transformer:
    """Construct on the meta device and assign the checkpoint's tensors (strict: every key, every shape)."""
    try:
        with torch.device("meta"):
            module = Transformer(config)
    except ValueError as err:  # e.g. a rope_type that Rotary does not implement
        raise ModelLoadError(f"{source}: {err}") from None
    tensors = _target_state(state, config, dtype)
    try:
        module.load_state_dict({k: v.to(device) for k, v in tensors.items() if v is not None}, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise ModelLoadError(f"{source}: weights do not match config.json ({first})") from None
    if config.tie_word_embeddings:
        module.lm_head.weight = module.embed_tokens.weight
    module.rotary = Rotary(config).to(device)  # buffers built on meta hold no values; RoPE stays fp32
    return module.eval()


def load_tokenizer(path: str | Path):
    """The target's tokenizer, or None when it ships none (token ids then come from --prompt-ids)."""
    directory = resolve_target(path)
    if not any((directory / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:
        raise ModelLoadError(f"{directory}: cannot load tokenizer ({type(err).__name__}: {err})") from None


def eos_ids(directory: Path, raw: dict) -> tuple[int, ...]:
    """Stop tokens: generation_config.json wins (Llama-3 lists <|eot_id|> there), then config.json."""
    ids: Any = None
    if (directory / "generation_config.json").exists():
        ids = read_json(directory / "generation_config.json").get("eos_token_id")
    if ids is None:
        ids = raw.get("eos_token_id")
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, list) else (int(ids),)


def load_target(path: str | Path, dtype: str = "fp32", device: str = "cpu", tokenizer: bool = True) -> TargetModel:
    """Load a local Hugging Face causal-LM directory, or a GGUF file (converted once: `gguf.resolve_target`), as a
    target model."""
    directory = resolve_target(path)
    raw = read_json(directory / "config.json")
    config = config_from_hf(raw, str(directory / "config.json"))
    module = build_target(config, read_state_dict(directory), parse_dtype(dtype), device, str(directory))
    return TargetModel(
        path=directory,
        config=config,
        module=module,
        eos_token_ids=eos_ids(directory, raw),
        tokenizer=load_tokenizer(directory) if tokenizer else None,
    )


def load_target_head(path: str | Path, tokenizer: bool = False) -> TargetHead:
    """Read only the embedding and lm_head of a target directory (and with `tokenizer`, its tokenizer)."""
    directory = resolve_target(path)
    raw = read_json(directory / "config.json")
    config = config_from_hf(raw, str(directory / "config.json"))
    names = {"model.embed_tokens.weight", "lm_head.weight"}
    state = {k.removeprefix("model."): v.float() for k, v in read_state_dict(directory, names).items()}
    if "embed_tokens.weight" not in state:
        raise ModelLoadError(f"{directory}: no model.embed_tokens.weight in the checkpoint")
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    if "lm_head.weight" not in state:
        raise ModelLoadError(f"{directory}: no lm_head.weight in the checkpoint (and embeddings are not tied)")
    return TargetHead(directory, config, state["embed_tokens.weight"], state["lm_head.weight"], eos_ids(directory, raw),
                      load_tokenizer(directory) if tokenizer else None)
