"""`export --engine trt` around the TensorRT calls (export/tensorrt.py), on a machine without TensorRT: the
optimisation profiles cover every dynamic input, a plan is rebuilt only when what it depends on changed, the
manifest records the engines, and without TensorRT the export stops after complete ONNX graphs with one line."""

from __future__ import annotations

import json
import types

import pytest
from typer.testing import CliRunner

from ort_artifacts import CONFIG, exported
from hass_deploy.cli import app
from hass_deploy.errors import ConfigError
from hass_deploy.export import tensorrt
from hass_deploy.export.config import ExportConfig
from hass_deploy.manifest import profile_shapes, profiles, read_manifest


@pytest.fixture(scope="module")
def artifacts(targets, random_drafts, tmp_path_factory):
    return exported(tmp_path_factory.getbasetemp() / "onnx", "llama-fp32", targets["llama"], random_drafts["llama"])


def test_profiles_cover_decode_and_the_largest_step(artifacts):
    manifest = read_manifest(artifacts)
    decode, verify = profiles(manifest)
    assert decode.rows == (1, 1, 1) and verify.rows == (2, CONFIG.max_tree_tokens, CONFIG.max_tree_tokens)
    assert decode.kv_rows == verify.kv_rows == (1, min(1024, CONFIG.max_seq_len), CONFIG.max_seq_len)
    for name in ("target", "draft"):
        spec = manifest.graphs[name]
        dynamic = {t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)}
        for profile in (decode, verify):
            shapes = profile_shapes(spec, profile)
            assert set(shapes) == dynamic  # every dynamic input, and only those
            for low, opt, high in shapes.values():
                assert all(a <= b <= c for a, b, c in zip(low, opt, high))
        assert profile_shapes(spec, decode)["input_ids"] == ((1, 1), (1, 1), (1, 1))
        assert profile_shapes(spec, verify)["past_key_0"][2][2] == CONFIG.max_seq_len
    draft_mask = profile_shapes(manifest.graphs["draft"], verify)["tree_mask"]
    assert draft_mask[2] == (1, CONFIG.max_tree_tokens, CONFIG.max_tree_tokens + CONFIG.max_seq_len)


def test_engines_are_built_once_and_recorded(artifacts, tmp_path, monkeypatch):
    """The logic around the builder, with TensorRT and the GPU faked: one plan per graph, kept while nothing it
    depends on changes, rebuilt when TensorRT's version does; the manifest says which, where and how."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(artifacts, out)
    built = []
    fake = types.SimpleNamespace(__version__="10.16.0")
    monkeypatch.setattr(tensorrt, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(tensorrt, "build_plan", lambda trt, onnx_path, plan, cache, shapes: (
        built.append((onnx_path.name, len(shapes))), plan.write_bytes(b"plan")))
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    manifest = tensorrt.build_engines(out, read_manifest(out))
    assert built == [("target.onnx", 2), ("draft.onnx", 2)]
    record = manifest.tensorrt
    assert record["gpu"] == "NVIDIA H200" and record["compute_capability"] == "9.0" and record["version"] == "10.16.0"
    assert {name: plan["file"] for name, plan in record["plans"].items()} == {"target": "target.plan",
                                                                            "draft": "draft.plan"}
    manifest.write(out)
    assert read_manifest(out).tensorrt == record
    tensorrt.build_engines(out, read_manifest(out))
    assert len(built) == 2  # nothing changed: kept
    fake.__version__ = "10.17.0"
    tensorrt.build_engines(out, read_manifest(out))
    assert len(built) == 4  # another TensorRT: rebuilt


def test_without_tensorrt_the_export_stops_after_complete_onnx_in_one_line(hf_dirs, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "--target", str(hf_dirs["llama"]), "--no-draft", "--out", str(out),
                                      "--engine", "trt", "--max-seq-len", "64", "--max-tree-tokens", "16",
                                      "--attention", "decomposed"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "the ONNX graphs are complete in" in lines[0] and "hass-deploy[trt]" in lines[0]
    manifest = read_manifest(out)  # a complete, readable export
    assert set(manifest.graphs) == {"target"} and manifest.attention == "decomposed" and manifest.tensorrt is None
    assert not list(out.glob("*.plan")) and json.loads((out / "manifest.json").read_text())["engine"] == "onnx"


def test_trt_exports_refuse_what_only_onnx_runtime_runs():
    for options in ({"ort_graphs": True}, {"draft_quantization": "int8"}, {"target_quantization": "int8"}):
        with pytest.raises(ConfigError, match="--engine trt builds TensorRT plans"):
            ExportConfig(engine="trt", **options)
    assert not ExportConfig(engine="trt").fused
