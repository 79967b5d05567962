"""ONNX export: the graphs' I/O contract and manifest, standard operators only (TensorRT's table), external
data, atomic writes, and the dtypes ONNX Runtime's CPU provider can and cannot run."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from onnx import helper

from ort_artifacts import CONFIG, exported
from hass_deploy.errors import ConfigError, HassDeployError
from hass_deploy.export import onnx as onnx_export
from hass_deploy.export import tensorrt_ops
from hass_deploy.export.config import ExportConfig
from hass_deploy.manifest import MANIFEST_FILE, read_manifest
from hass_deploy.export.onnx import export_onnx
from hass_deploy.runtime.backends import open_backends


@pytest.fixture(scope="module")
def llama_artifacts(targets, random_drafts, tmp_path_factory):
    return exported(tmp_path_factory.getbasetemp() / "onnx", "llama-fp32", targets["llama"], random_drafts["llama"])


def test_manifest_describes_the_graphs(llama_artifacts, targets):
    manifest = read_manifest(llama_artifacts)
    config = targets["llama"].config
    assert (manifest.engine, manifest.dtype, manifest.opset) == ("onnx", "fp32", 23)
    assert (manifest.max_seq_len, manifest.max_tree_tokens, manifest.max_top_k) == (256, 64, 16)
    assert manifest.target["fingerprint"] and manifest.target["architecture"] == "LlamaForCausalLM"
    assert manifest.draft["fingerprint"] and {"torch", "onnx", "onnxscript", "exporter"} <= set(manifest.versions)
    target, draft = manifest.graphs["target"], manifest.graphs["draft"]
    names = [t.name for t in target.inputs]
    assert names[:5] == ["input_ids", "position_ids", "cache_len", "tree_mask", "logits_index"]
    assert names[5:] == [f"past_{kind}_{layer}" for layer in range(config.num_layers) for kind in ("key", "value")]
    shapes = {t.name: (t.dtype, t.shape) for t in (*target.inputs, *target.outputs)}
    assert shapes["tree_mask"] == ("bool", [1, "T", "T"])
    assert shapes["cache_len"] == ("int64", [1])
    assert shapes["past_key_0"] == ("float32", [1, config.num_kv_heads, "S", config.head_dim])  # GQA: 2 of 4 heads
    assert shapes["logits"] == ("float32", [1, "R", config.vocab_size])
    assert shapes["new_value_1"] == ("float32", [1, config.num_kv_heads, "T", config.head_dim])
    assert target.dynamic_axes["past_key_0"] == {2: "S"}
    draft_shapes = {t.name: t.shape for t in (*draft.inputs, *draft.outputs)}
    assert draft_shapes["tree_mask"] == [1, "T", "M"] and draft_shapes["top_tokens"] == [1, "T", 16]
    on_disk = json.loads((llama_artifacts / MANIFEST_FILE).read_text())
    assert on_disk["graphs"]["target"]["file"] == "target.onnx"


def test_graphs_use_standard_operators_tensorrt_imports(llama_artifacts):
    for name in ("target", "draft"):
        model = onnx.load(str(llama_artifacts / f"{name}.onnx"), load_external_data=False)
        onnx.checker.check_model(model)
        assert tensorrt_ops.unsupported_operators(model) == []
        assert all(op.startswith("::") for op in tensorrt_ops.operators(model)), "only the default ONNX domain"
    assert read_manifest(llama_artifacts).graphs["target"].tensorrt_unsupported == []


def test_tensorrt_check_flags_contrib_and_unknown_operators():
    nodes = [helper.make_node("GroupQueryAttention", ["x"], ["y"], domain="com.microsoft"),
             helper.make_node("Unique", ["y"], ["z"]),
             helper.make_node("TopK", ["z", "k"], ["v", "i"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, [4])],
                              [helper.make_tensor("k", onnx.TensorProto.INT64, [1], [4000])])
    problems = tensorrt_ops.unsupported_operators(helper.make_model(graph))
    assert problems == ["::TopK (K must be a constant below 3840)",
                        "::Unique (not in TensorRT 10.15's operator table)",
                        "com.microsoft::GroupQueryAttention (not the default ONNX domain)"]


@pytest.mark.slow
def test_external_data_and_target_only_export(targets, hf_dirs, tmp_path):
    """Weights in a side file load and run; a target-only export serves plain decoding and refuses a draft."""
    out = tmp_path / "artifacts"
    config = ExportConfig(max_seq_len=64, max_tree_tokens=8, external_data=True)
    manifest = export_onnx(targets["qwen2"], None, out, config)
    assert set(manifest.graphs) == {"target"} and manifest.graphs["target"].external_data
    graph = onnx.load(str(out / "target.onnx"), load_external_data=False)
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and (out / "target.onnx.data").exists()
    target, draft = open_backends("onnxruntime", targets["qwen2"], None, 64, 0, out)
    assert draft is None
    ids = torch.tensor([[1, 2, 3]])
    logits = target.step(ids, torch.arange(3)[None], 0, None).logits
    with torch.no_grad():
        reference = targets["qwen2"].module.logits(targets["qwen2"].module(ids, torch.arange(3)[None]))
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_failed_export_leaves_nothing_behind(targets, random_drafts, tmp_path, monkeypatch):
    def half_written(module, path, *args):
        path.write_bytes(b"partial graph")  # the crash comes after something was written
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(onnx_export, "export_target_graph", half_written)
    out = tmp_path / "artifacts"
    with pytest.raises(RuntimeError, match="crashed"):
        export_onnx(targets["llama"], random_drafts["llama"], out, ExportConfig(max_seq_len=64, max_tree_tokens=8))
    assert list(tmp_path.iterdir()) == []  # neither `out` nor the temporary directory
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(HassDeployError, match="not empty"):
        export_onnx(targets["llama"], random_drafts["llama"], out, CONFIG)
    with pytest.raises(RuntimeError, match="crashed"):
        export_onnx(targets["llama"], random_drafts["llama"], out, CONFIG, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["artifacts"] and (out / "keep.txt").exists()


def test_export_refuses_bad_configurations(targets, random_drafts, tmp_path):
    with pytest.raises(ConfigError, match="does not fit S_max"):
        export_onnx(targets["llama"], random_drafts["llama"], tmp_path / "a", ExportConfig(max_tree_tokens=256))
    with pytest.raises(ConfigError, match="unsupported dtype"):
        ExportConfig(dtype="int8")
    with pytest.raises(ConfigError, match="--engine trt builds TensorRT plans"):
        export_onnx(targets["llama"], None, tmp_path / "b", ExportConfig(engine="trt", ort_graphs=True))
    with pytest.raises(ConfigError, match="--ort-batch must be 0"):
        ExportConfig(ort_batch=1)
    with pytest.raises(ConfigError, match="--ort-batch writes batched fused"):
        ExportConfig(ort_batch=4, ort_graphs=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bf16_graphs_export_but_ort_cpu_cannot_run_them(targets, random_drafts, tmp_path_factory):
    """bf16 is for CUDA/TensorRT: ONNX Runtime 1.32's CPU provider has no bf16 MatMul kernel."""
    out = exported(tmp_path_factory.getbasetemp() / "onnx", "llama-bf16", targets["llama"], random_drafts["llama"],
                   ExportConfig(dtype="bf16", max_seq_len=256, max_tree_tokens=64, prefill_chunk=8))
    manifest = read_manifest(out)
    assert {t.name: t.dtype for t in manifest.graphs["target"].inputs}["past_key_0"] == "bfloat16"
    assert manifest.graphs["target"].tensorrt_unsupported == []
    with pytest.raises(HassDeployError, match="no bf16|cannot run this graph"):
        open_backends("onnxruntime", targets["llama"], random_drafts["llama"], 64, 12, out)
