"""Bad input as a user sees it: the whole process's output, file descriptors included, so that what libraries print
around our one `error:` line (torch.onnx's registration notes, ORT's native log, a warning) counts too. CliRunner
sees only what Python writes through sys.stdout/sys.stderr; these run the console script in a subprocess."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from hass_deploy.models.checkpoint import DraftMetadata, FORMAT_VERSION, save_draft, target_identity

MAX_LINES = 3
SCRIPT = "from hass_deploy.cli import main; main()"


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def few_lines(result: subprocess.CompletedProcess, fragment: str) -> list[str]:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 1, (result.returncode, lines)
    assert len(lines) <= MAX_LINES, lines
    assert lines[-1].startswith("error: ") and fragment in lines[-1], lines
    assert not any("Traceback" in line or "torchvision" in line for line in lines), lines
    return lines


@pytest.fixture(scope="module")
def draft_of_qwen2(targets, random_drafts, tmp_path_factory):
    return save_draft(random_drafts["qwen2"], tmp_path_factory.mktemp("qwen2-draft"),
                      DraftMetadata(FORMAT_VERSION, "random-init", target_identity(targets["qwen2"])))


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs the onnx extra")
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_export_trt_without_tensorrt_prints_at_most_three_lines(hf_dirs, tmp_path):
    lines = few_lines(run_cli("export", "--target", hf_dirs["llama"], "--no-draft", "--out", tmp_path / "out",
                              "--engine", "trt", "--max-seq-len", 64, "--max-tree-tokens", 8), "needs TensorRT")
    assert (tmp_path / "out" / "manifest.json").exists()  # the ONNX graphs are kept, as the line says
    assert lines[0].startswith("exporting the target step graph")


def test_bad_input_prints_at_most_three_lines(hf_dirs, draft_of_qwen2, tmp_path):
    target = hf_dirs["llama"]
    generate = ("generate", "--target", target, "--max-new-tokens", 4)
    few_lines(run_cli(*generate, "--no-draft", "--prompt-ids", ",".join(["1"] * 40), "--max-seq-len", 32),
              "longer than")
    few_lines(run_cli(*generate, "--draft", draft_of_qwen2, "--prompt-ids", "1,2,3"), "made for a different target")
    few_lines(run_cli("generate", "--target", tmp_path / "nope", "--no-draft", "--prompt-ids", "1"),
              "no such model directory")
    few_lines(run_cli(*generate, "--no-draft", "--prompt-ids", "1,2", "--dtype", "int3"), "int3")
    few_lines(run_cli(*generate, "--no-draft", "--prompt-ids", "1,2", "--no-such-option"), "--no-such-option")
