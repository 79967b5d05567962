"""The ONNX Runtime variant of the step graphs: the same step contract, built from ORT's fused operators.

The standard graphs (`onnx.py`, `steps.py`) are the reference and the TensorRT source: about 340 standard
operators per target step. On a few CPU cores ONNX Runtime pays a thread-pool dispatch for each of them, which
for a small model costs more than the arithmetic of a T = 1 step (docs/RESULTS.md, History, 2026-11-28, fused
ORT graphs). These graphs are for the ONNX Runtime backend only and are written node by node from our own
modules' weights:

    per layer: RMSNormalization -> MatMul(q|k|v) -> GroupQueryAttention (RoPE, causal + tree bias,
               KV rows written in place) -> MatMul(o) -> SkipSimplifiedLayerNorm (residual add + norm)
               -> MatMul(gate|up) -> Split -> QuickGelu * up -> MatMul(down) -> the next layer's Skip norm

About 11 operators per layer instead of about 40. Attention reads only the `cache_len + T` rows in use
(GroupQueryAttention's `seqlens_k`), whatever the buffer's length, so the KV buffers are bound at full length
and never re-laid out, and the step's new K/V rows are written into them by the operator itself (the
`present_*` outputs alias the `past_*` inputs: ORT's shared-buffer mode). Weights may be int8 (`MatMulNBits`,
blockwise, 8 bits): weight-only quantisation as CPU users run it (`--target-quantization int8`); or a GGUF target's
own blocks (`--target-quantization int4`, `models/gguf_blocks.py`): its Q4_0 / Q4_1 weights as 4-bit `MatMulNBits`
and its Q8_0 ones (a tied lm_head: the token embedding) as 8-bit, the codes and scales as the file stores them.
Q4_1's min m (w = d * q + m) has no MatMulNBits input: it is added as a second product, m against the activations'
sums over each block of 32, as llama.cpp's q4_1 dot product adds it. Weights of any other type in the file stay fp32
MatMuls of the converted weights, the file's values unchanged.

    target: input_ids [1, T], position_ids [1, T], cache_len [1], tree_mask [1, T, T], logits_index [R],
            past_key_i / past_value_i [1, H_kv, S_max, D]
         -> logits [1, R, V], hidden [1, T, H], present_key_i / present_value_i (the same buffers, rows written)
    draft:  features [1, T, H], input_ids, position_ids, cache_len, tree_mask [1, T, M], past_key_0 / past_value_0
         -> hidden [1, T, H], top_logprobs [1, T, K], top_tokens [1, T, K], present_key_0 / present_value_0

A batched variant (`slots` = N, for serving's batched steps) takes N sequences' rows at once: input_ids and
position_ids [1, rows] (every sequence's, in order), slot_rows [N] (how many each has), and per sequence s its own
cache_len_s{s}, tree_mask_s{s} and KV buffers past_key_i_s{s} / past_value_i_s{s}; hidden (and the draft's top-k) are
over all the rows, logits over logits_index's. See `_Step` for why each row is what its own step gives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from hass_deploy.errors import ConfigError
from hass_deploy.models.draft import DraftHead
from hass_deploy.models.gguf_blocks import Blocks, concat
from hass_deploy.models.target import DecoderLayer, ModelConfig, Rotary, Transformer

OPSET = 23  # RMSNormalization (standard since 23); ORT 1.32 runs it
MS = "com.microsoft"
WEIGHTS_PROP = "hass_deploy.linear_weights"  # the graph's metadata: how many linear weights of each kind
QUANTIZATIONS = ("int8", "int4")  # int4: the GGUF's own blocks (`_Graph.blocks`)
BLOCK_SIZE = 32  # blocks along the input dimension, as llama.cpp's q8_0 / q4_0 / q4_1: one scale per 32 weights
# MatMulNBits accuracy level 4: activations are quantised to int8 per block too, so the inner product runs on
# int8 dot-product instructions (VNNI), as llama.cpp's q8_0 / q4_0 / q4_1 dot products quantise them to q8 blocks.
# The result is still a deterministic function of the quantised weights, which is what losslessness is measured
# against; but the activation rounding amplifies the attention's own rounding, so such a target verifies chains only
# (`TargetBackend.tree_rows_exact`).
ACCURACY_LEVEL = 4


def unsupported_reason(config: ModelConfig) -> str | None:
    """Why a target cannot have fused graphs (None if it can).

    The conditions are ONNX Runtime's own, from `group_query_attention_helper.h` (CheckInputs), for the way these
    graphs call GroupQueryAttention: packed q|k|v, RoPE inside the operator (`do_rotary`) over the whole head, cos/sin
    caches of [positions, D/2] covering S_max. ORT checks them only when a step runs, so a graph that breaks one
    would export cleanly and then fail on every prompt.
    """
    if config.rope_parameters.get("rope_type", "default") == "dynamic":
        return "dynamic NTK RoPE changes its frequencies with the context length"
    if config.num_heads % config.num_kv_heads:
        return (f"GroupQueryAttention needs num_heads ({config.num_heads}) to be a multiple of num_kv_heads "
                f"({config.num_kv_heads})")
    # "head_size shall be a multiple of 16" once cos/sin caches are given (the packed-q|k|v check asks for 8), and
    # the caches' D/2 columns must be a multiple of 8 and at most (D / 16) * 8: all three come to D % 16 == 0.
    if config.head_dim % 16:
        return (f"GroupQueryAttention with rotary embeddings needs a head dimension that is a multiple of 16, "
                f"not {config.head_dim}")
    return None


@dataclass
class _Graph:
    """Nodes and initializers of one graph, with unique names."""

    quantization: str | None
    blocks: Mapping[nn.Module, Blocks] = field(default_factory=dict)  # int4: a linear layer -> the GGUF's blocks
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    weights: Counter = field(default_factory=Counter)  # what each linear layer became: "Q4_1", "int8", "fp32", ...
    count: int = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, outputs: int | list[str] = 1,
           domain: str = "", **attrs):
        """Add a node with `outputs` new outputs (a count) or the named ones (a list); returns the output's name, or
        the list of names when there are several."""
        from onnx import helper

        names = outputs if isinstance(outputs, list) else [self.name(hint or op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self.name("n_" + op_type), domain=domain,
                                           **attrs))
        return names[0] if len(names) == 1 else names

    def scalar(self, hint: str, value, dtype) -> str:
        return self.const(hint, np.array(value, dtype=dtype))

    def linear(self, x: str, layers: list[nn.Linear], hint: str, out: str | None = None) -> str:
        """x [.., in] through the linear layers side by side (one MatMul whose output is their concatenation);
        `out` names the result (a graph output)."""
        biases = [layer.bias for layer in layers]
        has_bias = any(b is not None for b in biases)
        named = [out] if out is not None and not has_bias else 1
        parts = self._file_blocks(layers)
        if parts is not None:
            kinds = [p.kind for p in parts]
            y = self._nbits_matmul(x, concat(parts), hint, named)
        else:
            weight = torch.cat([layer.weight.detach() for layer in layers]).float().numpy()  # [N, K]
            if self.quantization == "int8":
                kinds = ["int8"] * len(layers)
                y = self._nbits_matmul(x, quantize_int8(weight), hint, named)
            else:
                kinds = ["fp32"] * len(layers)
                y = self.op("MatMul", [x, self.const(hint + "_w", weight.T)], hint, outputs=named)
        self.weights.update(kinds)
        if has_bias:
            bias = torch.cat([b.detach() if b is not None else torch.zeros(layer.out_features)
                              for b, layer in zip(biases, layers)]).float().numpy()
            y = self.op("Add", [y, self.const(hint + "_b", bias)], hint, outputs=[out] if out is not None else 1)
        return y

    def _file_blocks(self, layers: list[nn.Linear]) -> list[Blocks] | None:
        """int4: the GGUF's blocks of each layer, or None when one has none (its type is not one MatMulNBits holds as
        it is) or their widths differ; the product is then an fp32 MatMul of the file's dequantized values."""
        if self.quantization != "int4":
            return None
        parts = [self.blocks.get(layer) for layer in layers]
        if any(p is None for p in parts) or len({p.bits for p in parts}) != 1:
            return None
        return parts

    def _nbits_matmul(self, x: str, blocks: Blocks, hint: str, outputs) -> str:
        """x [1, T, K] @ w^T with w = scale * (code - zero) + min, blockwise (`Blocks`): MatMulNBits, then the min."""
        n, count, size = blocks.codes.shape
        codes = blocks.codes
        if blocks.bits == 4:  # two codes a byte, the earlier input in the low nibble: [N, K / 32, 16]
            codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        inputs = [x, self.const(hint + "_q", codes), self.const(hint + "_s", blocks.scales)]
        if (blocks.zeros != 1 << (blocks.bits - 1)).any():  # MatMulNBits' default zero point is 2^(bits - 1)
            zeros = blocks.zeros
            if blocks.bits == 4:  # [N, ceil(K / 64)]: two a byte, low nibble first
                zeros = np.pad(zeros, ((0, 0), (0, count % 2)))
                zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
            inputs.append(self.const(hint + "_z", zeros))
        y = self.op("MatMulNBits", inputs, hint, outputs=outputs if blocks.mins is None else 1, domain=MS,
                    K=blocks.in_features, N=n, bits=blocks.bits, block_size=size, accuracy_level=ACCURACY_LEVEL)
        if blocks.mins is None:
            return y
        # sum_k x_k * m[n, k // 32] = (x's sums over each block [1, T, K / 32]) @ m^T [K / 32, N]. MatMulNBits' own
        # float zero points would give w = scale * (q - zp) with zp = -m / d: not m's value in fp32, and ORT 1.32's
        # CPU kernel then dequantizes the whole weight on every call (docs/ONNX.md).
        grouped = self.op("Reshape", [x, self.const("block_shape", np.array([0, 0, count, size], dtype=np.int64))])
        sums = self.op("ReduceSum", [grouped, self.scalar("axis", [-1], np.int64)], hint + "_sums", keepdims=0)
        mins = self.op("MatMul", [sums, self.const(hint + "_m", blocks.mins.T)], hint + "_min")  # [1, T, N]
        return self.op("Add", [y, mins], hint, outputs=outputs)


