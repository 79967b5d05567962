"""One target export shared by several drafts' exports (`export/shared.py`): the second export links the first's
target graphs, validates, and decodes exactly as an export of its own; a different target setting is refused."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from hass_deploy.artifacts import Artifacts
from hass_deploy.config import GenerationConfig, RuntimeConfig, TreeConfig
from hass_deploy.errors import ConfigError
from hass_deploy.export.config import ExportConfig
from hass_deploy.export.onnx import export_artifacts
from hass_deploy.export.parity import validate_artifacts
from hass_deploy.generation import Pipeline
from hass_deploy.manifest import read_manifest
from hass_deploy.models.checkpoint import FORMAT_VERSION, DraftMetadata, init_draft, save_draft, target_identity

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# fp32 with int8 drafts: the standard and the fused target graphs are both shared, as in the quickstart.
CONFIG = ExportConfig(max_seq_len=128, max_tree_tokens=8, max_top_k=4, prefill_chunk=16, draft_quantization="int8")
TREE = TreeConfig(tokens=6, depth=3, top_k=2)


@pytest.fixture(scope="module")
def exports(fusable_dirs, fusable_targets, tmp_path_factory):
    base = tmp_path_factory.mktemp("shared-target")
    target = fusable_targets["llama"]
    drafts = {name: save_draft(init_draft(target, seed=seed), base / name,
                               DraftMetadata(FORMAT_VERSION, "random-init", target_identity(target)))
              for name, seed in (("first", 1), ("second", 2))}
    root = fusable_dirs["llama"]
    out = {"first": base / "onnx-first", "shared": base / "onnx-shared", "own": base / "onnx-own"}
    export_artifacts(root, drafts["first"], out["first"], CONFIG)
    lines = []
    export_artifacts(root, drafts["second"], out["shared"], CONFIG, log=lines.append, target_from=out["first"])
    export_artifacts(root, drafts["second"], out["own"], CONFIG)
    return {"target": root, "drafts": drafts, "out": out, "lines": lines, "base": base}


def _outputs(target, draft, artifacts) -> list[list[int]]:
    pipe = Pipeline.load(target, draft, RuntimeConfig(backend="onnxruntime"), GenerationConfig(tree=TREE), artifacts)
    return [pipe.generate(ids, GenerationConfig(tree=TREE, max_new_tokens=24)).output_ids
            for ids in ([3, 1, 4, 1, 5, 9, 2, 6], [7, 7, 8, 1], list(range(20, 50)))]


def test_a_shared_target_export_links_validates_and_decodes_as_its_own(exports):
    first, shared, own = (exports["out"][k] for k in ("first", "shared", "own"))
    assert not any("exporting the target" in line for line in exports["lines"])
    manifest = read_manifest(shared)
    assert set(manifest.graphs) == set(read_manifest(own).graphs) == {"target", "draft", "target_ort", "draft_ort"}
    for name in ("target", "target_ort"):
        linked = shared / manifest.graphs[name].file
        assert linked.stat().st_ino == (first / manifest.graphs[name].file).stat().st_ino  # one file, two names
        assert manifest.graphs[name] == read_manifest(own).graphs[name]
    assert manifest.draft == read_manifest(own).draft and manifest.target_settings == read_manifest(own).target_settings
    report = validate_artifacts(shared, exports["target"], exports["drafts"]["second"], max_new_tokens=12)
    assert report.passed, report.render()
    expected = _outputs(exports["target"], exports["drafts"]["second"], own)
    assert _outputs(exports["target"], exports["drafts"]["second"], shared) == expected
    # The source replaced or deleted: the shared export keeps its files.
    copy = exports["base"] / "first-copy"
    shutil.copytree(first, copy)
    shutil.rmtree(first)
    try:
        Artifacts.open(shared)
        assert _outputs(exports["target"], exports["drafts"]["second"], shared) == expected
    finally:
        copy.rename(first)


def test_another_target_setting_is_refused_in_one_line(exports, tmp_path):
    with pytest.raises(ConfigError, match=r"--target-from .*\(max_seq_len differ\)"):
        export_artifacts(exports["target"], exports["drafts"]["second"], tmp_path / "out",
                         replace(CONFIG, max_seq_len=96), target_from=exports["out"]["first"])
    assert not (tmp_path / "out").exists()
    # The draft's settings are its own: another top-k still shares the target graphs.
    manifest = export_artifacts(exports["target"], exports["drafts"]["second"], tmp_path / "k2",
                                replace(CONFIG, max_top_k=2), target_from=exports["out"]["first"])
    assert manifest.max_top_k == 2


def test_cli_export_target_from(exports, tmp_path):
    from typer.testing import CliRunner

    from hass_deploy.cli import app

    out = tmp_path / "cli"
    args = ["export", "--target", exports["target"], "--draft", exports["drafts"]["second"], "--out", out,
            "--target-from", exports["out"]["first"], "--max-seq-len", 128, "--max-tree-tokens", 8, "--max-top-k", 4,
            "--prefill-chunk", 16, "--draft-quantization", "int8"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "linking the target graphs of" in result.output
    assert (out / "target.onnx").stat().st_ino == (exports["out"]["first"] / "target.onnx").stat().st_ino
    result = CliRunner().invoke(app, [str(96 if a == 128 else a) for a in args] + ["--force"])
    assert result.exit_code == 1 and "error: --target-from" in result.output and "max_seq_len" in result.output
