"""The TensorRT backend around its TensorRT calls, on a machine without TensorRT or a GPU: the profile a step
uses, the 256-byte-aligned flat buffers sized for the largest step, and one-line refusals for artifacts without
plans or a machine without a GPU. (Its run on a GPU joins the contract suite when one is available.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ort_artifacts import exported
from hass_deploy.artifacts import Artifacts
from hass_deploy.config import RuntimeConfig
from hass_deploy.errors import ConfigError, HassDeployError
from hass_deploy.generation import Pipeline
from hass_deploy.manifest import read_manifest
from hass_deploy.runtime.backends import open_backends
from hass_deploy.runtime.backends.tensorrt import ALIGN_BYTES, AlignedBuffers, buffer_sizes, profile_for


@pytest.fixture(scope="module")
def artifacts(targets, random_drafts, tmp_path_factory):
    return exported(tmp_path_factory.getbasetemp() / "onnx", "llama-fp32", targets["llama"], random_drafts["llama"])


def test_one_row_steps_decode_in_profile_0_the_rest_in_profile_1():
    assert [profile_for(rows) for rows in (1, 2, 8, 64)] == [0, 1, 1, 1]


def test_buffers_start_on_256_byte_boundaries_and_hand_out_exact_views():
    sizes = {"ids": (3, torch.int64), "mask": (5, torch.bool), "hidden": (7, torch.float32), "half": (9, torch.bfloat16)}
    buffers = AlignedBuffers(sizes, torch.device("cpu"))
    base = buffers.storage.data_ptr()
    for name, (numel, dtype) in sizes.items():
        view = buffers.view(name, (1, numel))
        assert (view.data_ptr() - base) % ALIGN_BYTES == 0 and view.is_contiguous() and view.dtype == dtype
    with pytest.raises(HassDeployError, match="larger than its buffer"):
        buffers.view("ids", (2, 2))


def test_buffers_do_not_overlap():
    sizes = {name: (40, torch.float32) for name in ("a", "b", "c")}
    buffers = AlignedBuffers(sizes, torch.device("cpu"))
    for value, name in enumerate(sizes):
        buffers.view(name, (40,)).fill_(float(value))
    assert [buffers.view(name, (40,)).unique().tolist() for name in sizes] == [[0.0], [1.0], [2.0]]


def test_every_graph_tensor_but_the_kv_gets_a_buffer_for_the_largest_step(artifacts):
    manifest = read_manifest(artifacts)
    largest = max(manifest.max_tree_tokens, manifest.prefill_chunk)
    for name in ("target", "draft"):
        spec = manifest.graphs[name]
        for tensors in (spec.inputs, spec.outputs):
            sizes = buffer_sizes(tensors, largest, largest + manifest.max_seq_len, torch.float32)
            assert set(sizes) == {t.name for t in tensors if not t.name.startswith("past_")}
    sizes = buffer_sizes(manifest.graphs["target"].outputs, largest, 0, torch.float32)
    assert sizes["logits"] == (largest * manifest.target["vocab_size"], torch.float32)
    draft_inputs = buffer_sizes(manifest.graphs["draft"].inputs, largest, largest + 256, torch.float32)
    assert draft_inputs["tree_mask"] == (largest * (largest + 256), torch.bool)
    assert buffer_sizes(manifest.graphs["draft"].outputs, 4, 0, torch.bfloat16)["top_tokens"][1] == torch.int64


def test_artifacts_without_plans_or_a_machine_without_a_gpu_get_one_line(targets, random_drafts, artifacts):
    target, draft = targets["llama"], random_drafts["llama"]
    with pytest.raises(ConfigError, match="no TensorRT plans: export them with `hass-deploy export --engine trt`"):
        open_backends("tensorrt", target, draft, 128, 8, artifacts, device="cuda")
    manifest = read_manifest(artifacts)
    planned = dataclasses.replace(manifest, tensorrt={"plans": {"target": {"file": "target.plan"},
                                                                "draft": {"file": "draft.plan"}}})
    if not torch.cuda.is_available():
        with pytest.raises(HassDeployError, match="runs on an NVIDIA GPU"):
            open_backends("tensorrt", target, draft, 128, 8, Artifacts(artifacts, planned), device="cuda")
    with pytest.raises(HassDeployError, match="--backend tensorrt needs --artifacts"):
        Pipeline.load(target.path, None, RuntimeConfig(backend="tensorrt", device="cpu"))