def quantize_int8(weight: np.ndarray) -> Blocks:
    """Symmetric int8 blocks of an fp32 weight [N, K]: w ~ scale * (q - 128), q uint8, one scale per BLOCK_SIZE
    inputs (the last block zero-padded)."""
    n, k = weight.shape
    count = -(-k // BLOCK_SIZE)
    padded = np.zeros((n, count * BLOCK_SIZE), dtype=np.float32)
    padded[:, :k] = weight
    grouped = padded.reshape(n, count, BLOCK_SIZE)
    scales = np.abs(grouped).max(axis=-1) / 127.0  # [N, blocks]
    scales = np.where(scales == 0, 1.0, scales).astype(np.float32)  # an all-zero block: any scale is exact
    codes = (np.clip(np.rint(grouped / scales[..., None]), -127, 127) + 128).astype(np.uint8)
    return Blocks("int8", 8, codes, scales, np.full(scales.shape, 128, dtype=np.uint8), None, k)


def _rope_tables(rotary: Rotary, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, D/2] for GroupQueryAttention, from the same frequencies and scaling as `Rotary`."""
    cos, sin = rotary(torch.arange(positions)[None], torch.float32)  # [1, P, D], the two halves equal
    half = cos.shape[-1] // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


@dataclass(frozen=True)
class _Sequence:
    """One sequence's attention inputs in a step graph, built once per step and read by every layer."""

    suffix: str  # its cache_len, tree_mask and KV names end with it: "" in a one-sequence graph, "_s{i}" in a batch
    positions: str  # its position_ids [1, T]
    seqlens: str  # cache_len + T - 1, int32 [1] (GroupQueryAttention's seqlens_k)
    total: str  # cache_len + T, int32 scalar
    bias: str  # attention_bias [1, 1, T, cache_len + T]


class _Step:
    """What the target and draft graphs share: the attention inputs every layer reads, built once per step.

    A batched graph (`slots` sequences, each over KV buffers of its own) takes every sequence's rows in one
    input_ids / position_ids [1, R] with `slot_rows` [N] saying how many rows each has: the weight products run over
    all R rows at once, and each layer's attention splits the rows and runs one GroupQueryAttention per sequence over
    its own buffers, its keys where that sequence's own step has them. A row's arithmetic is then what it is in a
    one-sequence step of the same rows: the products' rows do not depend on the rows beside them (from two rows on,
    `OrtTarget`), and attention is the same call on the same inputs.
    """

    def __init__(self, g: _Graph, config: ModelConfig, rotary: Rotary, max_positions: int, slots: int | None = None):
        self.g, self.config = g, config
        cos, sin = _rope_tables(rotary, max_positions)
        self.cos, self.sin = g.const("cos_cache", cos), g.const("sin_cache", sin)
        if slots is None:
            self.sequences = [self._sequence("", "position_ids")]
        else:
            positions = g.op("Split", ["position_ids", "slot_rows"], "slot_positions", outputs=slots, axis=1)
            self.sequences = [self._sequence(f"_s{i}", p) for i, p in enumerate(positions)]

    def _sequence(self, suffix: str, positions: str) -> _Sequence:
        # total = cache_len + T rows after the step; GroupQueryAttention takes total - 1 (int32 [1]) and total.
        g = self.g
        steps = g.op("Shape", [f"tree_mask{suffix}"], "steps", start=1, end=2)  # [1]: T
        total = g.op("Add", [f"cache_len{suffix}", steps], "total")  # [1]
        seqlens = g.op("Cast", [g.op("Sub", [total, g.scalar("one", [1], np.int64)])], "seqlens_k", to=6)
        total_len = g.op("Cast", [g.op("Squeeze", [total])], "total_len", to=6)
        return _Sequence(suffix, positions, seqlens, total_len, self._bias(steps, total, f"tree_mask{suffix}",
                                                                           positions))

    def _bias(self, steps: str, total: str, tree_mask: str, positions: str) -> str:
        """attention_bias [1, 1, T, total]: 0 where a row may attend, -inf elsewhere (`step_attention_mask`).

        Columns before the tree mask's M columns are committed context; the last M columns (ending at `total`)
        follow `tree_mask`. GroupQueryAttention's own causal mask is implied by every tree mask (ancestors precede
        their descendants), so adding the bias to it gives exactly the tree mask.
        """
        g, int64 = self.g, np.int64
        # Every operator here runs once per step on tiny tensors: few of them, since each costs a dispatch.
        width = g.op("Shape", [tree_mask], "width", start=2, end=3)  # [1]: M
        context = g.op("Sub", [total, width], "context")  # [1]: total - M
        shape = g.op("Concat", [g.scalar("ones", [1, 1], int64), steps, context], axis=0)  # [1, 1, T, total - M]
        past = g.op("ConstantOfShape", [shape], "past_bias",
                    value=_tensor_attr(np.zeros(1, dtype=np.float32)))  # [1, 1, T, total - M]
        tree = g.op("Where", [g.op("Unsqueeze", [tree_mask, g.scalar("axis", [1], int64)]),
                              g.scalar("zero", 0.0, np.float32), g.scalar("neg_inf", -np.inf, np.float32)])
        bias = g.op("Concat", [past, tree], "attention_bias", axis=3)  # [1, 1, T, total]
        window = self.config.sliding_window
        if window is not None:
            # Mistral: row at position p sees columns c with p - c < window (`columns_attention_mask`).
            cols = g.op("Range", [g.scalar("zero", 0, int64), g.op("Squeeze", [total]), g.scalar("one", 1, int64)])
            distance = g.op("Sub", [g.op("Unsqueeze", [positions, g.scalar("axis", [2], int64)]), cols])
            inside = g.op("Less", [distance, g.scalar("window", window, int64)])  # [1, T, total]
            bias = g.op("Where", [g.op("Unsqueeze", [inside, g.scalar("axis", [1], int64)]), bias,
                                  g.scalar("neg_inf", -np.inf, np.float32)])
        return bias

    def attention(self, x: str, layer: DecoderLayer, index: int) -> str:
        """Normalised x [1, T, H] -> the attention block's output (o_proj applied) [1, T, H]; writes the layer's
        K/V rows at cache_len.. of its buffers (each sequence's into its own)."""
        g, attn, c = self.g, layer.self_attn, self.config
        qkv = g.linear(x, [attn.q_proj, attn.k_proj, attn.v_proj], f"l{index}_qkv")  # [1, T, (nH + 2 nKV) D]
        tensors = [qkv]  # packed
        if c.qk_norm:
            # Qwen3's per-head RMSNorm before RoPE. GroupQueryAttention's own q/k-norm inputs are CUDA/WebGPU only
            # in ORT 1.32 ("not supported" on CPU), so the norms run here on [1, T, heads, D] views.
            sizes = g.const("qkv_sizes", np.array([c.num_heads, c.num_kv_heads, c.num_kv_heads]) * c.head_dim)
            q, k, v = g.op("Split", [qkv, sizes], f"l{index}_qkv_split", outputs=3, axis=-1)
            tensors = [self._head_norm(q, attn.q_norm, c.num_heads, f"l{index}_q_norm"),
                       self._head_norm(k, attn.k_norm, c.num_kv_heads, f"l{index}_k_norm"), v]
        if len(self.sequences) == 1:
            rows = [tensors]
        else:  # each sequence's rows of q|k|v (or of q, k and v): [1, T_i, ...]
            pieces = [g.op("Split", [t, "slot_rows"], f"l{index}_slot_rows", outputs=len(self.sequences), axis=1)
                      for t in tensors]
            rows = [list(mine) for mine in zip(*pieces)]
        attrs = dict(num_heads=c.num_heads, kv_num_heads=c.num_kv_heads, do_rotary=1, rotary_interleaved=0)
        outs = []
        for seq, q_k_v in zip(self.sequences, rows):
            q_k_v = q_k_v if len(q_k_v) == 3 else [*q_k_v, "", ""]
            inputs = [*q_k_v, f"past_key_{index}{seq.suffix}", f"past_value_{index}{seq.suffix}", seq.seqlens,
                      seq.total, self.cos, self.sin, seq.positions, seq.bias]
            outs.append(g.op("GroupQueryAttention", inputs, domain=MS, **attrs,
                             outputs=[g.name(f"l{index}_attn"), f"present_key_{index}{seq.suffix}",
                                      f"present_value_{index}{seq.suffix}"])[0])
        out = outs[0] if len(outs) == 1 else g.op("Concat", outs, f"l{index}_attn", axis=1)  # [1, T, nH D]
        return g.linear(out, [attn.o_proj], f"l{index}_o")

    def _head_norm(self, x: str, norm_module, heads: int, hint: str) -> str:
        """RMSNorm over each head of x [1, T, heads * D]."""
        g, dim = self.g, self.config.head_dim
        split = g.op("Reshape", [x, g.const("heads_shape", np.array([0, 0, heads, dim], dtype=np.int64))])
        return g.op("Reshape", [self.norm(split, norm_module, hint),
                                g.const("flat_shape", np.array([0, 0, heads * dim], dtype=np.int64))])

    def mlp(self, x: str, layer: DecoderLayer, index: int) -> str:
        g, mlp = self.g, layer.mlp
        both = g.linear(x, [mlp.gate_proj, mlp.up_proj], f"l{index}_gate_up")  # [1, T, 2I]
        gate, up = g.op("Split", [both], f"l{index}_split", outputs=2, axis=-1, num_outputs=2)
        act = g.op("QuickGelu", [gate], domain=MS, alpha=1.0)  # x * sigmoid(x) = SiLU
        return g.linear(g.op("Mul", [act, up]), [mlp.down_proj], f"l{index}_down")

    def norm(self, x: str, norm_module, hint: str) -> str:
        return self.g.op("RMSNormalization", [x, self._gamma(norm_module, hint)], hint, axis=-1,
                         epsilon=float(norm_module.eps), stash_type=1)

    def skip_norm(self, x: str, skip: str, norm_module, hint: str, out: str | None = None) -> tuple[str, str]:
        """(norm(x + skip), x + skip) in one operator; `out` names the first (a graph output)."""
        g = self.g
        normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", [x, skip, self._gamma(norm_module, hint)],
                                   outputs=[out or g.name(hint), "", "", g.name(hint + "_sum")], domain=MS,
                                   epsilon=float(norm_module.eps))
        return normed, total

    def _gamma(self, norm_module, hint: str) -> str:
        return self.g.const(hint + "_gamma", norm_module.weight.detach().float().numpy())


