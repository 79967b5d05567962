"""The prepared GPU check (benchmarks/gpu_check.py) runs end to end: here on the CPU with the tiny preset and a
small widened shape, so that a session lent a GPU spends its minutes on the GPU, not on the script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_runs_every_stage_on_a_cpu(tmp_path):
    command = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device", "cpu", "--preset", "tiny",
               "--wide", "256,704,4", "--tree", "6,3,2", "--prompts", "2", "--new-tokens", "16",
               "--train-records", "24", "--budget-s", "1500"]  # every stage, however busy the CPU
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {stage["stage"]: stage["status"] for stage in result["stages"]}
    # TensorRT's stage runs where it is installed; here it says why it did not.
    assert status == {"env": "ok", "gpu-tests": "ok", "quickstart": "ok", "identity": "ok", "training": "ok",
                      "widen": "ok", "bench-wide": "ok", "tensorrt": "skipped"}, result["stages"]
    stages = {stage["stage"]: stage for stage in result["stages"]}
    assert stages["identity"]["fp32"]["identical"] == stages["identity"]["fp32-eager"]["identical"] == "2/2"
    assert "TensorRT is not installed" in stages["tensorrt"]["reason"]
    # data and a short HASS training through the CLI, then the new draft lossless (auto: an fp32 target on a CPU)
    assert stages["training"]["identity"]["identical"] == "2/2" and stages["training"]["compute_dtype"] == "fp32"
    assert stages["widen"]["shape"] == [256, 704, 4] and stages["widen"]["dtype"] == "bf16"
    assert {"plain", "draft", "baseline"} <= set(stages["bench-wide"]["methods"])
    assert "| bench-wide | ok |" in (tmp_path / "gpu_check.md").read_text()
