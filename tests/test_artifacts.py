"""`Artifacts`: an export opened once, what it holds, and its one-line refusals of models and requests that do not
fit it; `Pipeline.load` reads the manifest once, and not at all when given the export opened already."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from ort_artifacts import CONFIG, LazyExports
from hass_deploy import artifacts as artifacts_module
from hass_deploy.artifacts import Artifacts
from hass_deploy.config import GenerationConfig, LookupConfig, RuntimeConfig, TreeConfig
from hass_deploy.errors import CacheCapacityError, ConfigError, DraftMismatchError, HassDeployError, ModelLoadError
from hass_deploy.generation import Pipeline
from hass_deploy.manifest import profiles
from hass_deploy.models.checkpoint import init_draft


@pytest.fixture(scope="session")
def artifacts(targets, random_drafts, tmp_path_factory):
    """arch -> artifacts directory (target + draft graphs, fp32), exported on first use (shared with the backend
    tests: the same directories)."""
    return LazyExports(tmp_path_factory.getbasetemp() / "onnx", targets, random_drafts)


def test_open_answers_what_the_export_holds(artifacts):
    exported = Artifacts.open(artifacts["llama"])
    assert exported.directory == artifacts["llama"]
    assert (exported.dtype, exported.max_seq_len, exported.max_tree_tokens, exported.max_top_k) == (
        "fp32", CONFIG.max_seq_len, CONFIG.max_tree_tokens, CONFIG.max_top_k)
    assert exported.has_draft
    assert exported.profiles == profiles(exported.manifest)
    # TINY's head_dim (12) is not one ORT's GroupQueryAttention runs: the standard graphs only.
    assert not exported.has_fused
    assert exported.graph("target") == "target" and exported.graph("draft", "standard") == "draft"
    with pytest.raises(ConfigError, match="no fused ONNX Runtime target graph"):
        exported.graph("target", "fused")
    graphs = exported.manifest.graphs
    fused = Artifacts(exported.directory, replace(exported.manifest, graphs={**graphs, "target_ort": graphs["target"]}))
    assert fused.has_fused and fused.graph("target") == "target_ort" and fused.graph("target", "standard") == "target"


def test_open_refuses_what_is_not_an_export(hf_dirs, tmp_path):
    with pytest.raises(ModelLoadError, match="no such artifacts directory"):
        Artifacts.open(tmp_path / "nothing")
    with pytest.raises(ModelLoadError, match="not an export"):
        Artifacts.open(hf_dirs["llama"])


def test_models_of_another_export_are_refused(targets, random_drafts, artifacts):
    exported = Artifacts.open(artifacts["llama"])
    exported.check_target(targets["llama"])
    exported.check_draft(random_drafts["llama"])
    exported.check_draft(None)  # no draft: the target graph alone runs
    with pytest.raises(DraftMismatchError, match=f"exported from another target than {re.escape(str(targets['qwen2'].path))} "):
        exported.check_target(targets["qwen2"])
    with pytest.raises(DraftMismatchError, match="another draft than the given draft"):
        exported.check_draft(init_draft(targets["llama"], seed=99))
    with pytest.raises(DraftMismatchError, match="another draft than drafts/other"):
        exported.check_draft(init_draft(targets["llama"], seed=99), "drafts/other")
    target_only = Artifacts(exported.directory, replace(exported.manifest, draft=None))
    assert not target_only.has_draft
    with pytest.raises(ConfigError, match="hold no draft graph .*--no-draft"):
        target_only.check_draft(random_drafts["llama"])


def test_requests_outside_the_envelope_are_refused(artifacts):
    exported = Artifacts.open(artifacts["llama"])
    exported.check_request(CONFIG.max_seq_len)
    with pytest.raises(CacheCapacityError, match=r"--max-seq-len 257 is more than the artifacts' S_max \(256\)"):
        exported.check_request(CONFIG.max_seq_len + 1)
    wide = GenerationConfig(tree=TreeConfig(tokens=CONFIG.max_tree_tokens + 1, top_k=CONFIG.max_top_k + 1))
    exported.check_request(64, wide, with_draft=False)  # no draft: the draft tree never runs
    with pytest.raises(ConfigError, match=r"--tree-tokens 65 is more than the artifacts' tree budget \(64\)"):
        exported.check_request(64, wide, with_draft=True)
    with pytest.raises(ConfigError, match=r"--tree-top-k 17 is more than the draft graph's top-k \(16\)"):
        exported.check_request(64, GenerationConfig(tree=TreeConfig(top_k=CONFIG.max_top_k + 1)), with_draft=True)
    with pytest.raises(ConfigError, match=r"--lookup-tokens 65 is more than the artifacts' tree budget \(64\)"):
        exported.check_request(64, GenerationConfig(lookup=LookupConfig(tokens=CONFIG.max_tree_tokens + 1)))


def test_the_precision_is_the_exports(artifacts):
    exported = Artifacts.open(artifacts["llama"])
    exported.check_dtype("fp32")
    with pytest.raises(HassDeployError, match="the artifacts are fp32: their precision is fixed at export"):
        exported.check_dtype("fp16")


def test_pipeline_reads_the_manifest_once(hf_dirs, artifacts, monkeypatch):
    reads = []
    read = artifacts_module.read_manifest
    monkeypatch.setattr(artifacts_module, "read_manifest", lambda directory: reads.append(directory) or read(directory))
    runtime = RuntimeConfig(backend="onnxruntime")
    Pipeline.load(hf_dirs["llama"], None, runtime, GenerationConfig(), artifacts["llama"])
    assert reads == [artifacts["llama"]]
    opened = Artifacts.open(artifacts["llama"])
    reads.clear()
    pipe = Pipeline.load(hf_dirs["llama"], None, runtime, GenerationConfig(), opened)
    assert reads == [] and pipe.max_seq_len == CONFIG.max_seq_len