def _tensor_attr(array: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(array)


def _suffixes(slots: int | None) -> list[str]:
    return [""] if slots is None else [f"_s{i}" for i in range(slots)]


def _kv_io(config: ModelConfig, layers: int, slots: int | None):
    from onnx import TensorProto, helper

    inputs, outputs = [], []
    for suffix in _suffixes(slots):
        for layer in range(layers):
            for kind in ("key", "value"):
                shape = [1, config.num_kv_heads, f"S{suffix}", config.head_dim]
                inputs.append(helper.make_tensor_value_info(f"past_{kind}_{layer}{suffix}", TensorProto.FLOAT, shape))
                outputs.append(helper.make_tensor_value_info(f"present_{kind}_{layer}{suffix}", TensorProto.FLOAT,
                                                             shape))
    return inputs, outputs


def _common_inputs(width: str, slots: int | None):
    """input_ids and position_ids [1, T] (a batch: every sequence's rows, [1, R], and slot_rows [N]), then each
    sequence's cache_len [1] and tree_mask [1, T, width]."""
    from onnx import TensorProto, helper

    rows = "T" if slots is None else "rows"
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, rows]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, rows])]
    if slots is not None:
        inputs.append(helper.make_tensor_value_info("slot_rows", TensorProto.INT64, [slots]))
    for suffix in _suffixes(slots):
        steps = f"T{suffix}"
        inputs += [helper.make_tensor_value_info(f"cache_len{suffix}", TensorProto.INT64, [1]),
                   helper.make_tensor_value_info(f"tree_mask{suffix}", TensorProto.BOOL,
                                                 [1, steps, steps if width == "T" else f"{width}{suffix}"])]
    return inputs


