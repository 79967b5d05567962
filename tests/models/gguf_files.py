"""GGUF files for the tests, written with the `gguf` package's own writer from a random transformers model, the way
llama.cpp's converter lays them out: its tensor names, Q and K rows permuted for its RoPE (before quantizing, as
llama.cpp does), the hyperparameters under `<arch>.*`, and a GPT-2 style tokenizer (token list, types, merges) with a
chat template. Tensors are F32 unless `types` names a quantization for them (gguf's own quantizer writes the
blocks: Q4_0, Q4_1, Q8_0, ...)."""

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


def write_gguf(model, path: Path, tokenizer=None, architecture: str | None = None,
               types: dict[str, str] | None = None, file_type: int = 0) -> Path:
    """Write `model` (a transformers Llama) as a GGUF at `path`: each tensor F32, or the type `types` gives its GGUF
    name (e.g. {"blk.0.attn_q.weight": "Q4_0"}); `file_type` is the header's general.file_type (0: all F32, 2: mostly
    Q4_0, 3: mostly Q4_1); `architecture` overrides the name written."""
    import gguf

    config = model.config
    arch = architecture or "llama"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_file_type(file_type)
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
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings: its output reads token_embd
        weight = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            weight = _rope_permute(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = _rope_permute(weight, config.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        kind = gguf.GGMLQuantizationType[(types or {}).get(gguf_name, "F32")]
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, weight)
        else:  # the blocks' bytes [rows, bytes per row]; the writer takes the element shape from them and the type
            writer.add_tensor(gguf_name, gguf.quants.quantize(weight, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def q4_types(layers: int) -> dict[str, str]:
    """Tensor types for a GGUF with everything an int4 export meets: Q4_0 layers and Q4_1 layers, a Q4_1 K beside Q4_0
    Q and V (one q|k|v product with both kinds of block), a Q8_0 token embedding (the lm_head when tied), a Q4_1
    output.weight (when not), and one F16 weight (a type MatMulNBits cannot take as it is)."""
    types = {"token_embd.weight": "Q8_0", "output.weight": "Q4_1"}
    for i in range(layers):
        for tensor in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            types[f"blk.{i}.{tensor}.weight"] = ("Q4_0", "Q4_1")[i % 2]
    types["blk.0.attn_k.weight"] = "Q4_1"
    types[f"blk.{layers - 1}.ffn_down.weight"] = "F16"
    return types
