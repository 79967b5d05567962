"""`hass-deploy export`, `validate` and `generate --backend onnxruntime` end to end through the CLI, and the rule
that bad input gets one `error:` line and exit code 1."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hass_deploy.cli import app
from hass_deploy.models.checkpoint import DraftMetadata, FORMAT_VERSION, save_draft, target_identity

pytest.importorskip("onnxruntime")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def models(hf_dirs, targets, random_drafts, tmp_path_factory):
    base = tmp_path_factory.mktemp("cli-export")
    draft = save_draft(random_drafts["llama"], base / "draft",
                       DraftMetadata(FORMAT_VERSION, "random-init", target_identity(targets["llama"])))
    return hf_dirs["llama"], draft, base


@pytest.fixture(scope="module")
def artifacts(models):
    target, draft, base = models
    out = base / "artifacts"
    result = invoke("export", "--target", target, "--draft", draft, "--out", out, "--max-seq-len", 128,
                    "--max-tree-tokens", 16, "--prefill-chunk", 8)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    return out


def generate(target, *extra):
    result = invoke("generate", "--target", target, "--prompt-ids", "3,1,4,1,5,9,2,6,5,3", "--max-new-tokens", 20,
                    "--json", "--tree-tokens", 8, "--max-seq-len", 128, *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_export_generate_and_validate(models, artifacts):
    target, draft, _ = models
    reference = generate(target, "--no-draft")["output_ids"]
    speculative = generate(target, "--draft", draft, "--backend", "onnxruntime", "--artifacts", artifacts)
    plain = generate(target, "--no-draft", "--backend", "onnxruntime", "--artifacts", artifacts)
    auto = generate(target, "--draft", draft, "--artifacts", artifacts)  # --backend auto: artifacts -> onnxruntime
    assert speculative["output_ids"] == plain["output_ids"] == auto["output_ids"] == reference
    result = invoke("validate", "--artifacts", artifacts, "--target", target, "--draft", draft, "--max-new-tokens", 12)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("result: PASS") and "draft argmax agreement" in result.stdout


def test_export_errors_are_one_line(models, tmp_path):
    target, draft, base = models
    out = tmp_path / "out"
    one_line_error(invoke("export", "--target", target, "--out", out), "exactly one of --draft DIR or --no-draft")
    one_line_error(invoke("export", "--target", target, "--draft", tmp_path / "nope", "--out", out),
                   "no such draft directory")
    one_line_error(invoke("export", "--target", target, "--draft", draft, "--out", out, "--dtype", "int8"),
                   "unsupported dtype 'int8'")
    one_line_error(invoke("export", "--target", target, "--draft", draft, "--out", out, "--max-seq-len", 32,
                          "--max-tree-tokens", 64), "does not fit S_max = 32")
    one_line_error(invoke("export", "--target", target, "--draft", draft, "--out", out, "--engine", "trt",
                          "--target-quantization", "int8"), "--engine trt builds TensorRT plans")
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    one_line_error(invoke("export", "--target", target, "--draft", draft, "--out", out), "not empty (use --force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_runtime_errors_are_one_line(models, artifacts):
    target, draft, _ = models
    base = ("generate", "--target", target, "--prompt-ids", "1,2,3", "--backend", "onnxruntime")
    one_line_error(invoke(*base, "--draft", draft), "needs --artifacts")
    one_line_error(invoke(*base, "--draft", draft, "--artifacts", artifacts, "--max-seq-len", 4096), "S_max (128)")
    one_line_error(invoke(*base, "--draft", draft, "--artifacts", artifacts, "--tree-tokens", 32), "tree budget (16)")
    one_line_error(invoke(*base, "--no-draft", "--artifacts", artifacts, "--dtype", "fp16"), "the artifacts are fp32")
    one_line_error(invoke("generate", "--target", target, "--no-draft", "--prompt-ids", "1", "--artifacts", artifacts,
                          "--backend", "torch"), "--artifacts is for --backend onnxruntime")
    one_line_error(invoke("validate", "--artifacts", artifacts, "--target", target), "give --draft DIR")