def _model(g: _Graph, name: str, inputs: list, outputs: list):
    from onnx import helper

    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="hass-deploy")
    # What the linear layers' weights are, e.g. "210 Q4_1, 1 Q8_0", recorded in the graph for whoever reads it later.
    helper.set_model_props(model, {WEIGHTS_PROP: weight_summary(g.weights)})
    return model


def weight_summary(kinds: Counter) -> str:
    return ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())


def _check(config: ModelConfig, quantization: str | None, slots: int | None = None) -> None:
    if slots is not None and slots < 2:
        raise ConfigError(f"a batched step graph takes at least 2 sequences, got {slots}")
    reason = unsupported_reason(config)
    if reason is not None:
        raise ConfigError(f"no fused ONNX Runtime graphs for this model: {reason}; export with --no-ort-graphs")
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")


@torch.no_grad()
def target_graph(model: Transformer, max_positions: int, quantization: str | None = None,
                 blocks: Mapping[str, Blocks] | None = None, slots: int | None = None):
    """The target step as an ONNX Runtime graph (onnx.ModelProto); fp32 activations and KV. int4 takes `blocks`,
    the GGUF's own weights under our state-dict names (`gguf_blocks.read_blocks`). `slots`: a batched step of that
    many sequences (`_Step`), logits_index and hidden over all their rows."""
    from onnx import TensorProto, helper

    config = model.config
    _check(config, quantization, slots)
    if quantization == "int4" and not blocks:
        raise ConfigError("an int4 target graph is made from a GGUF's own 4-bit blocks: none were given")
    by_module = {module: blocks[name + ".weight"] for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and name + ".weight" in (blocks or {})}
    g = _Graph(quantization, by_module)
    step = _Step(g, config, model.rotary, max_positions, slots)
    residual = g.op("Gather", [g.const("embed_tokens", model.embed_tokens.weight.detach().float().numpy()),
                               "input_ids"], "embed", axis=0)  # [1, T, H]
    x = step.norm(residual, model.layers[0].input_layernorm, "l0_in_norm")
    for i, layer in enumerate(model.layers):
        attended = step.attention(x, layer, i)
        x, residual = step.skip_norm(attended, residual, layer.post_attention_layernorm, f"l{i}_post_norm")
        down = step.mlp(x, layer, i)
        last = i + 1 == len(model.layers)
        next_norm = model.norm if last else model.layers[i + 1].input_layernorm
        # The last one is the final norm: its output is the graph's `hidden` [1, T, H] (post-final-norm).
        x, residual = step.skip_norm(down, residual, next_norm, f"l{i + 1}_in_norm", "hidden" if last else None)
    rows = g.op("Gather", ["hidden", "logits_index"], "rows", axis=1)  # [1, R, H]
    g.linear(rows, [model.lm_head], "lm_head", out="logits")
    kv_in, kv_out = _kv_io(config, config.num_layers, slots)
    rows = "T" if slots is None else "rows"
    inputs = [*_common_inputs("T", slots), helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["R"]),
              *kv_in]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "R", config.vocab_size]),
               helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, rows, config.hidden_size]), *kv_out]
    return _model(g, "target_step_ort" if slots is None else "target_batch_ort", inputs, outputs)


