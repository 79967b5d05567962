"""Tiny exported artifacts for the export, validation and ONNX Runtime backend tests, exported once per session.

A prefill chunk of 8 rows makes every prompt longer than 8 tokens exercise chunked prefill, and generations
past 64 rows exercise the re-layout of the bound KV view (`runtime.kv.MIN_BOUND_ROWS`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hass_deploy.export.config import ExportConfig
from hass_deploy.manifest import MANIFEST_FILE
from hass_deploy.export.onnx import export_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CONFIG = ExportConfig(max_seq_len=256, max_tree_tokens=64, max_top_k=16, prefill_chunk=8)


def exported(base: Path, name: str, target, draft, config: ExportConfig = CONFIG) -> Path:
    """Export (target, draft) to base/name unless a previous test already did."""
    out = base / name
    if not (out / MANIFEST_FILE).exists():
        export_onnx(target, draft, out, config, force=True)
    return out


class LazyExports(dict):
    """arch -> artifacts directory, exported on first use (target + draft graphs, CONFIG)."""

    def __init__(self, base: Path, targets, drafts):
        super().__init__()
        self.base, self.targets, self.drafts = base, targets, drafts

    def __missing__(self, arch):
        self[arch] = exported(self.base, f"{arch}-fp32", self.targets[arch], self.drafts[arch])
        return self[arch]


class TrtExports(LazyExports):
    """arch -> artifacts with the standard graphs and their TensorRT plans (needs TensorRT and a GPU)."""

    def __missing__(self, arch):
        from dataclasses import replace

        from hass_deploy.export.tensorrt import build_engines

        out = self.base / f"{arch}-trt"
        manifest = export_onnx(self.targets[arch], self.drafts[arch], out, replace(CONFIG, engine="trt"), force=True)
        build_engines(out, manifest).write(out)
        self[arch] = out
        return out
