"""A GGUF's own quantized blocks of a target's linear weights: read from the file as llama.cpp runs them, Q/K rows
un-permuted, under our module names (`--target-quantization int4`, `export/fused.py`).

Q4_0, Q4_1 and Q8_0 store a weight [N, K] row by row (one row per output), each row as blocks of 32 consecutive
inputs, each block an fp16 scale d (Q4_1: and an fp16 min m) and 32 small integers q:

    Q4_0: w = d * (q - 8), q in 0..15      Q4_1: w = d * q + m, q in 0..15      Q8_0: w = d * q, q in -128..127

`Blocks` holds any of them in one form, w = scale * (code - zero) + min, the form ONNX Runtime's MatMulNBits
computes (the min, for which MatMulNBits has no input, is a second product in the graph). Every value is the file's:
the fp16 numbers widened to fp32 and the integers as stored, so `dequantize` gives back, bit for bit, what the `gguf`
package (and so transformers' GGUF loader, and so the converted directory) computes from the same blocks.
Other tensor types (F32, F16, BF16, Q5_*, the K-quants) are not read here; their weights stay the converted fp32.
No torch here: numpy and the `gguf` package only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hass_deploy.errors import ModelLoadError

BLOCK = 32  # inputs per block, in all three types
# GGUF type name -> (bytes per block, bytes before the codes: d, or d and m, each fp16)
LAYOUTS = {"Q4_0": (18, 2), "Q4_1": (20, 4), "Q8_0": (34, 2)}
# A layer's GGUF tensor -> our module in that layer (llama.cpp's names, as `gguf.get_tensor_name_map` gives them).
LAYER_TENSORS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
# Architectures whose Q and K rows llama.cpp's converter permuted for its RoPE: transformers' GGUF loader undoes it for
# these only (its TENSOR_PROCESSORS), and the converted weights are what the blocks must match.
PERMUTED_QK = ("llama",)
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


@dataclass(frozen=True, eq=False)
class Blocks:
    """One weight [N, K] as blocks of BLOCK inputs: w[n, k] = scale[n, b] * (code[n, k] - zero[n, b]) + min[n, b],
    b = k // BLOCK."""

    kind: str  # what the blocks are: a GGUF type ("Q4_0", "Q4_1", "Q8_0", or "Q4_0+Q4_1" once joined), or "int8"
    bits: int  # code width: 4 or 8
    codes: np.ndarray  # [N, K / BLOCK, BLOCK] uint8, in input order
    scales: np.ndarray  # [N, K / BLOCK] float32
    zeros: np.ndarray  # [N, K / BLOCK] uint8: the code that stands for 0 (Q4_0: 8, Q4_1: 0, Q8_0: 128)
    mins: np.ndarray | None  # [N, K / BLOCK] float32, added after scaling (Q4_1's m); None: no min
    in_features: int  # K (a last block past K is padding: only blocks quantised here, never a GGUF's)


def dequantize(blocks: Blocks) -> np.ndarray:
    """The fp32 weight [N, K], computed as the `gguf` package computes it (one product, then the min)."""
    codes = blocks.codes.astype(np.float32) - blocks.zeros[..., None].astype(np.float32)  # small integers: exact
    weight = blocks.scales[..., None] * codes
    if blocks.mins is not None:
        weight = weight + blocks.mins[..., None]
    return weight.reshape(len(weight), -1)[:, :blocks.in_features]


def concat(parts: list[Blocks]) -> Blocks:
    """Weights stacked along N (q|k|v, gate|up: one product in the fused graph), or ValueError when their codes
    differ in width or their inputs in number."""
    if len({p.bits for p in parts}) != 1 or len({p.in_features for p in parts}) != 1:
        raise ValueError("blocks of different widths or input sizes do not stack")
    if len(parts) == 1:
        return parts[0]
    mins = None
    if any(p.mins is not None for p in parts):  # a Q4_0 part beside a Q4_1 one: its min is 0
        mins = np.concatenate([p.mins if p.mins is not None else np.zeros_like(p.scales) for p in parts])
    kinds = "+".join(sorted({k for p in parts for k in p.kind.split("+")}))
    return Blocks(kinds, parts[0].bits, np.concatenate([p.codes for p in parts]),
                  np.concatenate([p.scales for p in parts]), np.concatenate([p.zeros for p in parts]), mins,
                  parts[0].in_features)


