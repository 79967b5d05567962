"""Our decoder against transformers' own: logits within 1e-4 in fp32 for every architecture and rope scaling,
incremental KV decoding equal to a full forward, and a tree step equal to running each branch on its own."""

from __future__ import annotations

import pytest
import torch

from conftest import ARCHITECTURES, TINY
from hass_deploy.models.loading import load_target
from hass_deploy.models.random_target import random_hf_model
from hass_deploy.models.target import PackedKV, step_attention_mask
from hass_deploy.runtime.kv import KVBuffers

ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},  # positions stay below the original length here
}


def our_logits(target, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return target.module.logits(target.module(ids, torch.arange(ids.shape[1])[None]))


def ids_for(seed: int, length: int = 40, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_transformers(arch, targets, hf_models):
    ids = ids_for(1)
    with torch.no_grad():
        reference = hf_models[arch](ids).logits
    assert (our_logits(targets[arch], ids) - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_rope_scalings_and_embedding_tying_match_transformers(scaling, tied, tmp_path):
    model = random_hf_model("llama", "tiny", seed=3, **{**TINY, "tie_word_embeddings": tied,
                                                          "rope_scaling": ROPE_SCALINGS[scaling], "rope_theta": 500000.0})
    model.save_pretrained(tmp_path)
    ids = ids_for(2)
    with torch.no_grad():
        reference = model(ids).logits
    target = load_target(tmp_path)
    assert target.config.rope_parameters["rope_type"] == scaling
    assert (target.module.lm_head.weight is target.module.embed_tokens.weight) == tied
    assert (our_logits(target, ids) - reference).abs().max() <= 1e-4


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_incremental_decoding_equals_full_forward(arch, targets):
    target, ids = targets[arch], ids_for(4)
    full = our_logits(target, ids)
    config = target.config
    kv = KVBuffers(config.num_layers, config.num_kv_heads, config.head_dim, 64, torch.float32)
    pieces, start = [], 0
    with torch.no_grad():
        for stop in (13, 14, 20, 21, 40):  # a prefill, single tokens and chunks
            hidden = target.module(ids[:, start:stop], torch.arange(start, stop)[None], None, kv, start)
            pieces.append(target.module.logits(hidden))
            start = stop
    assert (torch.cat(pieces, 1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tree_step_equals_each_branch_alone(arch, targets):
    """Tree [r, a1, b1, a2, b2]: branches r-a1-a2 and r-b1-b2 at positions P + [0, 1, 1, 2, 2] in one step."""
    target, context = targets[arch], ids_for(5, length=18)
    r, a1, b1, a2, b2 = 3, 10, 11, 20, 21
    config = target.config
    kv = KVBuffers(config.num_layers, config.num_kv_heads, config.head_dim, 64, torch.float32)
    prompt_len = context.shape[1]
    parents = [-1, 0, 0, 1, 2]
    mask = torch.eye(5, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    with torch.no_grad():
        target.module(context, torch.arange(prompt_len)[None], None, kv, 0)
        depths = torch.tensor([0, 1, 1, 2, 2])
        tree_logits = target.module.logits(target.module(
            torch.tensor([[r, a1, b1, a2, b2]]), (prompt_len + depths)[None], mask[None], kv, prompt_len))
    for branch, nodes in (([r, a1, a2], [0, 1, 3]), ([r, b1, b2], [0, 2, 4])):
        alone = our_logits(target, torch.cat([context, torch.tensor([branch])], 1))[:, prompt_len:]
        assert (tree_logits[:, nodes] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_sequences_compute_what_each_computes_alone(arch, targets):
    """PackedKV: two sequences' rows in one forward (a causal block after a context, a tree on a fresh buffer),
    each over its own KV buffers: the rows and the KV written are each sequence's own forward's."""
    target, config = targets[arch], targets[arch].config

    def buffers():
        return KVBuffers(config.num_layers, config.num_kv_heads, config.head_dim, 64, torch.float32)

    context, block, tree = ids_for(6, length=18), ids_for(7, length=5), torch.tensor([[3, 10, 11, 20]])
    mask = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]], dtype=torch.bool)
    block_positions, tree_positions = torch.arange(18, 23)[None], torch.tensor([[0, 1, 1, 2]])
    alone_kv, packed_kv = [buffers(), buffers()], [buffers(), buffers()]
    with torch.no_grad():
        for kv in (alone_kv[0], packed_kv[0]):
            target.module(context, torch.arange(18)[None], None, kv, 0)
        alone = [target.module(block, block_positions, None, alone_kv[0], 18),
                 target.module(tree, tree_positions, mask, alone_kv[1], 0)]
        packed = target.module(torch.cat([block, tree], 1), torch.cat([block_positions, tree_positions], 1), None,
                               PackedKV(packed_kv, [18, 0], [5, 4], [None, mask]))
    assert packed.shape == (1, 9, config.hidden_size)
    torch.testing.assert_close(packed, torch.cat(alone, 1), atol=1e-5, rtol=1e-5)
    for lone, together, used in zip(alone_kv, packed_kv, (23, 4)):
        for got, want in zip(together.rows_in_use(used), lone.rows_in_use(used)):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_attention_mask_layout():
    """Committed rows visible to all; the last M rows follow the tree mask; rows past cache_len + T unseen."""
    tree = torch.tensor([[[1, 0, 0], [1, 1, 0]]], dtype=torch.bool)  # T = 2 new rows, M = 3 (one earlier level)
    mask = step_attention_mask(cache_len=4, tree_mask=tree, kv_len=8)[0, 0]  # rows written at 4, 5; tree cols 3..5
    expected = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    windowed = step_attention_mask(4, tree, 8, position_ids=torch.tensor([[4, 5]]), sliding_window=3)[0, 0]
    assert torch.equal(windowed, expected & (torch.tensor([[4], [5]]) - torch.arange(8) < 3))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_targets_stay_close(dtype, hf_dirs):
    target, reference = load_target(hf_dirs["llama"], dtype=dtype), load_target(hf_dirs["llama"])
    ids = ids_for(6)
    assert target.module.lm_head.weight.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert target.module.rotary.inv_freq.dtype == torch.float32
    half, full = our_logits(target, ids).float(), our_logits(reference, ids)
    assert (half - full).abs().max() <= 0.05 * full.abs().max()
