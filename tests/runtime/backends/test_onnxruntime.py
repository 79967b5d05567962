"""What is particular to the ONNX Runtime backend (the step contract it shares with every backend is
`test_contract.py`'s): prompt-lookup trees through it and the export's tree budget, staging buffers that follow
the largest step, one-line errors for artifacts that do not fit the models or the request, the CUDA and TensorRT providers
(skipped without a GPU) and the TensorRT provider's shape ranges, and the missing-extra message."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import make_decoder
from ort_artifacts import CONFIG, LazyExports
from runtime.test_decoder import greedy, prompt, repetitive_prompt
from hass_deploy.config import GenerationConfig, LookupConfig, RuntimeConfig, TreeConfig
from hass_deploy.generation import Pipeline
from hass_deploy.models.checkpoint import init_draft
from hass_deploy.errors import CacheCapacityError, ConfigError, DraftMismatchError, HassDeployError
from hass_deploy.runtime.backends import open_backends
from hass_deploy.runtime.decoder import SpeculativeDecoder


@pytest.fixture(scope="session")
def artifacts(targets, random_drafts, tmp_path_factory):
    """arch -> artifacts directory (target + draft graphs, fp32), exported on first use."""
    return LazyExports(tmp_path_factory.getbasetemp() / "onnx", targets, random_drafts)


def ort(target, draft, artifacts_dir, max_len=256, tree=TreeConfig()):
    return open_backends("onnxruntime", target, draft, max_len, tree.draft_rows, artifacts_dir)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # exported for other tests already
def test_lookup_greedy_is_token_identical_to_torch(arch, targets, random_drafts, artifacts):
    """Prompt-lookup trees through the exported target graph: with no draft backend, and with the exported draft
    open but unused; a 21-token prompt (chunked prefill) and 48 new tokens (a re-layout of the bound KV view)."""
    target = targets[arch]
    ids = repetitive_prompt(seed=5)
    ort_target, ort_draft = ort(target, random_drafts[arch], artifacts[arch])
    reference = make_decoder(target).generate(ids, greedy(max_new_tokens=48, eos=())).output_ids
    for lookup in (LookupConfig(), LookupConfig(tokens=12, depth=2, max_ngram=2)):
        config = replace(greedy(max_new_tokens=48, eos=()), lookup=lookup)
        alone = SpeculativeDecoder(ort_target, None).generate(ids, config)
        over_draft = SpeculativeDecoder(ort_target, ort_draft).generate(ids, config)
        assert alone.output_ids == over_draft.output_ids == reference, lookup
        assert sum(alone.accept_lengths) > 0, "lookup should propose and get tokens accepted"


def test_lookup_through_the_python_api_and_the_exports_tree_budget(targets, hf_dirs, artifacts):
    """`Pipeline` without a draft on an export: lookup decodes like plain decoding; a lookup tree larger than the
    export's verify-step budget is refused up front, at load and at the request, never mid-generation."""
    runtime = RuntimeConfig(backend="onnxruntime")
    lookup = LookupConfig()
    pipe = Pipeline.load(hf_dirs["llama"], None, runtime, GenerationConfig(lookup=lookup), artifacts["llama"])
    assert pipe.decoder.draft is None
    ids = repetitive_prompt(seed=5)
    plain = pipe.generate(ids, GenerationConfig(max_new_tokens=24))
    looked_up = pipe.generate(ids, GenerationConfig(max_new_tokens=24, lookup=lookup))
    assert looked_up.output_ids == plain.output_ids and sum(looked_up.accept_lengths) > 0
    too_big = GenerationConfig(lookup=LookupConfig(tokens=CONFIG.max_tree_tokens + 1))
    with pytest.raises(ConfigError, match=r"--lookup-tokens 65 .*tree budget \(64\)"):
        Pipeline.load(hf_dirs["llama"], None, runtime, too_big, artifacts["llama"])
    with pytest.raises(ConfigError, match=r"--lookup-tokens 65 .*tree budget \(64\)"):
        pipe.generate(ids, too_big)


def test_step_buffers_follow_the_largest_step_not_the_number_of_shapes(targets, artifacts):
    """Prompts of many lengths (a chunked prefill ends in a different chunk each time) reuse the same staging
    buffers, and every shape's plan still reads and writes the right rows: each generation equals torch's."""
    target = targets["qwen2"]
    ort_target, _ = ort(target, None, artifacts["qwen2"])
    decoder, reference = SpeculativeDecoder(ort_target, None), make_decoder(target)
    config = greedy(TreeConfig(), max_new_tokens=6, eos=())
    for length in (3, 21, 5, 14, 9, 2, 17):  # the prefill chunk is 8: last chunks of 3, 5, 6, 1, 2, 1 rows
        ids = prompt(length, seed=300 + length)
        assert decoder.generate(ids, config).output_ids == reference.generate(ids, config).output_ids
    staging = ort_target.stepper.staging
    sizes = {name: buffer.numel() for name, buffer in staging.buffers.items()}
    hidden = target.module.config.hidden_size
    # The largest step is one chunk of 8 rows; a grow-only buffer at most doubles past what it needs.
    assert sizes["out:hidden"] <= 2 * 8 * hidden and sizes["input_ids"] <= 2 * 8
    assert staging.allocations <= 2 * len(sizes)


