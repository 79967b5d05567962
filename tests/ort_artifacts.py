"""Tiny exported artifacts for the export, validation and ONNX Runtime backend tests, exported once per session.

A prefill chunk of 8 rows makes every prompt longer than 8 tokens exercise chunked prefill, and generations
past 64 rows exercise the re-layout of the bound KV view (`runtime.kv.MIN_BOUND_ROWS`). The fused graphs come with
their batched variants of 3 sequences a run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hass_deploy.export.config import ExportConfig
from hass_deploy.manifest import MANIFEST_FILE
from hass_deploy.export.onnx import export_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# Batched fused graphs of 3 sequences a run (--ort-batch): serving's batched steps, and their validation.
CONFIG = ExportConfig(max_seq_len=256, max_tree_tokens=64, max_top_k=16, prefill_chunk=8, ort_batch=3)
# The GGUF's own 4-bit blocks in the fused target graph (a converted GGUF target), an int8 draft graph beside it.
INT4 = ExportConfig(**{**CONFIG.__dict__, "target_quantization": "int4", "draft_quantization": "int8"})


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


class Int4Exports(dict):
    """variant of `q4_ggufs` -> (target, draft, artifacts exported with INT4), exported on first use."""

    def __init__(self, base: Path, ggufs):
        super().__init__()
        self.base, self.ggufs = base, ggufs

    def __missing__(self, variant):
        from hass_deploy.models.checkpoint import init_draft
        from hass_deploy.models.loading import load_target

        target = load_target(self.ggufs[variant][1])
        draft = init_draft(target, seed=7)
        self[variant] = target, draft, exported(self.base, f"{variant}-int4", target, draft, INT4)
        return self[variant]


class TrtExports(LazyExports):
    """arch -> artifacts with the standard graphs and their TensorRT plans (needs TensorRT and a GPU)."""

    def __missing__(self, arch):
        from dataclasses import replace

        from hass_deploy.export.tensorrt import build_engines

        out = self.base / f"{arch}-trt"
        manifest = export_onnx(self.targets[arch], self.drafts[arch], out, replace(CONFIG, engine="trt", ort_batch=0), force=True)
        build_engines(out, manifest).write(out)
        self[arch] = out
        return out


class OrtEngine:
    """Stands in for `runtime.backends.tensorrt._Engine` on a CPU: the same `run(profile, inputs, outputs)`, computed
    by ONNX Runtime on the standard graph TensorRT would build its plan from. It checks every dynamic input against
    the optimisation profile the backend chose (what TensorRT would refuse), so that everything around the TensorRT
    calls (profile choice, padding, staging, outputs, KV writes) runs in the contract suite here."""

    def __init__(self, artifacts: Path, graph: str):
        import torch

        from hass_deploy.manifest import profile_shapes, profiles, read_manifest
        from hass_deploy.runtime.backends.onnxruntime import OrtConfig, open_session

        manifest = read_manifest(artifacts)
        self.artifacts, self.graph, self.device = artifacts, graph, torch.device("cpu")
        spec = manifest.graphs[graph]
        # The backend's own session settings (ORT's one process-wide thread pool, which other tests have made).
        self.session = open_session(artifacts / spec.file, self.device, OrtConfig(cache_optimized=False))
        self.names = [output.name for output in self.session.get_outputs()]
        self.profiles = [profile_shapes(spec, profile) for profile in profiles(manifest)]
        self.runs = 0

    def fork(self) -> "OrtEngine":
        return OrtEngine(self.artifacts, self.graph)

    def run(self, profile, inputs, outputs):
        import torch

        for name, (low, _, high) in self.profiles[profile].items():
            shape = tuple(inputs[name].shape)
            assert all(lo <= d <= hi for lo, d, hi in zip(low, shape, high)), (name, shape, profile, low, high)
        results = self.session.run(self.names, {name: value.numpy() for name, value in inputs.items()})
        self.runs += 1
        views = {}
        for name, value in zip(self.names, results):
            views[name] = outputs.view(name, value.shape)
            views[name].copy_(torch.from_numpy(value))
        return views
