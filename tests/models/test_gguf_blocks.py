"""Tests for hass_deploy.models.gguf_blocks: a GGUF's Q4_0 / Q4_1 / Q8_0 blocks, read from a file gguf's own writer
quantized, dequantize bit for bit to the weights transformers' GGUF loader converted the same file to (tensor by
tensor, Q/K rows un-permuted, a tied lm_head from the token embedding); joined blocks keep that; the provenance of a
converted directory leads back to its file, and a changed or missing file gets one line."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from models.gguf_files import _rope_permute, q4_types
from hass_deploy.errors import ModelLoadError
from hass_deploy.models.gguf import gguf_source
from hass_deploy.models.gguf_blocks import (Blocks, check_matches, concat, dequantize, read_blocks, unpermute_rows)
from hass_deploy.models.loading import load_target


def converted_weights(directory) -> dict[str, np.ndarray]:
    target = load_target(directory, tokenizer=False)
    return {name: tensor.numpy() for name, tensor in target.module.state_dict().items()}


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_blocks_dequantize_to_the_converted_weights_bit_for_bit(variant, q4_ggufs):
    path, directory = q4_ggufs[variant]
    weights = converted_weights(directory)
    layers = 2
    blocks = read_blocks(path, num_heads=4, num_kv_heads=2)
    types = q4_types(layers)
    expected = {f"layers.{i}.{module}.weight": types[f"blk.{i}.{tensor}.weight"]
                for i in range(layers) for tensor, module in (
                    ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                    ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                    ("ffn_down", "mlp.down_proj"))}
    expected["lm_head.weight"] = "Q8_0" if variant == "tied" else "Q4_1"  # tied: llama.cpp's output is token_embd
    expected = {name: kind for name, kind in expected.items() if kind != "F16"}  # not a block type: not read
    assert {name: b.kind for name, b in blocks.items()} == expected
    for name, block in blocks.items():
        # Per tensor, every weight: Q4_0 d*(q-8), Q4_1 d*q+m, Q8_0 d*q, as transformers' loader computed them.
        assert np.array_equal(dequantize(block), weights[name]), name
        assert block.bits == (8 if block.kind == "Q8_0" else 4) and block.codes.max() < 1 << block.bits
        assert (block.mins is not None) == (block.kind == "Q4_1")
    check_matches(blocks, weights, path)


def test_unpermuting_undoes_llama_cpps_rope_permutation():
    rows = np.arange(32 * 3).reshape(32, 3)
    for heads in (1, 2, 4):
        assert np.array_equal(unpermute_rows(_rope_permute(rows, heads), heads), rows)
    assert not np.array_equal(_rope_permute(rows, 2), rows)


def test_joined_blocks_keep_each_parts_weights(q4_ggufs):
    blocks = read_blocks(q4_ggufs["tied"][0], num_heads=4, num_kv_heads=2)
    parts = [blocks[f"layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert [p.kind for p in parts] == ["Q4_0", "Q4_1", "Q4_0"]
    joined = concat(parts)
    assert joined.kind == "Q4_0+Q4_1" and joined.mins is not None  # a Q4_0 part's min is 0
    assert np.array_equal(dequantize(joined), np.concatenate([dequantize(p) for p in parts]))
    with pytest.raises(ValueError, match="do not stack"):
        concat([parts[0], blocks["lm_head.weight"]])  # 4-bit beside 8-bit


def test_blocks_of_another_file_get_one_line(q4_ggufs):
    weights = converted_weights(q4_ggufs["untied"][1])
    other = read_blocks(q4_ggufs["tied"][0], num_heads=4, num_kv_heads=2)
    with pytest.raises(ModelLoadError, match="blocks for .* do not dequantize to the target"):
        check_matches(other, weights, "tied.gguf")
    odd = Blocks("Q4_0", 4, np.zeros((3, 1, 32), np.uint8), np.ones((3, 1), np.float32),
                 np.full((3, 1), 8, np.uint8), None, 32)
    with pytest.raises(ModelLoadError, match="no weight of its shape"):
        check_matches({"lm_head.weight": odd}, weights, "x.gguf")


def test_a_converted_directory_leads_back_to_its_file(q4_ggufs, hf_dirs, tmp_path):
    path, directory = q4_ggufs["untied"]
    assert gguf_source(directory) == path.resolve()
    assert gguf_source(hf_dirs["llama"]) is None  # not converted from a GGUF
    # A copy of the conversion whose provenance names a file that then changes, then goes.
    from hass_deploy.models.gguf import convert_gguf

    moved = shutil.copy(path, tmp_path / "model.gguf")
    copy = convert_gguf(moved, tmp_path / "converted", progress=False)
    with open(moved, "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    with pytest.raises(ModelLoadError, match="has changed since"):
        gguf_source(copy)
    (tmp_path / "model.gguf").unlink()
    with pytest.raises(ModelLoadError, match="no longer there"):
        gguf_source(copy)