def test_bad_requests_are_one_line_errors(targets, random_drafts, artifacts, hf_dirs):
    target, draft = targets["llama"], random_drafts["llama"]
    with pytest.raises(CacheCapacityError, match="S_max"):
        ort(target, draft, artifacts["llama"], max_len=CONFIG.max_seq_len + 1)
    with pytest.raises(DraftMismatchError, match="another target"):
        ort(targets["qwen2"], None, artifacts["llama"])
    with pytest.raises(DraftMismatchError, match="another draft"):
        ort(target, init_draft(target, seed=99), artifacts["llama"])
    with pytest.raises(HassDeployError, match="needs --artifacts"):
        ort(target, draft, None)
    with pytest.raises(HassDeployError, match="not an export"):
        ort(target, draft, hf_dirs["llama"])
    ort_target, ort_draft = ort(target, draft, artifacts["llama"])
    with pytest.raises(ConfigError, match="tree budget"):
        ort_target.step(torch.zeros(1, 65, dtype=torch.long), torch.zeros(1, 65, dtype=torch.long), 0,
                        torch.ones(1, 65, 65, dtype=torch.bool))
    with pytest.raises(ConfigError, match="top-k"):
        ort_draft.step(torch.zeros(1, 1, 48), torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                       0, None, top_k=17)


@pytest.mark.gpu
@pytest.mark.parametrize("provider", ["auto", "tensorrt"])
def test_cuda_providers_decode_like_torch(provider, targets, random_drafts, artifacts):
    """IO binding of torch CUDA tensors by pointer, with ORT's CUDA provider or its TensorRT provider first (engines
    for the export's shape range); runs only where a GPU and onnxruntime-gpu (with TensorRT) exist."""
    import onnxruntime

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    wanted = "TensorrtExecutionProvider" if provider == "tensorrt" else "CUDAExecutionProvider"
    if wanted not in onnxruntime.get_available_providers():
        pytest.skip(f"this onnxruntime has no {wanted} (pip install onnxruntime-gpu; TensorRT for its provider)")
    target, tree = targets["llama"], TreeConfig(tokens=8, depth=3, top_k=2)
    ort_target, ort_draft = open_backends("onnxruntime", target, random_drafts["llama"], 128, tree.draft_rows,
                                          artifacts["llama"], device="cuda", ort_graphs="standard",
                                          ort_provider=provider)
    assert ort_target.stepper.session.get_providers()[0] == wanted
    ids = prompt(11, seed=4)
    config = greedy(tree, max_new_tokens=24, eos=())
    result = SpeculativeDecoder(ort_target, ort_draft).generate(ids, config)
    assert ort_target.stepper.kv.storage.is_cuda
    assert result.output_ids == make_decoder(target).generate(ids, config).output_ids


def test_tensorrt_provider_options_span_the_exports_profiles(artifacts, tmp_path):
    """One explicit shape range per graph, from a decode step to the largest step, for every dynamic input (ORT
    rebuilds engines for shapes outside the range it was given), and the engines cached in the artifacts."""
    from hass_deploy.manifest import profile_shapes, profiles, read_manifest
    from hass_deploy.runtime.backends.onnxruntime import OrtConfig, tensorrt_options

    manifest = read_manifest(artifacts["llama"])
    spec = manifest.graphs["target"]
    options = tensorrt_options(spec, [profile_shapes(spec, p) for p in profiles(manifest)], tmp_path)
    ranges = {key: dict(item.split(":") for item in options[f"trt_profile_{key}_shapes"].split(","))
              for key in ("min", "opt", "max")}
    dynamic = {t.name for t in spec.inputs if any(isinstance(d, str) for d in t.shape)}
    assert all(set(shapes) == dynamic for shapes in ranges.values())
    largest = max(CONFIG.max_tree_tokens, CONFIG.prefill_chunk)
    assert ranges["min"]["input_ids"] == "1x1" and ranges["max"]["input_ids"] == f"1x{largest}"
    assert ranges["max"]["past_key_0"].split("x")[2] == str(CONFIG.max_seq_len)
    assert options["trt_engine_cache_path"].startswith(str(tmp_path))
    with pytest.raises(ConfigError, match="TensorRT provider runs on an NVIDIA GPU"):
        OrtConfig(provider="tensorrt")  # on the CPU
    with pytest.raises(ConfigError, match="--ort-provider tensorrt runs on an NVIDIA GPU"):
        RuntimeConfig(backend="onnxruntime", ort_provider="tensorrt")


def test_missing_onnxruntime_names_the_extra(targets, artifacts, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(HassDeployError, match=r"pip install 'hass-deploy\[onnx\]'"):
        ort(targets["llama"], None, artifacts["llama"])
