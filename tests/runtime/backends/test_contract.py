"""The step contract (runtime/backends/base.py), one suite for every backend: a backend is proven by passing it.

Each test runs against PyTorch (eager and static steps), ONNX Runtime's standard graphs and its fused graphs, and on a
GPU against PyTorch with and without CUDA graphs and TensorRT, over the same tiny models
(hidden 64, head_dim 16: what the fused graphs need) and one export per architecture: greedy output
token-identical to `transformers` for every architecture and tree shape, a step's values, the KV rows a
backend holds after chunked prefill, tree steps and compaction, running into the KV capacity, the checks
`step()` makes, `fork()`, and a batched step of several forks' sequences (`step_batch`). A new backend joins by adding
a case to `open_pair`.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import replace

import pytest
import torch

from conftest import ARCHITECTURES, OracleDraft, make_decoder
from runtime.test_decoder import greedy, hf_greedy, prompt
from hass_deploy.config import TreeConfig
from hass_deploy.errors import CacheCapacityError, ConfigError
from hass_deploy.manifest import read_manifest
from hass_deploy.runtime.backends import open_backends
from hass_deploy.runtime.backends.base import DraftSequenceStep, SequenceStep
from hass_deploy.runtime.backends.tensorrt import TrtDraft, TrtTarget
from hass_deploy.runtime.backends.torch import TorchTarget
from hass_deploy.runtime.decoder import SpeculativeDecoder


def _on_gpu(name: str, needs: str | None = None):
    """A case marked `gpu`, skipped where there is no CUDA device (or no `needs` module): benchmarks/gpu_check.sh
    runs these on one."""
    missing = needs is not None and importlib.util.find_spec(needs) is None
    return pytest.param(name, marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available() or missing,
        reason="no CUDA device on this machine" if not missing else f"{needs} is not installed")])


# "torch-static" runs the torch backend's static steps (padded rows, device-side cache_len, KV blocks) as the CUDA
# graphs would replay them, on the CPU. "torch-cuda" is the torch backend on a GPU with its steps captured as CUDA
# graphs, "torch-cuda-eager" without (fp32, so greedy output is still transformers' token for token). "tensorrt" runs
# engines built from the standard graphs (needs TensorRT: not yet run in this project's own testing).
# "tensorrt-ort" is the TensorRT backend with ONNX Runtime standing in for its engine (`ort_artifacts.OrtEngine`):
# everything but the TensorRT calls, padded steps included, on the CPU.
BACKENDS = ("torch", "torch-static", "onnxruntime-standard", "onnxruntime-fused", "tensorrt-ort",
            _on_gpu("torch-cuda"), _on_gpu("torch-cuda-eager"), _on_gpu("tensorrt", needs="tensorrt"))
TREES = {
    "chain": TreeConfig(tokens=5, depth=4, top_k=1),
    "wide": TreeConfig(tokens=12, depth=2, top_k=8),
    "deep": TreeConfig(tokens=16, depth=8, top_k=2),
    "paper": TreeConfig(tokens=60, depth=6, top_k=10),
}
MAX_LEN = 256


@pytest.fixture(scope="session")
def on_cuda(fusable_targets, fusable_drafts):
    """arch -> (the target with its module on the GPU, its draft there), made on first use."""

    class Copies(dict):
        def __missing__(self, arch):
            target = fusable_targets[arch]
            self[arch] = (replace(target, module=copy.deepcopy(target.module).cuda()),
                          copy.deepcopy(fusable_drafts[arch]).cuda())
            return self[arch]

    return Copies()


@pytest.fixture
def open_pair(fusable_targets, fusable_drafts, fused_artifacts, trt_artifacts, on_cuda):
    """open_pair(backend, arch, with_draft, max_len, tree) -> (target backend, draft backend or None)."""

    def opened(backend: str, arch: str, with_draft: bool = True, max_len: int = MAX_LEN,
               tree: TreeConfig = TreeConfig()):
        target, draft = fusable_targets[arch], fusable_drafts[arch] if with_draft else None
        if backend in ("torch", "torch-static"):
            return open_backends("torch", target, draft, max_len, tree.draft_rows,
                                 steps="static" if backend == "torch-static" else "eager")
        if backend.startswith("torch-cuda"):
            target, cuda_draft = on_cuda[arch]
            return open_backends("torch", target, cuda_draft if with_draft else None, max_len, tree.draft_rows,
                                 steps="eager" if backend.endswith("eager") else "graphs")
        if backend == "tensorrt":
            return open_backends("tensorrt", target, draft, max_len, tree.draft_rows, trt_artifacts[arch],
                                 device="cuda")
        if backend == "tensorrt-ort":
            from ort_artifacts import OrtEngine  # imports onnxruntime (or skips)

            artifacts = fused_artifacts[arch]
            manifest = read_manifest(artifacts)
            target_backend = TrtTarget(OrtEngine(artifacts, "target"), manifest, max_len, "static")
            if not with_draft:
                return target_backend, None
            return target_backend, TrtDraft(OrtEngine(artifacts, "draft"), manifest, max_len + tree.draft_rows,
                                            "static")
        if backend.startswith("onnxruntime"):
            pytest.importorskip("onnxruntime")
            return open_backends("onnxruntime", target, draft, max_len, tree.draft_rows, fused_artifacts[arch],
                                 ort_graphs=backend.split("-")[1])
        raise AssertionError(backend)

    return opened


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_is_token_identical_to_transformers(backend, arch, open_pair, fusable_targets):
    """Plain, draft, and oracle-guided trees of four shapes, short and chunked prompts: one output, transformers'."""
    from transformers import AutoModelForCausalLM

    target = fusable_targets[arch]
    hf_model = AutoModelForCausalLM.from_pretrained(target.path, dtype=torch.float32).eval()
    for shape, tree in TREES.items():
        target_backend, draft_backend = open_pair(backend, arch, tree=tree)
        for length in (3, 21):  # 21 > the exports' prefill chunk of 8: a chunked prefill
            ids = prompt(length, seed=200 + length)
            config = greedy(tree, max_new_tokens=48, eos=())
            spec = SpeculativeDecoder(target_backend, draft_backend).generate(ids, config)
            plain = SpeculativeDecoder(target_backend, None).generate(ids, config)
            guided = SpeculativeDecoder(target_backend, OracleDraft(target, ids[0], MAX_LEN + tree.draft_rows,
                                                                    noise=0.3, seed=length)).generate(ids, config)
            assert spec.output_ids == plain.output_ids == guided.output_ids, (shape, length)
            assert plain.output_ids == hf_greedy(hf_model, ids, 48), (shape, length)
            if tree.tokens > 2 and tree.depth > 1:
                assert max(guided.accept_lengths) >= 2, "the oracle should get multi-token acceptances"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_computes_what_pytorch_computes(backend, open_pair, fusable_targets):
    """A chunked prefill (last row's logits only), then a tree step, then draft steps: values and shapes."""
    target = fusable_targets["llama"]
    target_backend, draft_backend = open_pair(backend, "llama")
    reference, on = TorchTarget(target.module, MAX_LEN), target_backend.device
    ids, positions = torch.tensor([prompt(12, seed=1)]), torch.arange(12)[None]
    out = cpu(target_backend.step(ids.to(on), positions.to(on), 0, None, last_only=True))
    expected = reference.step(ids, positions, 0, None, last_only=True)
    vocab, hidden = target.config.vocab_size, target.config.hidden_size
    assert out.logits.shape == (1, 1, vocab) and out.hidden.shape == (1, 12, hidden)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.hidden, expected.hidden, atol=1e-4, rtol=1e-4)
    mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)  # a root with two children
    tree_ids, tree_positions = torch.tensor([[5, 6, 7]]), torch.tensor([[12, 13, 13]])
    out = cpu(target_backend.step(tree_ids.to(on), tree_positions.to(on), 12, mask.to(on)))
    expected = reference.step(tree_ids, tree_positions, 12, mask)
    assert out.logits.shape == (1, 3, vocab)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)
    drafted = cpu(draft_backend.step(out.hidden.to(on), torch.tensor([[1, 2, 3]], device=on),
                                     torch.arange(3, device=on)[None], 0, None, top_k=4))
    assert drafted.hidden.shape == (1, 3, hidden) and drafted.logprobs.shape == drafted.tokens.shape == (1, 3, 4)
    assert drafted.tokens.dtype == torch.int64
    assert bool((drafted.logprobs[..., :-1] >= drafted.logprobs[..., 1:]).all())  # descending


