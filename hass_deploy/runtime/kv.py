"""Static KV buffers (DESIGN D2).

One allocation per model for the whole generation: K and V of every layer as `[L, B, H_kv, S_max, D]`. A step
writes its T new rows at `cache_len .. cache_len + T` and attends over a view of the first `cache_len + T`
rows; after verification the accepted tree rows are compacted in place with one gather and one copy over
all layers. Nothing here grows with the context: writes and compaction cost O(new rows).
"""

from __future__ import annotations

import torch

from hass_deploy.errors import CacheCapacityError


class KVCache:
    """K/V buffers of a decoder, allocated once for `max_len` rows."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        batch: int = 1,
    ):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(
        self, layer: int, cache_len: int, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H_kv, T, D] at rows `cache_len ..` of `layer`; return views of rows [0, kv_len)."""
        end = cache_len + k.shape[2]
        if end > self.max_len:
            raise CacheCapacityError(f"KV cache overflow: {end} rows needed, {self.max_len} allocated")
        self.keys[layer, :, :, cache_len:end] = k
        self.values[layer, :, :, cache_len:end] = v
        return self.keys[layer, :, :, :kv_len], self.values[layer, :, :, :kv_len]

    def compact(self, cache_len: int, keep: torch.Tensor) -> None:
        """Move rows `cache_len + keep[j]` to `cache_len + j` in every layer.

        `keep` [n] holds increasing offsets of the accepted tree nodes (root first), so `keep[j] >= j`; the gather
        materialises the n rows before the copy, so overlapping source and destination cannot alias.
        """
        if keep.numel() == 0:
            return
        rows = cache_len + keep  # [n]
        for buffer in (self.keys, self.values):
            buffer[:, :, :, cache_len : cache_len + keep.numel()] = buffer.index_select(3, rows)  # [L, B, H, n, D]

    def rows(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first `length` rows of every layer: [L, B, H_kv, length, D] each."""
        return self.keys[:, :, :, :length], self.values[:, :, :, :length]
