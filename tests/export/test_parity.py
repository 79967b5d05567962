"""Validation of exported graphs against PyTorch: per-graph parity through polygraphy on inputs captured from a
real decoding run, then end-to-end greedy token identity; per-dtype tolerances; a tampered graph is caught."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from conftest import ARCHITECTURES
from ort_artifacts import exported
from hass_deploy.config import GenerationConfig, TreeConfig
from hass_deploy.errors import DraftMismatchError
from hass_deploy.export.config import ExportConfig
from hass_deploy.export.parity import TOLERANCES, capture_samples, validate_artifacts
from hass_deploy.models.checkpoint import DraftMetadata, FORMAT_VERSION, save_draft, target_identity

pytest.importorskip("polygraphy")


@pytest.fixture(scope="module")
def draft_dirs(targets, random_drafts, tmp_path_factory):
    """The session's random drafts as directories, as `hass-deploy validate` reads them."""
    base = tmp_path_factory.mktemp("drafts")
    return {arch: save_draft(random_drafts[arch], base / arch,
                             DraftMetadata(FORMAT_VERSION, "random-init", target_identity(targets[arch])))
            for arch in ARCHITECTURES}


def artifacts_for(arch, targets, random_drafts, tmp_path_factory, dtype="fp32"):
    config = ExportConfig(dtype=dtype, max_seq_len=256, max_tree_tokens=64, max_top_k=16, prefill_chunk=8)
    return exported(tmp_path_factory.getbasetemp() / "onnx", f"{arch}-{dtype}", targets[arch], random_drafts[arch],
                    config)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fp32_graphs_match_pytorch(arch, targets, random_drafts, hf_dirs, draft_dirs, tmp_path_factory):
    artifacts = artifacts_for(arch, targets, random_drafts, tmp_path_factory)
    report = validate_artifacts(artifacts, hf_dirs[arch], draft_dirs[arch], max_new_tokens=24)
    assert report.passed, report.render()
    names = [check.name for check in report.checks]
    assert "target values (atol 0.0001, rtol 0.001)" in names and "draft argmax agreement" in names
    assert all(check.passed is True for check in report.checks), "fp32 requires every check, end to end included"


def test_captured_inputs_come_from_a_real_decoding_run(targets, random_drafts):
    target, tree = targets["mistral"], TreeConfig(tokens=8, depth=3, top_k=3)
    config = GenerationConfig(max_new_tokens=12, tree=tree, eos_token_ids=())
    samples = capture_samples(target.module, random_drafts["mistral"], [[5, 9, 2, 7]], config, 64, limit=6)
    target_steps, draft_steps = samples["target"], samples["draft"]
    assert target_steps[0]["cache_len"][0] == 0 and target_steps[0]["logits_index"].tolist() == [3]  # prefill
    verify = target_steps[1]
    assert verify["cache_len"][0] == 4 and verify["input_ids"].shape == (1, 8)
    assert not np.array_equal(verify["tree_mask"][0], np.tril(np.ones((8, 8), bool)))  # a real tree, not a chain
    assert verify["past_key_0"].shape[2] == 4  # exactly the committed rows
    assert any(step["tree_mask"].shape[2] > step["tree_mask"].shape[1] for step in draft_steps)  # tree levels


@pytest.mark.slow
def test_fp16_graphs_agree_in_argmax_and_top_k(targets, random_drafts, hf_dirs, draft_dirs, tmp_path_factory):
    artifacts = artifacts_for("llama", targets, random_drafts, tmp_path_factory, "fp16")
    report = validate_artifacts(artifacts, hf_dirs["llama"], draft_dirs["llama"], max_new_tokens=24)
    assert report.passed, report.render()
    tolerance = TOLERANCES["fp16"]
    assert f"target values (atol {tolerance.atol:g}, rtol {tolerance.rtol:g})" in report.render()
    informational = [check for check in report.checks if check.passed is None]
    assert [check.name for check in informational] == ["ORT speculative == PyTorch plain"]


@pytest.mark.slow
def test_bf16_is_reported_as_not_validated_on_cpu(targets, random_drafts, hf_dirs, draft_dirs, tmp_path_factory):
    artifacts = artifacts_for("llama", targets, random_drafts, tmp_path_factory, "bf16")
    report = validate_artifacts(artifacts, hf_dirs["llama"], draft_dirs["llama"])
    assert not report.validated and not report.passed
    assert "no bf16 MatMul kernel" in report.render() and "NOT VALIDATED" in report.render()


def test_argmax_agreement_counts_ties_within_the_tolerance():
    """ONNX Runtime's top-1 agrees when PyTorch ranks it best; in half precision also when its reference value is
    within the tolerance of the best (an exact fp16 tie that the other engine breaks the other way)."""
    from hass_deploy.export.parity import _top1_agreement

    reference = np.array([[[0.0, 2.0, 1.99, 2.0, -1.0]]], dtype=np.float32)  # tokens 1 and 3 tie exactly
    steps = {"onnxruntime": [{"logits": reference + np.eye(5, dtype=np.float32)[i] * 5} for i in (1, 3, 2, 4)],
             "torch": [{"logits": reference}] * 4}
    assert _top1_agreement(steps, "target", 0.0) == 2  # ORT picks 1, 3 (a tie): agree; 2 (0.01 lower): not
    assert _top1_agreement(steps, "target", 3e-2) == 3  # within fp16's tolerance; token 4 never
    draft = {"torch": [{"top_tokens": np.array([[[7, 9, 4]]]), "top_logprobs": np.array([[[-0.5, -0.5, -3.0]]])}] * 3,
             "onnxruntime": [{"top_tokens": np.array([[[t, 0, 0]]])} for t in (9, 4, 8)]}
    assert _top1_agreement(dict(reversed(draft.items())), "draft", 3e-2) == 1  # 9 ties 7; 4 is far; 8 is not ranked


