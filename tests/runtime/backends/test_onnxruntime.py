"""The ONNX Runtime backend is a drop-in for the torch backend: greedy output token-identical to the torch
backend and to `transformers` for every architecture and several tree shapes, with draft and prompt-lookup trees,
into the cache capacity; the KV buffers hold exactly the committed context; the bound KV view grows without losing
rows; bad requests get one line; the CUDA path skips cleanly without a GPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import ARCHITECTURES, OracleDraft, make_decoder
from ort_artifacts import CONFIG, LazyExports, exported
from runtime.test_decoder import greedy, hf_greedy, prompt, repetitive_prompt
from hass_deploy.config import GenerationConfig, LookupConfig, RuntimeConfig, TreeConfig
from hass_deploy.generation import Pipeline
from hass_deploy.models.checkpoint import init_draft
from hass_deploy.errors import CacheCapacityError, ConfigError, DraftMismatchError, HassDeployError
from hass_deploy.runtime.backends import open_backends
from hass_deploy.runtime.backends.onnxruntime import OrtTarget
from hass_deploy.runtime.backends.torch import TorchTarget
from hass_deploy.runtime.decoder import SpeculativeDecoder

TREES = {
    "chain": TreeConfig(tokens=5, depth=4, top_k=1),
    "wide": TreeConfig(tokens=12, depth=2, top_k=8),
    "deep": TreeConfig(tokens=16, depth=8, top_k=2),
    "paper": TreeConfig(tokens=60, depth=6, top_k=10),
}


@pytest.fixture(scope="session")
def artifacts(targets, random_drafts, tmp_path_factory):
    """arch -> artifacts directory (target + draft graphs, fp32), exported on first use."""
    return LazyExports(tmp_path_factory.getbasetemp() / "onnx", targets, random_drafts)


def ort(target, draft, artifacts_dir, max_len=256, tree=TreeConfig()):
    return open_backends("onnxruntime", target, draft, max_len, tree.draft_rows, artifacts_dir)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_is_token_identical_to_torch_and_transformers(arch, targets, random_drafts, hf_models, artifacts):
    target = targets[arch]
    for shape, tree in TREES.items():
        ort_target, ort_draft = ort(target, random_drafts[arch], artifacts[arch], tree=tree)
        for length in (3, 21):  # 21 > the prefill chunk of 8: a chunked prefill
            ids = prompt(length, seed=200 + length)
            config = greedy(tree, max_new_tokens=48, eos=())
            reference = make_decoder(target).generate(ids, config).output_ids
            spec = SpeculativeDecoder(ort_target, ort_draft).generate(ids, config)
            plain = SpeculativeDecoder(ort_target, None).generate(ids, config)
            guided = SpeculativeDecoder(ort_target, OracleDraft(target, ids[0], 256 + tree.draft_rows, noise=0.3,
                                                                seed=length)).generate(ids, config)
            assert spec.output_ids == plain.output_ids == guided.output_ids == reference, (shape, length)
            assert reference == hf_greedy(hf_models[arch], ids, 48)
            if tree.tokens > 2 and tree.depth > 1:
                assert max(guided.accept_lengths) >= 2, "the oracle should get multi-token acceptances"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_generation_runs_into_cache_capacity(arch, targets, random_drafts, artifacts):
    """S_max rows at runtime may be fewer than exported; the last trees shrink to fit, as on torch."""
    target, tree, max_len = targets[arch], TreeConfig(tokens=8, depth=4, top_k=3), 29
    ids = prompt(9, seed=3)
    config = greedy(tree, max_new_tokens=500, eos=())
    reference = make_decoder(target, max_len=max_len).generate(ids, config)
    ort_target, ort_draft = ort(target, random_drafts[arch], artifacts[arch], max_len=max_len, tree=tree)
    spec = SpeculativeDecoder(ort_target, ort_draft).generate(ids, config)
    oracle = OracleDraft(target, ids[0], max_len + tree.draft_rows)
    guided = SpeculativeDecoder(ort_target, oracle).generate(ids, config)
    assert len(reference.output_ids) == max_len - len(ids) + 1
    assert spec.output_ids == guided.output_ids == reference.output_ids
    assert spec.stop_reason == guided.stop_reason == "cache_full"


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


class CheckedOrtTarget(OrtTarget):
    """Checks at every step that KV rows [0, cache_len) equal a fresh torch prefill of the committed tokens."""

    def __init__(self, inner: OrtTarget, module, committed: list[int]):
        self.__dict__.update(inner.__dict__)
        self.module, self.committed, self.checks = module, committed, 0

    def step(self, input_ids, position_ids, cache_len, tree_mask, last_only=False):
        if cache_len > 0:
            reference = TorchTarget(self.module, cache_len)
            reference.step(torch.tensor([self.committed[:cache_len]]), torch.arange(cache_len)[None], 0, None)
            view = self.stepper.kv.view()  # [L, 2, 1, H_kv, S_b, D]
            torch.testing.assert_close(view[:, 0, :, :, :cache_len], reference.kv.keys[:, :, :, :cache_len],
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(view[:, 1, :, :, :cache_len], reference.kv.values[:, :, :, :cache_len],
                                       atol=1e-5, rtol=1e-5)
            self.checks += 1
        return super().step(input_ids, position_ids, cache_len, tree_mask, last_only)


def test_kv_buffers_hold_exactly_the_committed_context(targets, artifacts):
    """Across chunked prefill, tree verification, compaction and a re-layout of the bound view (64 -> 128 rows)."""
    target, tree = targets["qwen2"], TreeConfig(tokens=10, depth=4, top_k=3)
    ids = prompt(20, seed=5)
    committed = list(ids)
    ort_target, _ = ort(target, None, artifacts["qwen2"], tree=tree)
    checked = CheckedOrtTarget(ort_target, target.module, committed)
    decoder = SpeculativeDecoder(checked, OracleDraft(target, ids[0], 256 + tree.draft_rows, noise=0.3))
    result = decoder.generate(ids, greedy(tree, max_new_tokens=70, eos=()), on_tokens=committed.extend)
    assert checked.checks == result.rounds and checked.stepper.kv.rows == 128
    assert any(a > 0 for a in result.accept_lengths)


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


def test_outputs_follow_the_step_contract(targets, random_drafts, artifacts):
    target, draft = targets["llama"], random_drafts["llama"]
    ort_target, ort_draft = ort(target, draft, artifacts["llama"])
    torch_target = TorchTarget(target.module, 256)
    ids = torch.tensor([prompt(12, seed=1)])
    out = ort_target.step(ids, torch.arange(12)[None], 0, None, last_only=True)
    reference = torch_target.step(ids, torch.arange(12)[None], 0, None, last_only=True)
    assert out.logits.shape == (1, 1, 96) and out.hidden.shape == (1, 12, 48)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.hidden, reference.hidden, atol=1e-4, rtol=1e-4)
    mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)  # root with two children
    tree_ids, positions = torch.tensor([[5, 6, 7]]), torch.tensor([[12, 13, 13]])
    out = ort_target.step(tree_ids, positions, 12, mask)
    reference = torch_target.step(tree_ids, positions, 12, mask)
    assert out.logits.shape == (1, 3, 96)
    torch.testing.assert_close(out.logits, reference.logits, atol=1e-4, rtol=1e-4)
    drafted = ort_draft.step(out.hidden, torch.tensor([[1, 2, 3]]), torch.arange(3)[None], 0, None, top_k=4)
    assert drafted.logprobs.shape == drafted.tokens.shape == (1, 3, 4)
    assert drafted.tokens.dtype == torch.int64 and bool((drafted.logprobs[..., :-1] >= drafted.logprobs[..., 1:]).all())


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


def test_cuda_execution_provider_binds_torch_cuda_tensors(targets, random_drafts, artifacts):
    """IO binding of torch CUDA tensors by pointer; runs only where a GPU and onnxruntime-gpu exist."""
    import onnxruntime

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu)")
    target, tree = targets["llama"], TreeConfig(tokens=8, depth=3, top_k=2)
    ort_target, ort_draft = open_backends("onnxruntime", target, random_drafts["llama"], 128, tree.draft_rows,
                                          artifacts["llama"], device="cuda")
    ids = prompt(11, seed=4)
    config = greedy(tree, max_new_tokens=24, eos=())
    result = SpeculativeDecoder(ort_target, ort_draft).generate(ids, config)
    assert ort_target.stepper.kv.storage.is_cuda
    assert result.output_ids == make_decoder(target).generate(ids, config).output_ids


def test_missing_onnxruntime_names_the_extra(targets, artifacts, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(HassDeployError, match=r"pip install 'hass-deploy\[onnx\]'"):
        ort(targets["llama"], None, artifacts["llama"])
