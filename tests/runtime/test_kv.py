"""KVBuffers, the one KV buffer class: the growing (bound-view) layout against the full one, and the contract
every backend relies on (writes, compaction, the view's contiguity, overflow)."""

from __future__ import annotations

import pytest
import torch

from hass_deploy.errors import CacheCapacityError
from hass_deploy.runtime.kv import MIN_BOUND_ROWS, KVBuffers


def test_growing_view_matches_the_full_layout_through_writes_growth_and_compaction():
    layers, heads, dim, max_len = 2, 3, 4, 100
    grown = KVBuffers(layers, heads, dim, max_len, torch.float32, full=False)
    full = KVBuffers(layers, heads, dim, max_len, torch.float32)
    assert grown.rows == MIN_BOUND_ROWS and full.rows == max_len
    generator = torch.Generator().manual_seed(0)
    cache_len = 0
    for steps, keep in ((50, None), (10, [0, 2, 5]), (30, [0, 1, 2, 3]), (12, [0, 4]), (9, list(range(9)))):
        new = torch.randn(layers, 2, 1, heads, steps, dim, generator=generator)
        grown.write(cache_len, new)
        for layer in range(layers):  # the other way in: PyTorch attention's per-layer update
            full.update(layer, cache_len, new[layer, 0], new[layer, 1], cache_len + steps)
        if keep is None:
            cache_len += steps
            continue
        keep = torch.tensor(keep)
        grown.compact(cache_len, keep)
        full.compact(cache_len, keep)
        cache_len += keep.numel()
        for a, b in zip(grown.rows_in_use(cache_len), full.rows_in_use(cache_len)):
            assert torch.equal(a, b)
    assert grown.rows == max_len  # 64 -> 100: the last growth was clamped (S_new < 2 S_b, overlapping blocks)


def test_every_layers_k_and_v_are_contiguous_for_binding_by_pointer():
    kv = KVBuffers(3, 2, 8, 200, torch.float32, full=False)
    kv.reserve(130)
    view = kv.view()
    assert view.shape == (3, 2, 1, 2, kv.rows, 8)
    assert all(view[layer, slot].is_contiguous() for layer in range(3) for slot in range(2))
    assert kv.keys.shape == kv.values.shape == (3, 1, 2, kv.rows, 8)


def test_update_returns_the_rows_attention_reads():
    kv = KVBuffers(1, 2, 4, 16, torch.float32)
    k, v = torch.ones(1, 2, 3, 4), torch.full((1, 2, 3, 4), 2.0)
    keys, values = kv.update(0, 5, k, v, 8)
    assert keys.shape == (1, 2, 8, 4) and torch.equal(keys[:, :, 5:], k) and torch.equal(values[:, :, 5:], v)
    assert not keys[:, :, :5].any()


@pytest.mark.parametrize("full", [True, False])
def test_overflow_is_a_capacity_error(full):
    kv = KVBuffers(1, 1, 4, 70, torch.float32, full=full)
    with pytest.raises(CacheCapacityError, match="71 rows needed, 70 allocated"):
        kv.write(60, torch.zeros(1, 2, 1, 1, 11, 4))
    with pytest.raises(CacheCapacityError, match="overflow"):
        kv.update(0, 68, torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), 71)
