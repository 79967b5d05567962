"""Head dimensions real models have, through export and greedy identity: the fused graphs where ONNX Runtime's
GroupQueryAttention runs them (head_dim % 16 == 0), the standard graphs alone, with a one-line note, where it does
not. Every graph an export writes is decoded here, so a graph that ORT refuses at run time fails this test."""

from __future__ import annotations

import pytest
import torch

from ort_artifacts import CONFIG
from runtime.test_decoder import greedy, hf_greedy, prompt
from hass_deploy.config import TreeConfig
from hass_deploy.export.onnx import export_onnx
from hass_deploy.models.checkpoint import init_draft
from hass_deploy.models.loading import load_target
from hass_deploy.models.random_target import random_hf_model
from hass_deploy.runtime.backends import open_backends
from hass_deploy.runtime.decoder import SpeculativeDecoder

HEAD_DIMS = (24, 40, 48, 72, 80, 96, 128)
TREE = TreeConfig(tokens=8, depth=4, top_k=4)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_every_head_dim_exports_and_decodes_like_transformers(head_dim, tmp_path):
    from transformers import AutoModelForCausalLM

    # Qwen2 (q/k/v biases: the model the defect was found on) and Llama in turn; 2 query heads over 1 KV head.
    arch = ("qwen2", "llama")[HEAD_DIMS.index(head_dim) % 2]
    model = random_hf_model(arch, "tiny", seed=head_dim, vocab_size=96, hidden_size=2 * head_dim,
                            intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=256, bos_token_id=0, eos_token_id=95)
    model.save_pretrained(tmp_path / "model")
    target = load_target(tmp_path / "model", "fp32", tokenizer=False)
    draft = init_draft(target, seed=7)
    notes: list[str] = []
    manifest = export_onnx(target, draft, tmp_path / "out", CONFIG, log=notes.append)

    fusable = head_dim % 16 == 0
    fused = {"target_ort", "draft_ort", "target_ort_batch", "draft_ort_batch"}  # the last two: CONFIG's --ort-batch
    assert set(manifest.graphs) == ({"target", "draft", *fused} if fusable else {"target", "draft"})
    fallback = [line for line in notes if "no fused ONNX Runtime graphs" in line]
    assert len(fallback) == (0 if fusable else 1)
    if not fusable:
        assert "multiple of 16" in fallback[0] and "\n" not in fallback[0]

    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    config = greedy(TREE, max_new_tokens=24, eos=())
    for graphs in ("standard", "fused") if fusable else ("standard",):
        target_backend, draft_backend = open_backends("onnxruntime", target, draft, CONFIG.max_seq_len,
                                                      TREE.draft_rows, tmp_path / "out", ort_graphs=graphs)
        for length in (3, 13):  # 13 > the export's prefill chunk of 8
            ids = prompt(length, seed=head_dim + length)
            plain = SpeculativeDecoder(target_backend, None).generate(ids, config).output_ids
            assert SpeculativeDecoder(target_backend, draft_backend).generate(ids, config).output_ids == plain
            assert plain == hf_greedy(hf_model, ids, 24), (graphs, length)
