"""Static steps (runtime/backends/graphs.py): padding is invisible to the real rows, a static step computes what an
eager one computes over several KV blocks, and (on a GPU) captured graphs replay it. The contract suite runs whole
generations through the static steps ("torch-static") and the CUDA graphs ("torch-cuda")."""

from __future__ import annotations

import pytest
import torch

from runtime.test_decoder import greedy, prompt
from hass_deploy.config import TreeConfig
from hass_deploy.errors import ConfigError
from hass_deploy.models.target import step_attention_mask
from hass_deploy.runtime.backends import graphs
from hass_deploy.runtime.backends.torch import TorchDraft, TorchTarget
from hass_deploy.runtime.decoder import SpeculativeDecoder


def test_buckets_and_blocks():
    assert [graphs.row_bucket(rows) for rows in (1, 2, 3, 9, 64)] == [1, 2, 4, 16, 64]
    assert graphs.row_bucket(65) is None
    assert [graphs.kv_rows(end, 1000) for end in (1, 256, 257, 999)] == [256, 256, 512, 1000]


@pytest.mark.parametrize("steps, width, rows", [(1, 1, 1), (3, 3, 4), (5, 5, 8), (3, 9, 4), (10, 30, 16)])
def test_padding_is_invisible_to_the_real_rows(steps, width, rows):
    """Over every KV row, the padded step's real rows attend exactly where the step's rows do, and never to a
    padding row; a padding row attends to the committed context and itself only."""
    generator = torch.Generator().manual_seed(steps * 100 + width)
    tree_mask = torch.rand(1, steps, width, generator=generator) < 0.5
    tree_mask[0, :, width - steps:] |= torch.eye(steps, dtype=torch.bool)  # each row sees itself
    cache_len = 20
    padded = graphs.pad_tree_mask(tree_mask, steps, rows, torch.device("cpu"))
    assert padded.shape == (1, rows, width + rows - steps)
    kv_len = cache_len + rows
    original = step_attention_mask(cache_len, tree_mask, cache_len + steps)  # [1, 1, T, cache_len + T]
    static = step_attention_mask(torch.tensor(cache_len), padded, kv_len)  # [1, 1, T_b, cache_len + T_b]
    assert torch.equal(static[0, 0, :steps, :cache_len + steps], original[0, 0])
    assert not static[0, 0, :steps, cache_len + steps:].any()
    for pad in range(steps, rows):
        expected = torch.zeros(kv_len, dtype=torch.bool)
        expected[:cache_len - (width - steps)] = True  # committed context before the mask's columns
        expected[cache_len + pad] = True
        assert torch.equal(static[0, 0, pad], expected)


def test_causal_padding_and_zero_rows():
    padded = graphs.pad_tree_mask(None, 2, 4, torch.device("cpu"))
    assert padded[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    ids = torch.tensor([[7, 8, 9]])
    assert graphs.pad_rows(ids, 4).tolist() == [[7, 8, 9, 0]]
    assert graphs.pad_rows(ids, 3) is ids


def test_static_steps_compute_what_eager_steps_compute(targets, random_drafts, monkeypatch):
    """Prefill, then tree steps whose KV reads span two to five blocks (16 rows here): the same logits, features
    and KV rows as eager steps, and one static input set per shape."""
    monkeypatch.setattr(graphs, "KV_BLOCK", 16)
    target = targets["qwen3"]
    eager, static = TorchTarget(target.module, 80, "eager"), TorchTarget(target.module, 80, "static")
    ids = torch.tensor([prompt(9, seed=4)])
    for backend in (eager, static):
        backend.step(ids, torch.arange(9)[None], 0, None, last_only=True)
    mask = torch.tensor([[[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]]],
                        dtype=torch.bool)
    for cache_len in range(9, 74, 5):  # each step's 5 rows become the next one's context; reads of 32 to 80 rows
        tree_ids = torch.tensor([prompt(5, seed=cache_len)])
        positions = cache_len + torch.tensor([[0, 1, 1, 2, 2]])
        want = eager.step(tree_ids, positions, cache_len, mask)
        got = static.step(tree_ids, positions, cache_len, mask)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.hidden, want.hidden, atol=1e-5, rtol=1e-5)
        for got_rows, want_rows in zip(static.kv.rows_in_use(cache_len + 5), eager.kv.rows_in_use(cache_len + 5)):
            torch.testing.assert_close(got_rows, want_rows, atol=1e-5, rtol=1e-5)
    assert sorted(static.graphs.inputs) == [("target", 8, rows) for rows in (32, 48, 64, 80)]
    # 74 + 8 padded rows would pass the buffers' end: that step runs eagerly, and still computes the same.
    tail, positions = torch.tensor([[1, 2, 3, 4, 5]]), 74 + torch.arange(5)[None]
    torch.testing.assert_close(static.step(tail, positions, 74, None).logits,
                               eager.step(tail, positions, 74, None).logits, atol=1e-5, rtol=1e-5)
    assert len(static.graphs.inputs) == 4


def test_static_generation_is_token_identical(targets, random_drafts, monkeypatch):
    """Whole generations through static target and draft steps over several KV blocks, into the cache's end."""
    monkeypatch.setattr(graphs, "KV_BLOCK", 16)
    target, tree = targets["mistral"], TreeConfig(tokens=10, depth=4, top_k=3)
    ids = prompt(11, seed=8)
    config = greedy(tree, max_new_tokens=500, eos=())

    def decoder(steps: str) -> SpeculativeDecoder:
        draft = TorchDraft(random_drafts["mistral"], target.module.lm_head, 90 + tree.draft_rows, steps)
        return SpeculativeDecoder(TorchTarget(target.module, 90, steps), draft)

    eager, static = decoder("eager"), decoder("static")
    want, got = eager.generate(ids, config), static.generate(ids, config)
    assert got.output_ids == want.output_ids and got.stop_reason == "cache_full"
    assert got.accept_lengths == want.accept_lengths
    assert len(static.target.graphs.inputs) > 3 and len(static.draft.graphs.inputs) > 3


def test_step_modes_are_checked(targets):
    module = targets["llama"].module
    with pytest.raises(ConfigError, match="unknown step mode"):
        TorchTarget(module, 16, "fast")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA graphs need the model on a CUDA device"):
            TorchTarget(module, 16, "graphs")
    assert TorchTarget(module, 16).graphs is None  # auto on the CPU: eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_captured_steps_replay_and_a_failed_capture_stays_eager():
    """Eager the first time, captured the second, replayed after, each call's own values; a step that cannot be
    captured (it reads a value back) warns and stays eager, still correct."""
    device = torch.device("cuda")
    steps = graphs.StepGraphs(device, capture=True)
    weight = torch.randn(8, 8, device=device)

    def compute(static):
        return {"out": static["x"] @ weight}

    for call in range(4):
        x = torch.randn(1, 4, 8, device=device)
        out = steps.run("k", {"x": x}, compute)
        torch.testing.assert_close(out["out"], x @ weight)
        assert ("k" in steps.graphs) == (call >= 1)

    def syncing(static):
        return {"out": static["x"] * float(static["x"].sum().item())}

    with pytest.warns(UserWarning, match="capture failed"):
        for _ in range(3):
            x = torch.randn(1, 2, 8, device=device)
            torch.testing.assert_close(steps.run("s", {"x": x}, syncing)["out"], x * x.sum().item())
    assert "s" in steps.uncaptured