def cpu(output):
    """A backend's output dataclass with every tensor on the CPU (to compare with the CPU reference)."""
    return type(output)(**{name: value.cpu() for name, value in vars(output).items()})


class CheckedTarget:
    """Wraps a target backend; before every step, checks that its KV rows [0, cache_len) equal a fresh PyTorch
    prefill of the tokens committed so far."""

    def __init__(self, inner, module, committed: list[int]):
        self.inner, self.module, self.committed, self.checks = inner, module, committed, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, input_ids, position_ids, cache_len, tree_mask, last_only=False):
        if cache_len > 0:
            reference = TorchTarget(self.module, cache_len)
            reference.step(torch.tensor([self.committed[:cache_len]]), torch.arange(cache_len)[None], 0, None)
            for got, want in zip(self.inner.kv.rows_in_use(cache_len), reference.kv.rows_in_use(cache_len)):
                torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)
            self.checks += 1
        return self.inner.step(input_ids, position_ids, cache_len, tree_mask, last_only)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_buffers_hold_exactly_the_committed_context(backend, open_pair, fusable_targets):
    """Across a chunked prefill, tree verification, compaction and (standard graphs) the bound view's growth."""
    target, tree = fusable_targets["qwen2"], TreeConfig(tokens=10, depth=4, top_k=3)
    ids = prompt(20, seed=5)
    committed = list(ids)
    target_backend, _ = open_pair(backend, "qwen2", with_draft=False, tree=tree)
    checked = CheckedTarget(target_backend, target.module, committed)
    decoder = SpeculativeDecoder(checked, OracleDraft(target, ids[0], MAX_LEN + tree.draft_rows, noise=0.3))
    result = decoder.generate(ids, greedy(tree, max_new_tokens=70, eos=()), on_tokens=committed.extend)
    assert checked.checks == result.rounds and any(a > 0 for a in result.accept_lengths)
    # Standard graphs (ONNX Runtime's, TensorRT's) bind a view that grew past 64 rows; the others the whole buffer.
    assert target_backend.kv.rows == (128 if backend.startswith(("onnxruntime-standard", "tensorrt")) else MAX_LEN)


