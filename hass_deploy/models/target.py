"""One Llama-family decoder with explicit tensor I/O (DESIGN D1, D2).

Llama 2/3, Mistral, Qwen2 and Qwen3 differ only in fields of `ModelConfig` (biases, q/k norm, rope, sliding
window), never in code. A step takes token ids, explicit position ids, the number of rows already in the KV
buffers (`cache_len`) and a tree mask, writes its new K/V rows at `cache_len .. cache_len + T` and reads the
buffer under a mask built from those tensors. The same module serves hidden-state extraction (no cache),
the torch runtime backend and ONNX export; `transformers` is only the oracle in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, normalised from a Hugging Face `config.json` (see `loading.py`)."""

    architecture: str  # the HF class name it came from, kept for manifests and error messages
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads means grouped-query attention
    head_dim: int  # explicit because Qwen3 decouples it from hidden_size / num_heads
    rms_norm_eps: float
    max_position_embeddings: int
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always, Llama when attention_bias
    o_bias: bool = False  # Llama/Qwen3 attention_bias also biases o_proj; Qwen2 does not
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: per-head RMSNorm on q and k before RoPE
    sliding_window: int | None = None  # Mistral: a query sees keys at most this many positions back

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


class KVStore(Protocol):
    """Where a layer's K/V rows live. `runtime/kv.py` implements it with static buffers."""

    def update(
        self, layer: int, cache_len: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H_kv, T, D] at rows cache_len.. (an int, or a 0-d device tensor in a static step) and return
        rows [0, kv_len) of the buffers."""
        ...


class ReadOnlyKV:
    """K/V rows the step only reads; its own new rows are handed back instead of written (ONNX export).

    A base class rather than a Protocol: attention branches on `isinstance`, which torch.export traces only for
    ordinary classes.

    In an exported step graph the committed rows are inputs bound to the runtime's static buffers and the new rows
    are outputs that the runtime writes into them itself, O(new rows). Attention then reads the buffer and the new
    rows as two blocks under one softmax (`blocked_attention`), so the graph never concatenates or copies anything
    whose size grows with the context.
    """

    def committed(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V buffers [B, H_kv, S, D] of `layer`; rows at and after cache_len are stale and masked out."""
        raise NotImplementedError

    def emit(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Receive the step's new rows k, v [B, H_kv, T, D] of `layer` (they belong at cache_len ..)."""
        raise NotImplementedError


class PackedKV:
    """Several sequences' rows in one step (a batched target step, `TargetBackend.step_batch`).

    x's rows are the sequences' rows one after another, `sizes[i]` of them for sequence i, which has its own KV store
    (its rows written at its own `cache_lens[i]`) and its own tree mask. The weight products run over all the rows
    at once, which is where a batch pays: a row's product does not depend on the rows beside it. Attention runs per
    sequence, over that sequence's own buffers and mask, exactly as its step alone would run it.

    An ordinary class, like ReadOnlyKV: attention branches on `isinstance`.
    """

    def __init__(self, stores: list[KVStore], cache_lens: list[int], sizes: list[int],
                 tree_masks: list[torch.Tensor | None]):
        if not len(stores) == len(cache_lens) == len(sizes) == len(tree_masks):
            raise ValueError("a packed step needs one store, cache length, size and tree mask per sequence")
        self.stores, self.cache_lens, self.sizes, self.tree_masks = stores, cache_lens, sizes, tree_masks

    def masks(self, position_ids: torch.Tensor, sliding_window: int | None) -> list[torch.Tensor]:
        """Each sequence's attention mask [1, 1, T_i, cache_len_i + T_i] (`step_attention_mask`)."""
        masks = []
        for cache_len, positions, tree_mask in zip(self.cache_lens, position_ids.split(self.sizes, dim=1),
                                                   self.tree_masks):
            steps = positions.shape[1]
            tree_mask = causal_tree_mask(steps, positions.device) if tree_mask is None else tree_mask
            masks.append(step_attention_mask(cache_len, tree_mask, cache_len + steps, positions, sliding_window))
        return masks

    def update(self, layer: int, sequence: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence `sequence`'s new rows k, v [1, H_kv, T_i, D] into its store; its rows [0, cache_len_i + T_i)."""
        cache_len = self.cache_lens[sequence]
        return self.stores[sequence].update(layer, cache_len, k, v, cache_len + k.shape[2])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as the HF Llama family does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _hf_rope_config(config: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(config.rope_parameters),
    )


class Rotary(nn.Module):
    """RoPE with the config's theta and scaling. Frequencies come from transformers' own rope table."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        params = config.rope_parameters
        self.rope_type = params.get("rope_type", "default")
        self.dim = config.head_dim
        self.theta = float(params.get("rope_theta", 10000.0))
        if self.rope_type == "default":
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))
            scaling = 1.0
        elif self.rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](_hf_rope_config(config), None)
        else:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}")
        self.attention_scaling = float(scaling)
        self.original_max = int(params.get("original_max_position_embeddings", config.max_position_embeddings))
        self.factor = float(params.get("factor", 1.0))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def _dynamic_inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        # Dynamic NTK: the base grows with the longest position in this call, in tensor ops (no host sync, exportable).
        # Below the original length it equals the plain frequencies, as in transformers.
        seq_len = torch.clamp(position_ids.max().float() + 1, min=float(self.original_max))
        base = self.theta * ((self.factor * seq_len / self.original_max) - (self.factor - 1)) ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float, device=position_ids.device) / self.dim
        return 1.0 / base**exponents

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._dynamic_inv_freq(position_ids) if self.rope_type == "dynamic" else self.inv_freq
        freqs = position_ids[..., None].float() * inv_freq  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D], cos/sin [B, T, D]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def step_attention_mask(
    cache_len: int | torch.Tensor,
    tree_mask: torch.Tensor,
    kv_len: int,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The one attention mask every backend uses.

    The step writes T new rows at `cache_len .. cache_len + T`. `tree_mask [B, T, M]` (M >= T) says which of the
    last M rows (ending at `cache_len + T`) each new row sees; every row before those is committed context and
    visible to all (within the sliding window, if any). For the target M = T (a tree or a causal block); the
    draft's tree levels use M > T to see earlier levels. Works with `cache_len` as an int or a 0-d tensor, so the
    same function runs eagerly and in an exported graph.

    Returns:
        [B, 1, T, kv_len] bool, True = attend.
    """
    cols = torch.arange(kv_len, device=tree_mask.device)  # [S]
    return columns_attention_mask(cols, cache_len, tree_mask, position_ids, sliding_window)


def columns_attention_mask(
    cols: torch.Tensor,
    cache_len: int | torch.Tensor,
    tree_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """`step_attention_mask` restricted to the KV rows `cols` [S] (any row indices, not only 0 .. kv_len).

    Returns:
        [B, 1, T, S] bool, True = attend.
    """
    batch, steps, width = tree_mask.shape
    end = cache_len + steps
    start = end - width
    rel = (cols - start).clamp(0, width - 1)  # [S] index into the tree mask's columns
    in_tree = (cols >= start) & (cols < end)
    tree_part = tree_mask.gather(-1, rel.expand(batch, steps, cols.shape[0])) & in_tree  # [B, T, S]
    allowed = (cols < start) | tree_part  # [B, T, S]
    if sliding_window is not None and position_ids is not None:
        # Row c holds position c for committed and causal rows; a tree row's position is <= c, and tree ancestors are
        # a few positions back, far inside any real window, so comparing with c is exact for them too.
        allowed = allowed & ((position_ids[..., None] - cols) < sliding_window)
    return allowed[:, None]


def read_only_masks(
    cache_len: int | torch.Tensor,
    tree_mask: torch.Tensor,
    buffer_len: int,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step mask split into its two blocks for `ReadOnlyKV`: the buffer's rows and the T new rows.

    Returns:
        ([B, 1, T, buffer_len], [B, 1, T, T]) bool: buffer rows below cache_len under the step mask (rows at and
        after cache_len are stale), and the new rows, which sit at cache_len .. cache_len + T.
    """
    steps = tree_mask.shape[1]
    rows = torch.arange(buffer_len, device=tree_mask.device)  # [S]
    past = columns_attention_mask(rows, cache_len, tree_mask, position_ids, sliding_window) & (rows < cache_len)
    new_rows = torch.arange(steps, device=tree_mask.device) + cache_len  # [T]
    return past, columns_attention_mask(new_rows, cache_len, tree_mask, position_ids, sliding_window)


def blocked_attention(q: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Scaled dot-product attention over several K/V blocks under one softmax, without concatenating K or V.

    Plain MatMul/Softmax ops, so an exported graph needs no fused attention kernel and the tree mask stays an
    ordinary input. Scores and probabilities are float32 whatever the model dtype (half-precision exports).

    Args:
        q: [B, H_kv, R, D] queries (grouped-query heads folded into the rows R).
        blocks: (k [B, H_kv, S_i, D], v [B, H_kv, S_i, D], mask [B, 1, R, S_i] bool) per block.

    Returns:
        [B, H_kv, R, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5
    scores = [torch.where(mask, torch.matmul(q, k.transpose(-1, -2)).float() * scale, float("-inf"))
              for k, _, mask in blocks]  # [B, H_kv, R, S_i] each
    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1)  # the scores' concat is O(R * S), no K/V copy
    out, start = None, 0
    for (_, v, _), score in zip(blocks, scores):
        width = score.shape[-1]
        part = torch.matmul(probs[..., start:start + width].to(v.dtype), v)  # [B, H_kv, R, D]
        out = part if out is None else out + part
        start += width
    return out.to(q.dtype)


def causal_tree_mask(steps: int, device: torch.device | str = "cpu", batch: int = 1) -> torch.Tensor:
    """[B, T, T] lower-triangular mask: a prefill block, or a chain."""
    return torch.ones(steps, steps, dtype=torch.bool, device=device).tril().expand(batch, steps, steps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        hidden, q_out, kv_out = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, q_out, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_out, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """x [B, T, H] -> q [B, nH, T, D], k and v [B, nKV, T, D], RoPE applied."""
        batch, steps, _ = x.shape
        q = self.q_proj(x).view(batch, steps, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, steps, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, steps, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        return apply_rotary(q.transpose(1, 2), cos, sin), apply_rotary(k.transpose(1, 2), cos, sin), v.transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [B, nH, T, D] over k, v [B, nKV, S, D] under mask [B, 1, T, S] -> [B, T, H] (o_proj applied)."""
        return self.o_proj(self.heads(q, k, v, mask))

    def heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`attend` before o_proj: the heads' outputs [B, T, nH * D]."""
        batch, _, steps, _ = q.shape
        # Grouped-query attention without repeating K/V (that would copy the whole context every step): query head
        # h uses KV head h // groups, so fold the groups into the query-row axis: [B, nKV, groups * T, D].
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, groups * steps, self.head_dim)
        mask = mask.repeat(1, 1, groups, 1)  # [B, 1, groups * T, S]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.reshape(batch, self.num_heads, steps, self.head_dim).transpose(1, 2).reshape(batch, steps, -1)

    def attend_blocks(self, q: torch.Tensor, blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """`attend` over several K/V blocks (k, v [B, nKV, S_i, D], mask [B, 1, T, S_i]) under one softmax."""
        batch, _, steps, _ = q.shape
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, groups * steps, self.head_dim)  # [B, nKV, groups * T, D], as in attend
        out = blocked_attention(q, [(k, v, mask.repeat(1, 1, groups, 1)) for k, v, mask in blocks])
        out = out.reshape(batch, self.num_heads, steps, self.head_dim).transpose(1, 2).reshape(batch, steps, -1)
        return self.o_proj(out)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        kv: KVStore | ReadOnlyKV | PackedKV | None,
        cache_len: int | torch.Tensor,
        kv_len: int,
    ) -> torch.Tensor:
        q, k, v = self.project(x, rope)
        if isinstance(kv, PackedKV):
            # mask is one per sequence (`PackedKV.masks`); each sequence attends over its own buffers only.
            parts = zip(q.split(kv.sizes, dim=2), k.split(kv.sizes, dim=2), v.split(kv.sizes, dim=2), mask)
            return self.o_proj(torch.cat([self.heads(q_i, *kv.update(self.layer, i, k_i, v_i), mask_i)
                                          for i, (q_i, k_i, v_i, mask_i) in enumerate(parts)], dim=1))
        if isinstance(kv, ReadOnlyKV):
            # mask is the (buffer, new rows) pair from `read_only_masks`; the buffer is read, never written.
            kv.emit(self.layer, k, v)
            past_k, past_v = kv.committed(self.layer)  # [B, nKV, S, D]
            return self.attend_blocks(q, [(past_k, past_v, mask[0]), (k, v, mask[1])])
        if kv is not None:
            k, v = kv.update(self.layer, cache_len, k, v, kv_len)  # [B, nKV, S, D], views of the static buffers
        return self.attend(q, k, v, mask)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A pre-norm Llama layer. The EAGLE/HASS draft's only layer has no input norm (`input_norm=False`)."""

    def __init__(self, config: ModelConfig, layer: int, input_norm: bool = True):
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps) if input_norm else nn.Identity()
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, mask, kv, cache_len, kv_len):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, kv, cache_len, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