def from_raw(raw: np.ndarray, kind: str) -> Blocks:
    """Blocks from a GGUF tensor's bytes [N, K / BLOCK * bytes per block] of type `kind` (a key of LAYOUTS)."""
    size, header = LAYOUTS[kind]
    grouped = raw.reshape(len(raw), -1, size)  # [N, K / BLOCK, bytes per block]
    scales = np.ascontiguousarray(grouped[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    data = grouped[..., header:]
    mins = None
    if kind == "Q8_0":
        # int8 q -> uint8 code q + 128, the zero point MatMulNBits assumes for 8 bits
        codes = (data.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        zero = 128
    else:
        # byte j of a block holds input j in its low nibble and input j + 16 in its high one (ggml's layout)
        codes = np.concatenate([data & 0x0F, data >> 4], axis=-1)
        zero = 8 if kind == "Q4_0" else 0
        if kind == "Q4_1":
            mins = np.ascontiguousarray(grouped[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
    zeros = np.full(scales.shape, zero, dtype=np.uint8)
    return Blocks(kind, 8 if kind == "Q8_0" else 4, codes, scales, zeros, mins, codes.shape[1] * BLOCK)


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation on rows [N, ...] (whole rows move: the blocks run along the inputs)."""
    half = len(rows) // heads // 2
    return rows.reshape(heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def our_name(gguf_name: str) -> str | None:
    """Our state-dict name for a GGUF linear weight (None for the embedding, norms and anything else)."""
    if gguf_name == "output.weight":
        return "lm_head.weight"
    match = _LAYER.fullmatch(gguf_name)
    if match is None or match.group(2) not in LAYER_TENSORS:
        return None
    return f"layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}.weight"


def read_blocks(path: str | Path, num_heads: int, num_kv_heads: int) -> dict[str, Blocks]:
    """Our state-dict name -> Blocks, for each linear weight the file holds as Q4_0, Q4_1 or Q8_0. A file without an
    `output.weight` (tied embeddings) gives lm_head the token embedding's blocks, as llama.cpp runs its output."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    architecture = reader.fields["general.architecture"].contents()
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    wanted = {name: our_name(name) for name in tensors}
    if "output.weight" not in tensors and "token_embd.weight" in tensors:
        wanted["token_embd.weight"] = "lm_head.weight"
    blocks = {}
    for name, ours in wanted.items():
        tensor = tensors[name]
        if ours is None or tensor.tensor_type.name not in LAYOUTS:
            continue
        raw = np.asarray(tensor.data)  # [N, K / BLOCK * bytes per block] uint8, mapped from the file
        if architecture in PERMUTED_QK and ".attn_q." in name:
            raw = unpermute_rows(raw, num_heads)
        elif architecture in PERMUTED_QK and ".attn_k." in name:
            raw = unpermute_rows(raw, num_kv_heads)
        blocks[ours] = from_raw(raw, tensor.tensor_type.name)
    return blocks


def check_matches(blocks: Mapping[str, Blocks], weights: Mapping[str, np.ndarray], source: str | Path) -> None:
    """Each set of blocks dequantizes bit for bit to the target's weight of the same name (the converted fp32), or
    one line naming the first that does not: the graph is then certain to compute the target's own weights."""
    for name, block in blocks.items():
        weight = weights.get(name)
        if weight is None or weight.shape != (len(block.codes), block.in_features):
            raise ModelLoadError(f"{source}: the GGUF's {block.kind} tensor for {name} has no weight of its shape in "
                                 "the target")
        if not np.array_equal(dequantize(block), weight):
            raise ModelLoadError(f"{source}: the GGUF's {block.kind} blocks for {name} do not dequantize to the "
                                 "target's weights (was the target converted from this file?)")