@torch.no_grad()
def draft_graph(head: DraftHead, lm_head: nn.Linear, top_k: int, max_positions: int,
                quantization: str | None = None, slots: int | None = None):
    """The draft step (head + the target's lm_head + top-k of log-probabilities) as an ONNX Runtime graph. A reduced
    draft vocabulary holds its N rows of the head and gathers the top-k's target ids from its token map. `slots`:
    a batched step of that many sequences (`_Step`)."""
    from onnx import TensorProto, helper

    config = head.config
    _check(config, quantization, slots)
    g = _Graph(quantization)
    step = _Step(g, config, head.rotary, max_positions, slots)
    embedded = g.op("Gather", [g.const("embed_tokens", head.embed_tokens.weight.detach().float().numpy()),
                               "input_ids"], "embed", axis=0)  # [1, T, H]
    fused = g.linear(g.op("Concat", [embedded, "features"], axis=-1), [head.fc], "fc")  # embedding first (EAGLE)
    layer = head.layers[0]
    attended = step.attention(fused, layer, 0)  # the draft's layer has no input norm
    x, residual = step.skip_norm(attended, fused, layer.post_attention_layernorm, "post_norm")
    g.op("Add", [step.mlp(x, layer, 0), residual], outputs=["hidden"])  # [1, T, H], no final norm
    logits = g.linear("hidden", [head.scoring_head(lm_head)], "lm_head")  # [1, T, V or N]
    logprobs = g.op("LogSoftmax", [logits], axis=-1)
    vocabulary = head.vocabulary()
    ranked = "top_tokens" if vocabulary is None else g.name("top_rows")
    g.op("TopK", [logprobs, g.scalar("k", [top_k], np.int64)], outputs=["top_logprobs", ranked], axis=-1,
         largest=1, sorted=1)
    if vocabulary is not None:  # rows of the reduced head -> target ids
        g.op("Gather", [g.const("vocabulary", vocabulary.cpu().numpy()), ranked], outputs=["top_tokens"], axis=0)
    kv_in, kv_out = _kv_io(config, 1, slots)
    rows = "T" if slots is None else "rows"
    inputs = [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, rows, config.hidden_size]),
              *_common_inputs("M", slots), *kv_in]
    outputs = [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, rows, config.hidden_size]),
               helper.make_tensor_value_info("top_logprobs", TensorProto.FLOAT, [1, rows, top_k]),
               helper.make_tensor_value_info("top_tokens", TensorProto.INT64, [1, rows, top_k]), *kv_out]
    return _model(g, "draft_step_ort" if slots is None else "draft_batch_ort", inputs, outputs)