def run_layers(
    layers: nn.ModuleList,
    rotary: Rotary,
    x: torch.Tensor,
    position_ids: torch.Tensor,
    tree_mask: torch.Tensor | None,
    kv: KVStore | ReadOnlyKV | None,
    cache_len: int | torch.Tensor,
    sliding_window: int | None = None,
    kv_len: int | None = None,
) -> torch.Tensor:
    """The decoder stack shared by the target and the draft head: x [B, T, H] -> [B, T, H].

    kv_len is how many KV rows attention reads, cache_len + T by default. A static step (`runtime/backends/graphs.py`)
    passes cache_len as a 0-d device tensor and kv_len as a fixed block of rows: the mask hides the rows past the step.
    """
    batch, steps, _ = x.shape
    if tree_mask is None:
        tree_mask = causal_tree_mask(steps, x.device, batch)
    kv_len = cache_len + steps if kv_len is None else kv_len
    # Built once per step and shared by every layer: [B, 1, T, kv_len], the (buffer, new rows) blocks, or one mask
    # per packed sequence.
    if isinstance(kv, PackedKV):
        mask = kv.masks(position_ids, sliding_window)
    elif isinstance(kv, ReadOnlyKV):
        mask = read_only_masks(cache_len, tree_mask, kv.committed(0)[0].shape[2], position_ids, sliding_window)
    else:
        mask = step_attention_mask(cache_len, tree_mask, kv_len, position_ids, sliding_window)
    rope = rotary(position_ids, x.dtype)
    for layer in layers:
        x = layer(x, rope, mask, kv, cache_len, kv_len)
    return x


