"""Static KV buffers (DESIGN D2): one class for every backend.

One allocation per decoder for the whole generation, `[L, 2, H_kv * S_max * D]`: layer l's K is slot (l, 0), its V
slot (l, 1). A step writes its T new rows at `cache_len .. cache_len + T`; after verification the accepted tree
rows are compacted in place with one gather and one copy over all layers. Nothing grows with the context: writes
and compaction cost O(new rows).

The rows in use are the view `[L, 2, 1, H_kv, S_b, D]` of the first `H_kv * S_b * D` elements of each slot, so
every layer's K and V is a contiguous `[1, H_kv, S_b, D]` tensor that an engine (ONNX Runtime, TensorRT) can
read in place by pointer. Two layouts:

- `full=True`: S_b = S_max from the start. For attention that reads only the rows in use whatever is bound
  (PyTorch slicing the view, ONNX Runtime's fused graphs).
- `full=False`: S_b starts at MIN_BOUND_ROWS and grows by a quarter at a time, so a graph that attends over every
  bound row (the standard ONNX graphs) pays for the context in use, not for S_max: binding all S_max rows made a
  T = 32 step on 2 CPU cores about 4x slower at S_max = 4096 than at 256 rows (docs/ONNX.md). A prefix of the row
  axis of [1, H_kv, S_max, D] is not contiguous, hence the re-layout when S_b grows (each row moves about four
  times in a whole generation: amortised O(1) per token).
"""

from __future__ import annotations

import torch

from hass_deploy.errors import CacheCapacityError

MIN_BOUND_ROWS = 64  # the first view and the unit it grows by; below this a re-layout costs more than it saves
# The view grows by at least 1/4 (then rounds up to 64 rows): attention reads at most ~25 % stale rows, and each
# row is moved about 4 times in a whole generation (amortised O(1) per token). Doubling moved rows half as often
# but bound up to 2x the rows in use: steps 10-20 % slower at 512-1024 rows of context (docs/ONNX.md).
GROWTH_DIVISOR = 4


class KVBuffers:
    """K/V buffers of a decoder, allocated once for `max_len` rows."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", full: bool = True):
        self.num_kv_heads, self.head_dim, self.max_len = num_kv_heads, head_dim, max_len
        self.storage = torch.zeros(num_layers, 2, num_kv_heads * max_len * head_dim, dtype=dtype, device=device)
        self.rows = max_len if full else min(MIN_BOUND_ROWS, max_len)  # S_b

    def view(self) -> torch.Tensor:
        """[L, 2, 1, H_kv, S_b, D]: layer l's K is view[l, 0], its V view[l, 1]."""
        used = self.num_kv_heads * self.rows * self.head_dim
        return self.storage[:, :, :used].view(*self.storage.shape[:2], 1, self.num_kv_heads, self.rows, self.head_dim)

    @property
    def keys(self) -> torch.Tensor:
        """[L, 1, H_kv, S_b, D]"""
        return self.view()[:, 0]

    @property
    def values(self) -> torch.Tensor:
        return self.view()[:, 1]

    def check(self, rows: int) -> None:
        if rows > self.max_len:
            raise CacheCapacityError(f"KV cache overflow: {rows} rows needed, {self.max_len} allocated")

    def reserve(self, rows: int) -> bool:
        """Make the view hold at least `rows` rows; True if the layout changed (bindings must be redone).

        Head h's rows move from offset h * S_b * D to h * S_new * D, last head first, so no block is overwritten
        before it has moved. O(S_b), once per growth of S_b by a quarter.
        """
        self.check(rows)
        if rows <= self.rows:
            return False
        old = self.rows
        grown = max(rows, old + old // GROWTH_DIVISOR)
        new = min(self.max_len, -(-grown // MIN_BOUND_ROWS) * MIN_BOUND_ROWS)  # rounded up to whole 64-row blocks
        block = old * self.head_dim
        for head in range(self.num_kv_heads - 1, 0, -1):
            source = self.storage[:, :, head * block:(head + 1) * block]
            start = head * new * self.head_dim
            # A clone, because with S_new < 2 S_b the new place of a head overlaps its old one.
            self.storage[:, :, start:start + block] = source.clone() if new < 2 * old else source
        self.rows = new
        return True

    def update(self, layer: int, cache_len: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [1, H_kv, T, D] at rows cache_len.. of `layer`; return views of its rows [0, kv_len) (the
        `models.target.KVStore` protocol: PyTorch's attention).

        cache_len may be a 0-d device tensor (a static step, `backends/graphs.py`): the rows are then written by
        index, so where they go is data, not a shape, and the step can be captured. That needs the full layout.
        """
        if isinstance(cache_len, torch.Tensor):
            if self.rows != self.max_len:
                raise ValueError("a step with a device-side cache_len needs KV buffers of the full layout")
            rows = cache_len + torch.arange(k.shape[2], device=k.device)  # [T]
            view = self.view()
            view[layer, 0, 0].index_copy_(1, rows, k[0])
            view[layer, 1, 0].index_copy_(1, rows, v[0])
            return view[layer, 0, :, :, :kv_len], view[layer, 1, :, :, :kv_len]
        end = cache_len + k.shape[2]
        self.reserve(max(end, kv_len))
        view = self.view()
        view[layer, 0, :, :, cache_len:end] = k
        view[layer, 1, :, :, cache_len:end] = v
        return view[layer, 0, :, :, :kv_len], view[layer, 1, :, :, :kv_len]

    def write(self, cache_len: int, new_rows: torch.Tensor) -> None:
        """Copy a step's new rows [L, 2, 1, H_kv, T, D] to rows cache_len .. cache_len + T: O(T)."""
        self.reserve(cache_len + new_rows.shape[4])
        self.view()[:, :, :, :, cache_len:cache_len + new_rows.shape[4]] = new_rows

    def compact(self, cache_len: int, keep: torch.Tensor) -> None:
        """Move rows cache_len + keep[j] to cache_len + j (keep increasing, so keep[j] >= j) in every layer: the
        gather materialises the n rows before the copy, so overlapping source and destination cannot alias."""
        if keep.numel() == 0:
            return
        view = self.view()
        view[:, :, :, :, cache_len:cache_len + keep.numel()] = view.index_select(4, cache_len + keep)

    def rows_in_use(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first `length` rows of every layer: [L, 1, H_kv, length, D] each."""
        view = self.view()
        return view[:, 0, :, :, :length], view[:, 1, :, :, :length]