def test_a_tampered_graph_fails_validation(targets, random_drafts, hf_dirs, draft_dirs, tmp_path_factory, tmp_path):
    source = artifacts_for("llama", targets, random_drafts, tmp_path_factory)
    tampered = tmp_path / "tampered"
    shutil.copytree(source, tampered, ignore=shutil.ignore_patterns("cache"))
    model = onnx.load(str(tampered / "target.onnx"))
    # RMSNorm weights are all ones at init, so the exporter keeps one shared initializer for them.
    norm = next(t for t in model.graph.initializer if t.name.endswith("norm.weight"))
    norm.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(norm) * 1.5, norm.name))
    onnx.save(model, str(tampered / "target.onnx"))
    report = validate_artifacts(tampered, hf_dirs["llama"], draft_dirs["llama"], max_new_tokens=8)
    assert not report.passed
    failed = {check.name for check in report.checks if check.passed is False}
    assert "target values (atol 0.0001, rtol 0.001)" in failed
    assert not any(name.startswith("draft") for name in failed)


def test_a_fused_graph_ort_refuses_at_run_time_fails_validation(targets, random_drafts, hf_dirs, draft_dirs,
                                                                monkeypatch, tmp_path):
    """validate runs every graph an export wrote: fused graphs forced onto a head dimension (12) that
    GroupQueryAttention refuses only when a step runs fail in one line each, with ORT's reason, not a traceback."""
    from hass_deploy.export import fused

    monkeypatch.setattr(fused, "unsupported_reason", lambda config: None)
    config = ExportConfig(max_seq_len=256, max_tree_tokens=64, max_top_k=16, prefill_chunk=8)
    exported(tmp_path, "forced", targets["llama"], random_drafts["llama"], config)
    report = validate_artifacts(tmp_path / "forced", hf_dirs["llama"], draft_dirs["llama"], max_new_tokens=8)
    assert not report.passed
    failed = {check.name: check.detail for check in report.checks if check.passed is False}
    assert set(failed) == {"target_ort runs on ONNX Runtime", "draft_ort runs on ONNX Runtime",
                           "fused graphs end to end runs on ONNX Runtime"}
    assert all("GroupQueryAttention" in detail and "\n" not in detail for detail in failed.values())
    assert any(check.name == "target values (atol 0.0001, rtol 0.001)" and check.passed for check in report.checks)


def test_artifacts_of_another_target_are_refused(targets, random_drafts, hf_dirs, draft_dirs, tmp_path_factory):
    artifacts = artifacts_for("llama", targets, random_drafts, tmp_path_factory)
    with pytest.raises(DraftMismatchError, match="another target"):
        validate_artifacts(artifacts, hf_dirs["qwen2"], None)
    with pytest.raises(DraftMismatchError, match="hidden size|another draft|different target"):
        validate_artifacts(artifacts, hf_dirs["llama"], draft_dirs["qwen2"])


def test_int8_draft_is_quantised_informational_in_parity_and_still_lossless(targets, random_drafts, hf_dirs,
                                                                            draft_dirs, tmp_path_factory):
    config = ExportConfig(max_seq_len=256, max_tree_tokens=64, max_top_k=16, prefill_chunk=8, draft_quantization="int8")
    artifacts = exported(tmp_path_factory.getbasetemp() / "onnx", "llama-int8-draft", targets["llama"],
                         random_drafts["llama"], config)
    from hass_deploy.manifest import read_manifest

    manifest = read_manifest(artifacts)
    spec = manifest.graphs["draft"]
    assert manifest.draft_quantization == "int8" and spec.file == "draft.int8.onnx"
    assert not (artifacts / "draft.onnx").exists()
    assert any(op.endswith("MatMulInteger") for op in spec.operators)
    report = validate_artifacts(artifacts, hf_dirs["llama"], draft_dirs["llama"], max_new_tokens=24)
    assert report.passed, report.render()
    draft_checks = [c for c in report.checks if c.name.startswith("draft")]
    assert draft_checks and all(c.passed is None and "[int8 draft]" in c.name for c in draft_checks)
    # Lossless whatever the draft proposes: speculative output is checked against PyTorch plain, token for token.
    assert all(c.passed is True for c in report.checks if c.name.startswith("ORT"))


def test_export_config_refuses_an_opset_below_the_exporters_floor():
    from hass_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="--opset must be >= 18"):
        ExportConfig(opset=17)


def test_int8_needs_an_fp32_export():
    from hass_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="--dtype fp32"):
        ExportConfig(dtype="fp16", draft_quantization="int8")
    with pytest.raises(ConfigError, match="must be one of int8"):
        ExportConfig(draft_quantization="int4")