class Transformer(nn.Module):
    """The target model. Parameter names match Hugging Face checkpoints without their `model.` prefix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(config)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor | None = None,
                kv: KVStore | ReadOnlyKV | PackedKV | None = None, cache_len: int | torch.Tensor = 0,
                kv_len: int | None = None) -> torch.Tensor:
        """Run T new tokens and return the post-final-norm hidden states [B, T, H] (the lm_head input, EAGLE's feature).

        Args:
            input_ids: [B, T] int64.
            position_ids: [B, T] int64 RoPE positions (tree nodes share a position per depth).
            tree_mask: [B, T, M] bool over the last M rows (see `step_attention_mask`); None = causal over the T tokens.
            kv: static KV buffers to write rows cache_len.. into and attend over (`KVStore`), buffers to read whose new
                rows are handed back (`ReadOnlyKV`, ONNX export), several sequences' stores for rows packed one
                sequence after another (`PackedKV`, which then holds their cache lengths and tree masks), or None = no
                cache (training, extraction).
            cache_len: rows already committed in `kv`.
            kv_len: rows of `kv` attention reads (see `run_layers`).
        """
        x = self.embed_tokens(input_ids)
        return self.norm(run_layers(self.layers, self.rotary, x, position_ids, tree_mask, kv, cache_len,
                                    self.config.sliding_window, kv_len))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
