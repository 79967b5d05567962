"""GGUF files for the tests, written with the `gguf` package's own writer from a random transformers model, the way
llama.cpp's converter lays them out: its tensor names, Q and K rows permuted for its RoPE, the hyperparameters
under `<arch>.*`, and a GPT-2 style tokenizer (token list, types, merges) with a chat template."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np

from hass_deploy.demo import train_tokenizer

CHAT_TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"


def tokenizer_for(vocab_size: int):
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens, trained on the json package's sources."""
    sources = sorted(Path(inspect.getfile(json)).parent.glob("*.py"))
    tokenizer = train_tokenizer([p.read_text() for p in sources], vocab_size)
    assert len(tokenizer) == vocab_size
    return tokenizer


def _rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores Q and K with each head's two rotary halves interleaved (its RoPE pairs adjacent rows)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model, path: Path, tokenizer=None, architecture: str | None = None) -> Path:
    """Write `model` (a transformers Llama) as an F32 GGUF at `path`; `architecture` overrides the name written."""
    import gguf

    config = model.config
    arch = architecture or "llama"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_file_type(0)  # all F32
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    if tokenizer is not None:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda item: item[1])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t == tokenizer.eos_token else 1 for t in tokens])  # 3: control
        writer.add_token_merges([" ".join(pair) for pair in spec["model"]["merges"]])
        writer.add_bos_token_id(tokenizer.eos_token_id)
        writer.add_eos_token_id(tokenizer.eos_token_id)
        writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        weight = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            weight = _rope_permute(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = _rope_permute(weight, config.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