@pytest.mark.parametrize("arch", ["mistral", "qwen3"])  # a sliding window; q/k norms
@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_runs_into_the_kv_capacity(backend, arch, open_pair, fusable_targets):
    """Fewer KV rows than exported: the last trees shrink to fit, and generation stops at a full cache."""
    target, tree, max_len = fusable_targets[arch], TreeConfig(tokens=8, depth=4, top_k=3), 29
    ids = prompt(9, seed=3)
    config = greedy(tree, max_new_tokens=500, eos=())
    reference = make_decoder(target, max_len=max_len).generate(ids, config)
    target_backend, draft_backend = open_pair(backend, arch, max_len=max_len, tree=tree)
    spec = SpeculativeDecoder(target_backend, draft_backend).generate(ids, config)
    guided = SpeculativeDecoder(target_backend, OracleDraft(target, ids[0], max_len + tree.draft_rows)).generate(
        ids, config)
    assert len(reference.output_ids) == max_len - len(ids) + 1
    assert spec.output_ids == guided.output_ids == reference.output_ids
    assert spec.stop_reason == guided.stop_reason == "cache_full"


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_checks_the_call(backend, open_pair):
    target_backend, draft_backend = open_pair(backend, "llama", max_len=40)
    on = target_backend.device
    ids = torch.zeros(1, 4, dtype=torch.long, device=on)
    positions = torch.arange(4, device=on)[None]
    with pytest.raises(ValueError, match=r"input_ids must be \[1, T\]"):
        target_backend.step(ids[0], positions[0], 0, None)
    with pytest.raises(ValueError, match="position_ids"):
        target_backend.step(ids, positions[:, :3], 0, None)
    with pytest.raises(ValueError, match="tree_mask"):
        target_backend.step(ids, positions, 0, torch.ones(1, 4, 4, device=on))  # not bool
    with pytest.raises(CacheCapacityError, match="41 rows needed, 40 allocated"):
        target_backend.step(ids, positions, 37, None)
    with pytest.raises(ValueError, match="draft features"):
        draft_backend.step(torch.zeros(1, 3, 64, device=on), ids, positions, 0, None, top_k=2)
    with pytest.raises(ConfigError, match="top-k"):
        draft_backend.step(torch.zeros(1, 4, 64, device=on), ids, positions, 0, None, top_k=0)
    if not backend.startswith("torch"):  # an export fixes the tree budget (64) and the draft's top-k (16)
        big = torch.zeros(1, 65, dtype=torch.long)
        with pytest.raises(ConfigError, match="tree budget"):
            open_pair(backend, "llama")[0].step(big, big, 0, torch.ones(1, 65, 65, dtype=torch.bool))
        with pytest.raises(ConfigError, match="top-k 17"):
            draft_backend.step(torch.zeros(1, 4, 64), ids, positions, 0, None, top_k=17)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fork_shares_the_weights_but_not_the_kv(backend, open_pair, fusable_targets):
    """Two forks decoding different prompts, round by round in turn, each give what a fresh backend gives."""
    target_backend, draft_backend = open_pair(backend, "llama")
    forks = [(target_backend, draft_backend), (target_backend.fork(), draft_backend.fork())]
    assert forks[1][0].kv.storage.data_ptr() != target_backend.kv.storage.data_ptr()
    config = greedy(TreeConfig(tokens=6, depth=3, top_k=2), max_new_tokens=30, eos=())
    prompts = [prompt(7, seed=1), prompt(13, seed=2)]
    streams = {i: SpeculativeDecoder(*pair).stream(ids, config) for i, (pair, ids) in enumerate(zip(forks, prompts))}
    outputs: list[list[int]] = [[], []]
    while streams:  # one round of each in turn, as the serving engine runs its slots
        for index in list(streams):
            try:
                outputs[index] += next(streams[index])
            except StopIteration:
                del streams[index]
    fresh = open_pair(backend, "llama")
    assert outputs == [SpeculativeDecoder(*fresh).generate(ids, config).output_ids for ids in prompts]


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # mistral: each sequence's own sliding-window mask
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batched_step_gives_each_sequence_what_its_step_alone_gives(backend, arch, open_pair):
    """Three sequences in one `step_batch`, each over a fork's KV buffers: a tree after one prompt, a chain after
    another, a third prompt's prefill (its last row's logits only). Each sequence's logits (their argmax exactly),
    features and KV rows are those of its step alone, to rounding: a batching backend runs each weight's product
    over every row at once, attention per sequence."""
    target_backend, _ = open_pair(backend, arch, with_draft=False)
    on = target_backend.device

    def rows(values):
        return torch.tensor([values], device=on)

    tree = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]], dtype=torch.bool, device=on)
    prompts = [prompt(12, seed=1), prompt(9, seed=2)]

    def prefilled():
        forks = [target_backend.fork() for _ in range(3)]
        for fork, ids in zip(forks, prompts):
            fork.step(rows(ids), torch.arange(len(ids), device=on)[None], 0, None, last_only=True)
        return forks

    def parts(forks):
        return [SequenceStep(forks[0], rows([5, 6, 7, 8]), rows([12, 13, 13, 14]), 12, tree),
                SequenceStep(forks[1], rows([9, 10, 11]), rows([9, 10, 11]), 9, None),
                SequenceStep(forks[2], rows(prompt(7, seed=3)), torch.arange(7, device=on)[None], 0, None, True)]

    solo, batched = prefilled(), prefilled()
    alone = [p.backend.step(p.input_ids, p.position_ids, p.cache_len, p.tree_mask, p.last_only) for p in parts(solo)]
    together = target_backend.step_batch(parts(batched))
    if backend == "onnxruntime-fused":  # the export's batched graph computed them, in one run
        assert target_backend.batch is not None and target_backend.batch._session is not None
    assert [tuple(out.logits.shape) for out in together] == [tuple(out.logits.shape) for out in alone]
    # The PyTorch backend's packed forward rounds a row with the rows beside it (CPU GEMM); the others are bit for bit
    # (in turn, or ONNX Runtime's batched graph: `export/fused.py`).
    tolerance = dict(atol=1e-5, rtol=1e-5) if backend.startswith("torch") else dict(atol=0, rtol=0)
    for one, many in zip(alone, together):
        assert torch.equal(many.logits.argmax(-1), one.logits.argmax(-1))
        torch.testing.assert_close(many.logits.cpu(), one.logits.cpu(), **tolerance)
        torch.testing.assert_close(many.hidden.cpu(), one.hidden.cpu(), **tolerance)
    for lone, packed, used in zip(solo, batched, (16, 12, 7)):
        for got, want in zip(packed.kv.rows_in_use(used), lone.kv.rows_in_use(used)):
            torch.testing.assert_close(got.cpu(), want.cpu(), **tolerance)
    with pytest.raises(ValueError, match="their own backend"):
        target_backend.step_batch([parts(batched)[0]] * 2)
    with pytest.raises(CacheCapacityError):
        target_backend.step_batch([SequenceStep(batched[2], rows([1]), rows([MAX_LEN]), MAX_LEN, None)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_batched_draft_step_gives_each_sequence_what_its_step_alone_gives(backend, open_pair, fusable_targets):
    """Draft parts in one `step_batch`: a context pass of one sequence, a tree level of another (its mask over the
    rows of an earlier level, M > T), each with its own top-k: each gets its step alone's outputs and KV rows."""
    target_backend, draft_backend = open_pair(backend, "llama")
    on, hidden = draft_backend.device, fusable_targets["llama"].config.hidden_size
    generator = torch.Generator().manual_seed(0)

    def features(rows):
        return torch.randn(1, rows, hidden, generator=generator).to(on)

    context = [(features(10), torch.tensor([prompt(10, seed=4)], device=on)),
               (features(6), torch.tensor([prompt(6, seed=5)], device=on))]

    def ready():
        forks = [draft_backend.fork() for _ in range(2)]
        for fork, (f, ids) in zip(forks, context):
            fork.step(f, ids, torch.arange(ids.shape[1], device=on)[None], 0, None, top_k=2)
        return forks

    level_f, first_f = features(2), features(3)
    level_mask = torch.tensor([[[1, 0, 1, 0], [0, 1, 0, 1]]], dtype=torch.bool, device=on)  # M = 4 > T = 2

    def parts(forks):
        return [DraftSequenceStep(forks[0], first_f, torch.tensor([[1, 2, 3]], device=on),
                                  torch.arange(10, 13, device=on)[None], 10, None, 4),
                DraftSequenceStep(forks[1], level_f, torch.tensor([[7, 8]], device=on),
                                  torch.tensor([[7, 7]], device=on), 8, level_mask, 3)]

    solo, batched = ready(), ready()
    earlier = features(2)
    for fork in (solo[1], batched[1]):  # the second sequence's earlier tree level: two rows at 6, 7
        fork.step(earlier, torch.tensor([[5, 6]], device=on), torch.tensor([[6, 6]], device=on), 6,
                  torch.eye(2, dtype=torch.bool, device=on)[None], top_k=2)
    alone = [p.backend.step(p.features, p.input_ids, p.position_ids, p.cache_len, p.tree_mask, p.top_k)
             for p in parts(solo)]
    together = draft_backend.step_batch(parts(batched))
    if backend == "onnxruntime-fused":
        assert draft_backend.batch is not None and draft_backend.batch._session is not None
    tolerance = dict(atol=1e-5, rtol=1e-5) if backend.startswith("torch") else dict(atol=0, rtol=0)  # as the target's
    for one, many in zip(alone, together):
        assert many.tokens.shape == one.tokens.shape and torch.equal(many.tokens, one.tokens)
        torch.testing.assert_close(many.logprobs.cpu(), one.logprobs.cpu(), **tolerance)
        torch.testing.assert_close(many.hidden.cpu(), one.hidden.cpu(), **tolerance)
    for lone, packed, used in zip(solo, batched, (13, 10)):
        for got, want in zip(packed.kv.rows_in_use(used), lone.kv.rows_in_use(used)):
            torch.testing.assert_close(got.cpu(), want.cpu(), **tolerance)
