"""The `decomposed` export variant (export/decompose.py): opset-23 function operators expanded into their ONNX
definitions compute the same values, and a decomposed export holds no RMSNormalization/RotaryEmbedding, decodes
token for token as PyTorch does on ONNX Runtime, and passes `validate`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ort_artifacts import CONFIG
from runtime.test_decoder import greedy, prompt
from hass_deploy.config import TreeConfig
from hass_deploy.errors import ConfigError
from hass_deploy.export.config import ExportConfig
from hass_deploy.export.decompose import decompose
from hass_deploy.export.onnx import export_onnx
from hass_deploy.export.parity import validate_artifacts
from hass_deploy.manifest import read_manifest
from hass_deploy.models.checkpoint import DraftMetadata, save_draft, target_identity
from hass_deploy.runtime.backends import open_backends
from hass_deploy.runtime.decoder import SpeculativeDecoder

ort = pytest.importorskip("onnxruntime")


def _norm_and_rope_model() -> onnx.ModelProto:
    """x [1, 4, 8] -> RMSNormalization -> RotaryEmbedding of 2 heads of 4 at positions [0, 1, 2, 3]."""
    nodes = [
        helper.make_node("RMSNormalization", ["x", "gamma"], ["normed"], axis=-1, epsilon=1e-5),
        helper.make_node("RotaryEmbedding", ["normed", "cos", "sin", "positions"], ["y"], num_heads=2),
    ]
    rng = np.random.default_rng(0)
    angles = np.arange(16)[:, None] / 10000 ** (np.arange(2) / 2)[None]
    initializers = [helper.make_tensor("gamma", TensorProto.FLOAT, [8], rng.normal(size=8).astype(np.float32)),
                    helper.make_tensor("cos", TensorProto.FLOAT, [16, 2], np.cos(angles).astype(np.float32).ravel()),
                    helper.make_tensor("sin", TensorProto.FLOAT, [16, 2], np.sin(angles).astype(np.float32).ravel()),
                    helper.make_tensor("positions", TensorProto.INT64, [1, 4], [0, 1, 2, 3])]
    graph = helper.make_graph(nodes, "norm_rope", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_expanded_operators_compute_the_same_values(tmp_path):
    import torch

    from hass_deploy.runtime.backends.onnxruntime import OrtConfig, open_session

    model = _norm_and_rope_model()
    expanded, count = decompose(model)
    onnx.checker.check_model(expanded)
    assert count == 2
    assert {node.op_type for node in expanded.graph.node}.isdisjoint({"RMSNormalization", "RotaryEmbedding"})
    assert [o.domain for o in expanded.opset_import] == [""]
    x = np.random.default_rng(1).normal(size=(1, 4, 8)).astype(np.float32)

    def run(m, name):  # through the backend's session opener: it knows the process's ORT thread pools
        onnx.save(m, str(tmp_path / name))
        session = open_session(tmp_path / name, torch.device("cpu"), OrtConfig(cache_optimized=False))
        return session.run(None, {"x": x})[0]

    np.testing.assert_allclose(run(expanded, "expanded.onnx"), run(model, "fused.onnx"), atol=1e-6, rtol=1e-6)
    assert decompose(expanded)[1] == 0  # nothing left to expand


def test_a_decomposed_export_decodes_as_pytorch_does_and_validates(targets, random_drafts, hf_dirs, tmp_path):
    target, draft = targets["qwen3"], random_drafts["qwen3"]  # q/k norms: twice the norms of the others
    config = ExportConfig(**{**CONFIG.__dict__, "attention": "decomposed", "ort_graphs": False, "ort_batch": 0})
    export_onnx(target, draft, tmp_path / "out", config)
    manifest = read_manifest(tmp_path / "out")
    assert manifest.attention == "decomposed"
    for graph in (manifest.graphs["target"], manifest.graphs["draft"]):
        assert not {"::RMSNormalization", "::RotaryEmbedding"} & set(graph.operators), graph.operators
        assert graph.tensorrt_unsupported == []
    tree = TreeConfig(tokens=8, depth=4, top_k=3)
    ort_target, ort_draft = open_backends("onnxruntime", target, draft, 256, tree.draft_rows, tmp_path / "out")
    torch_target, torch_draft = open_backends("torch", target, draft, 256, tree.draft_rows)
    for ids in (prompt(5, seed=1), prompt(21, seed=2)):
        config = greedy(tree, max_new_tokens=32, eos=())
        assert (SpeculativeDecoder(ort_target, ort_draft).generate(ids, config).output_ids
                == SpeculativeDecoder(torch_target, None).generate(ids, config).output_ids)
    draft_dir = tmp_path / "draft"
    save_draft(draft, draft_dir, DraftMetadata(format_version=1, recipe="random-init", target=target_identity(target)))
    report = validate_artifacts(tmp_path / "out", hf_dirs["qwen3"], draft_dir, max_new_tokens=16)
    assert report.passed, report.render()


def test_attention_variant_is_checked():
    with pytest.raises(ConfigError, match="--attention must be one of onnx, decomposed"):
        ExportConfig(attention="flash")
