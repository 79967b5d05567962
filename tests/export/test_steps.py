"""The step modules that get exported, run eagerly: reading the KV buffers read-only and returning the new rows
(`ReadOnlyKV`, two-block attention) gives the torch backend's logits, hidden states and KV rows, for a prefill,
a tree step, a sliding window, and the draft's tree levels (M > T). No ONNX involved: fast, and it pins the
export path's maths to the reference path's."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES
from hass_deploy.export.steps import DraftStep, TargetStep
from hass_deploy.runtime.backends.torch import TorchDraft, TorchTarget


def past(kv, cache_len: int, layers: int, rows: int) -> list[torch.Tensor]:
    """The buffers as graph inputs: `rows` rows (>= cache_len; rows past cache_len are stale and must be masked)."""
    out = []
    for layer in range(layers):
        out += [kv.keys[layer, :, :, :rows].clone(), kv.values[layer, :, :, :rows].clone()]
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_target_step_module_matches_the_torch_backend(arch, targets):
    module = targets[arch].module
    layers = module.config.num_layers
    backend = TorchTarget(module, 64)
    step = TargetStep(module).eval()
    prompt = torch.randint(0, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = backend.step(prompt, torch.arange(20)[None], 0, None)
        out = step(prompt, torch.arange(20)[None], torch.tensor([0]), torch.ones(20, 20, dtype=torch.bool).tril()[None],
                   torch.arange(20), *past(backend.kv, 0, layers, 1))  # nothing committed: one masked row
        torch.testing.assert_close(out[0], reference.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], reference.hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[2], backend.kv.keys[0, :, :, :20], atol=1e-5, rtol=1e-5)
        # A tree [r, a, b, a2] over 20 committed rows, bound with 9 stale rows after them (a larger KV view).
        mask = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]], dtype=torch.bool)
        ids, positions = torch.tensor([[4, 7, 9, 11]]), torch.tensor([[20, 21, 21, 22]])
        inputs = past(backend.kv, 20, layers, 29)
        reference = backend.step(ids, positions, 20, mask)
        out = step(ids, positions, torch.tensor([20]), mask, torch.arange(4), *inputs)
    torch.testing.assert_close(out[0], reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[3], backend.kv.values[0, :, :, 20:24], atol=1e-5, rtol=1e-5)


def test_draft_step_module_matches_the_torch_backend_across_tree_levels(targets, random_drafts):
    target, head = targets["qwen2"], random_drafts["qwen2"]
    backend = TorchDraft(head, target.module.lm_head, 64)
    step = DraftStep(head, target.module.lm_head, top_k=5).eval()
    features = torch.randn(1, 6, 48, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        backend.step(features, ids, torch.arange(6)[None], 0, None, 3)
        # Level 2 of a tree: 3 beam rows at 9.. seeing the 3 level-1 rows at 6..8 through M = 6 mask columns.
        level1 = torch.eye(3, dtype=torch.bool)[None]
        backend.step(features[:, :3], torch.tensor([[2, 6, 5]]), torch.full((1, 3), 6), 6, level1, 3)
        mask = torch.cat([torch.eye(3, dtype=torch.bool)[[0, 0, 2]], torch.eye(3, dtype=torch.bool)], 1)[None]
        inputs = past(backend.kv, 9, 1, 9)
        reference = backend.step(features[:, 3:], torch.tensor([[8, 8, 7]]), torch.full((1, 3), 7), 9, mask, 3)
        out = step(features[:, 3:], torch.tensor([[8, 8, 7]]), torch.full((1, 3), 7), torch.tensor([9]), mask, *inputs)
    torch.testing.assert_close(out[0], reference.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1][..., :3], reference.logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[2][..., :3], reference.tokens)
