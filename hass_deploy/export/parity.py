"""Exported graphs against PyTorch (`hass-deploy validate`): per-graph parity, then end-to-end token identity.

1. Capture: a real greedy speculative decoding run of the PyTorch backends records every step's graph inputs
   (ids, positions, cache_len, tree mask, logit rows, features and a snapshot of the KV rows before the step),
   so the graphs are compared on consistent inputs, never on random masks or positions.
2. Per graph: polygraphy's `Comparator` runs the ONNX Runtime session (`OnnxrtRunner`) and our own step module
   (`TorchStepRunner`, the module that was exported) on those inputs; values are compared with per-dtype
   tolerances (`SimpleCompareFunc`), logits by top-k agreement (`TopKPostprocessFunc` + `IndicesCompareFunc`) and
   by argmax agreement (exact ties in half precision count: `Tolerance`).
3. End to end: ONNX Runtime speculative greedy decoding must be token-identical to ONNX Runtime plain decoding
   (lossless) and, in fp32, to PyTorch plain greedy decoding over a prompt set. In fp16 and bf16 the two engines
   round differently, so agreement with PyTorch is reported, not required.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hass_deploy.artifacts import Artifacts
from hass_deploy.config import GenerationConfig, TreeConfig
from hass_deploy.errors import HassDeployError
from hass_deploy.export import steps
from hass_deploy.manifest import Manifest
from hass_deploy.models.checkpoint import load_draft
from hass_deploy.models.loading import load_target
from hass_deploy.models.target import causal_tree_mask
from hass_deploy.runtime.backends import BACKENDS, BackendOptions
from hass_deploy.runtime.backends.base import DraftOutput, DraftSequenceStep, SequenceStep, TargetOutput
from hass_deploy.runtime.backends.onnxruntime import OrtConfig, OrtDraft, OrtTarget, _BatchGraph, open_session
from hass_deploy.runtime.backends.torch import TorchDraft, TorchTarget
from hass_deploy.runtime.decoder import SpeculativeDecoder


@dataclass(frozen=True)
class Tolerance:
    """How close ONNX Runtime must be to PyTorch for one export precision.

    fp32 differs only by summation order (measured max |diff| about 2e-6 on logits of magnitude about 1).
    Half precision rounds every weight and activation: values are only required to be close, the logits' top-k up
    to neighbouring swaps, and the argmax exactly, except between tokens whose reference values are within `atol`:
    fp16 logits near 20 are 0.0156 apart, so two tokens can tie exactly in the reference and the other engine,
    within tolerance, breaks the tie the other way.
    """

    atol: float
    rtol: float
    top_k: int = 5  # logits' top-k compared by index
    top_k_slack: int = 0  # how many places an index may move within the top-k (polygraphy's index_tolerance)
    end_to_end_exact: bool = True  # ORT greedy output must equal PyTorch's token for token

    @property
    def tie(self) -> float:
        """How far below the reference's best value the other engine's top-1 may be (0: the reference's argmax)."""
        return 0.0 if self.end_to_end_exact else self.atol


TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3),
    "fp16": Tolerance(atol=3e-2, rtol=3e-2, top_k_slack=1, end_to_end_exact=False),
    "bf16": Tolerance(atol=1e-1, rtol=1e-1, top_k_slack=1, end_to_end_exact=False),
}


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool | None  # None: informational, never fails the validation
    detail: str


@dataclass
class ValidationReport:
    artifacts: Path
    manifest: Manifest
    checks: list[Check] = field(default_factory=list)

    @property
    def validated(self) -> bool:
        """Whether anything was actually checked (bf16 graphs cannot run on ORT's CPU provider)."""
        return any(check.passed is not None for check in self.checks)

    @property
    def passed(self) -> bool:
        return self.validated and all(check.passed is not False for check in self.checks)

    def render(self) -> str:
        m = self.manifest
        lines = [f"validate {self.artifacts}: {m.dtype}, opset {m.opset}, S_max {m.max_seq_len}, "
                 f"graphs {', '.join(m.graphs)}"]
        for check in self.checks:
            status = {True: "PASS", False: "FAIL", None: "INFO"}[check.passed]
            lines.append(f"  {status}  {check.name:<34} {check.detail}")
        lines.append(f"result: {'PASS' if self.passed else 'FAIL' if self.validated else 'NOT VALIDATED'}")
        return "\n".join(lines)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy().copy()


def _past(keys: torch.Tensor, values: torch.Tensor, cache_len: int) -> dict[str, np.ndarray]:
    """The KV rows a graph may read at this step, from torch buffers [L, 1, H_kv, S_max, D]."""
    rows = max(cache_len, 1)  # a prefill still binds one (masked) row: no zero-size inputs
    feeds = {}
    for layer in range(keys.shape[0]):
        feeds[f"past_key_{layer}"] = _numpy(keys[layer, :, :, :rows])
        feeds[f"past_value_{layer}"] = _numpy(values[layer, :, :, :rows])
    return feeds


class _RecordingTarget(TorchTarget):
    """The PyTorch target backend, recording each step's graph feeds before running it."""

    def __init__(self, module, max_len: int, samples: list, limit: int):
        super().__init__(module, max_len)
        self.samples, self.limit = samples, limit

    def step(self, input_ids, position_ids, cache_len, tree_mask, last_only=False) -> TargetOutput:
        if len(self.samples) < self.limit:
            steps_ = input_ids.shape[1]
            mask = causal_tree_mask(steps_) if tree_mask is None else tree_mask
            rows = torch.tensor([steps_ - 1]) if last_only else torch.arange(steps_)
            self.samples.append(OrderedDict(
                input_ids=_numpy(input_ids), position_ids=_numpy(position_ids),
                cache_len=np.array([cache_len], dtype=np.int64), tree_mask=_numpy(mask), logits_index=_numpy(rows),
                **_past(self.kv.keys, self.kv.values, cache_len)))
        return super().step(input_ids, position_ids, cache_len, tree_mask, last_only)


class _RecordingDraft(TorchDraft):
    def __init__(self, head, lm_head, max_len: int, samples: list, limit: int):
        super().__init__(head, lm_head, max_len)
        self.samples, self.limit = samples, limit

    def step(self, features, input_ids, position_ids, cache_len, tree_mask, top_k) -> DraftOutput:
        if len(self.samples) < self.limit:
            mask = causal_tree_mask(input_ids.shape[1]) if tree_mask is None else tree_mask
            self.samples.append(OrderedDict(
                features=_numpy(features.to(self.head.fc.weight.dtype)), input_ids=_numpy(input_ids),
                position_ids=_numpy(position_ids), cache_len=np.array([cache_len], dtype=np.int64),
                tree_mask=_numpy(mask), **_past(self.kv.keys, self.kv.values, cache_len)))
        return super().step(features, input_ids, position_ids, cache_len, tree_mask, top_k)


def capture_samples(target_module, head, prompts: list[list[int]], config: GenerationConfig, max_len: int,
                    limit: int = 12) -> dict[str, list[OrderedDict]]:
    """Graph feeds of the first `limit` target and draft steps of a PyTorch speculative run over `prompts`."""
    samples: dict[str, list] = {"target": [], "draft": []}
    for ids in prompts:
        target = _RecordingTarget(target_module, max_len, samples["target"], limit)
        draft = None if head is None else _RecordingDraft(head, target_module.lm_head, max_len + config.tree.draft_rows,
                                                           samples["draft"], limit)
        SpeculativeDecoder(target, draft).generate(ids, config)
    return samples


def _polygraphy():
    try:
        from polygraphy.backend.base import BaseRunner
        from polygraphy.common import TensorMetadata
    except ImportError:
        raise HassDeployError("validation needs polygraphy: pip install 'hass-deploy[onnx]'") from None
    return BaseRunner, TensorMetadata


def torch_step_runner(module: torch.nn.Module, spec, name: str = "pytorch"):
    """A polygraphy runner over one of our step modules on the CPU (polygraphy's own PytRunner assumes CUDA)."""
    BaseRunner, TensorMetadata = _polygraphy()

    class TorchStepRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name, prefix="pytorch-runner")

        def get_input_metadata_impl(self):
            metadata = TensorMetadata()
            for tensor in spec.inputs:
                metadata.add(tensor.name, np.dtype(tensor.dtype),
                             [d if isinstance(d, int) else -1 for d in tensor.shape])
            return metadata

        def infer_impl(self, feed_dict):
            args = [torch.from_numpy(np.ascontiguousarray(feed_dict[t.name])) for t in spec.inputs]
            start = time.perf_counter()
            with torch.no_grad():
                outputs = module(*args)
            self.inference_time = time.perf_counter() - start
            return OrderedDict((t.name, _numpy(value)) for t, value in zip(spec.outputs, outputs))

    return TorchStepRunner()


def _select(run_results, names: set[str]):
    from polygraphy.comparator import IterationResult, RunResults

    selected = RunResults()
    for runner, iterations in run_results.items():
        selected.append((runner, [IterationResult({k: v for k, v in it.items() if k in names}, it.runtime, runner)
                                  for it in iterations]))
    return selected


def _worst(accuracy) -> dict[str, float]:
    """Max |diff| per output over all iterations of a SimpleCompareFunc result."""
    worst: dict[str, float] = {}
    for iterations in accuracy.values():
        for outputs in iterations:
            for name, result in outputs.items():
                worst[name] = max(worst.get(name, 0.0), float(result.max_absdiff))
    return worst


def compare_graph(graph: str, session, module: torch.nn.Module, spec, samples: list[OrderedDict],
                  tolerance: Tolerance) -> list[Check]:
    """Run ORT and PyTorch on the captured feeds through polygraphy's Comparator and judge the outputs."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import (Comparator, IndicesCompareFunc, SimpleCompareFunc, TopKPostprocessFunc)
    from polygraphy.logger import G_LOGGER

    if not samples:
        return [Check(f"{graph} graph parity", False, "no steps were captured")]
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # the report below says what matters, in one line per check
        results = Comparator.run([OnnxrtRunner(session, name="onnxruntime"), torch_step_runner(module, spec)],
                                 data_loader=samples)
        values = {t.name for t in spec.outputs if t.dtype.startswith(("float", "bfloat"))}
        # compare_accuracy returns one AccuracyResult per compare function; we pass one.
        accuracy = Comparator.compare_accuracy(
            _select(results, values), compare_func=SimpleCompareFunc(atol=tolerance.atol, rtol=tolerance.rtol))[0]
        index_name = "logits" if graph == "target" else "top_tokens"
        indices = _select(results, {index_name})
        if graph == "target":
            indices = Comparator.postprocess(indices, TopKPostprocessFunc(k=(tolerance.top_k, -1)))
        top_k = Comparator.compare_accuracy(
            indices, compare_func=IndicesCompareFunc(index_tolerance=tolerance.top_k_slack))[0]
    argmax = _top1_agreement(results, graph, tolerance.tie)
    worst = _worst(accuracy)
    kv = max((v for k, v in worst.items() if k.startswith("new_")), default=0.0)
    shown = ", ".join(f"{k} {v:.1e}" for k, v in worst.items() if not k.startswith("new_"))
    count = len(samples)
    return [
        Check(f"{graph} values (atol {tolerance.atol:g}, rtol {tolerance.rtol:g})", bool(accuracy),
              f"{count} captured steps; max |diff| {shown}, new K/V rows {kv:.1e}"),
        Check(f"{graph} argmax agreement", argmax == count, f"{argmax}/{count} steps identical"
              + (f" (ties within {tolerance.tie:g} count)" if tolerance.tie else "")),
        Check(f"{graph} top-{tolerance.top_k if graph == 'target' else 'k'} agreement (slack {tolerance.top_k_slack})",
              bool(top_k), f"{_agreement(top_k)}/{count} steps"),
    ]


def _top1_agreement(run_results, graph: str, tie: float) -> int:
    """Steps in which ONNX Runtime's top-1 token is one PyTorch ranks best, up to `tie` below its best value, in every
    row (the runners' results in order: ONNX Runtime, then the PyTorch reference)."""
    (_, ort_steps), (_, reference_steps) = list(run_results.items())
    agreed = 0
    for got, want in zip(ort_steps, reference_steps):
        if graph == "target":
            logits = want["logits"]  # [1, R, V]
            chosen = np.take_along_axis(logits, got["logits"].argmax(-1)[..., None], -1)[..., 0]  # [1, R]
            agreed += bool((chosen >= logits.max(-1) - tie).all())
        else:  # the draft's descending top-k: ORT's first token against PyTorch's ranked tokens and log-probs
            tokens, logprobs = want["top_tokens"], want["top_logprobs"]  # [1, T, K]
            chosen = np.where(tokens == got["top_tokens"][..., :1], logprobs, -np.inf).max(-1)  # [1, T]
            agreed += bool((chosen >= logprobs[..., 0] - tie).all())
    return agreed


def _agreement(accuracy) -> int:
    return sum(all(bool(r) for r in outputs.values()) for iterations in accuracy.values() for outputs in iterations)


def default_prompts(vocab_size: int, max_len: int, max_new_tokens: int, count: int = 4) -> list[list[int]]:
    """Seeded random token-id prompts of a few lengths (tokenizer-free, so any target can be validated)."""
    generator = torch.Generator().manual_seed(0)
    lengths = [n for n in (3, 17, 40, 90) if n + max_new_tokens < max_len][:count] or [1]
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def compare_fused(graph: str, artifacts: Path, manifest: Manifest, module: torch.nn.Module,
                  samples: list[OrderedDict], tolerance: Tolerance, max_len: int) -> list[Check]:
    """A fused graph (`fused.py`) against our step module, replaying the captured steps through the ONNX Runtime
    backend that runs it (the graph writes its KV rows into buffers it shares with the backend, which plain
    polygraphy feeds cannot express): the step's outputs and the K/V rows it wrote."""
    spec = manifest.graphs[graph]
    session = open_session(artifacts / spec.file, torch.device("cpu"), OrtConfig())
    role = graph.removesuffix("_ort")
    backend_cls = OrtTarget if role == "target" else OrtDraft
    backend = backend_cls(session, manifest, torch.device("cpu"), max_len, graph)
    worst: dict[str, float] = {}
    argmax_same, close = 0, True
    for sample in samples:
        feeds = {k: torch.from_numpy(v) for k, v in sample.items()}
        cache_len = int(feeds["cache_len"][0])
        view = backend.stepper.kv.view()  # [L, 2, 1, H_kv, S_max, D]
        for layer in range(spec.num_layers):
            view[layer, 0, :, :, :cache_len] = feeds[f"past_key_{layer}"][..., :cache_len, :]
            view[layer, 1, :, :, :cache_len] = feeds[f"past_value_{layer}"][..., :cache_len, :]
        with torch.no_grad():
            expected = module(*[feeds[t.name] for t in manifest.graphs[role].inputs])
        names = [t.name for t in manifest.graphs[role].outputs]
        expected = dict(zip(names, expected))
        steps_ = feeds["input_ids"].shape[1]
        # A captured prefill carries its causal mask; replayed as a causal step it is chunked like a prompt, not held
        # to the tree budget.
        mask = None if torch.equal(feeds["tree_mask"], causal_tree_mask(steps_)) else feeds["tree_mask"]
        if role == "target":
            out = backend.step(feeds["input_ids"], feeds["position_ids"], cache_len, mask)
            logits = out.logits[:, feeds["logits_index"]]  # [1, R, V]: the rows the module computed
            got = {"logits": logits, "hidden": out.hidden}
            argmax_same += bool((logits.argmax(-1) == expected["logits"].argmax(-1)).all())
        else:
            top_k = expected["top_tokens"].shape[-1]
            out = backend.step(feeds["features"], feeds["input_ids"], feeds["position_ids"], cache_len, mask, top_k)
            got = {"hidden": out.hidden, "top_logprobs": out.logprobs}
            argmax_same += bool((out.tokens[..., 0] == expected["top_tokens"][..., 0]).all())
        for layer in range(spec.num_layers):
            for j, kind in enumerate(("key", "value")):
                got[f"new_{kind}_{layer}"] = view[layer, j, :, :, cache_len:cache_len + steps_]
        for name, value in got.items():
            diff = (value - expected[name]).abs()
            close &= bool((diff <= tolerance.atol + tolerance.rtol * expected[name].abs()).all())  # as polygraphy's
            worst[name] = max(worst.get(name, 0.0), float(diff.max()) if diff.numel() else 0.0)
    count = len(samples)
    values_ok = count > 0 and close
    kv = max((v for k, v in worst.items() if k.startswith("new_")), default=0.0)
    shown = ", ".join(f"{k} {v:.1e}" for k, v in worst.items() if not k.startswith("new_"))
    return [Check(f"{graph} values (atol {tolerance.atol:g}, rtol {tolerance.rtol:g})", values_ok,
                  f"{count} captured steps replayed; max |diff| {shown}, K/V rows written {kv:.1e}"),
            Check(f"{graph} argmax agreement", count > 0 and argmax_same == count,
                  f"{argmax_same}/{count} steps identical")]


def compare_batched(graph: str, artifacts: Path, manifest: Manifest, samples: list[OrderedDict],
                    max_len: int) -> list[Check]:
    """A batched fused graph (--ort-batch) against its one-sequence graph: the captured steps, each on its own fork,
    run alone and then together in batched runs of the graph's `slots`; every sequence's outputs and the K/V rows it
    wrote must be bit for bit its own step's (what serving's losslessness under load rests on)."""
    spec = manifest.graphs[graph]
    solo_graph = graph.removesuffix("_batch")
    role, cpu = solo_graph.removesuffix("_ort"), torch.device("cpu")
    session = open_session(artifacts / manifest.graphs[solo_graph].file, cpu, OrtConfig())
    batch = _BatchGraph(lambda: open_session(artifacts / spec.file, cpu, OrtConfig()), spec,
                        torch.float32, cpu)
    backend_cls = OrtTarget if role == "target" else OrtDraft
    backend = backend_cls(session, manifest, cpu, max_len, solo_graph, batch)
    parts = []
    for sample in samples:
        feeds = {k: torch.from_numpy(v) for k, v in sample.items()}
        steps_ = feeds["input_ids"].shape[1]
        mask = None if torch.equal(feeds["tree_mask"], causal_tree_mask(steps_)) else feeds["tree_mask"]
        if mask is None and steps_ > manifest.prefill_chunk:
            continue  # a prompt longer than a chunk runs alone, batched or not
        parts.append((feeds, int(feeds["cache_len"][0]), mask))

    def forks():
        made = []
        for feeds, cache_len, _ in parts:
            fork = backend.fork()
            view = fork.kv.view()
            for layer in range(spec.num_layers):
                view[layer, 0, :, :, :cache_len] = feeds[f"past_key_{layer}"][..., :cache_len, :]
                view[layer, 1, :, :, :cache_len] = feeds[f"past_value_{layer}"][..., :cache_len, :]
            made.append(fork)
        return made

    def step(fork, feeds, cache_len, mask):
        if role == "target":
            return SequenceStep(fork, feeds["input_ids"], feeds["position_ids"], cache_len, mask)
        return DraftSequenceStep(fork, feeds["features"], feeds["input_ids"], feeds["position_ids"], cache_len, mask,
                                 manifest.max_top_k)

    alone_forks, batched_forks = forks(), forks()
    alone = [f.step_batch([step(f, *part)])[0] for f, part in zip(alone_forks, parts)]
    together = []
    for start in range(0, len(parts), spec.slots):
        group = list(zip(batched_forks, parts))[start:start + spec.slots]
        together += backend.step_batch([step(f, *part) for f, part in group])
    same = [all(torch.equal(a, b) for a, b in zip(vars(one).values(), vars(many).values()))
            for one, many in zip(alone, together)]
    kv_same = all(torch.equal(a.kv.view(), b.kv.view()) for a, b in zip(alone_forks, batched_forks))
    return [Check(f"{graph} rows equal their own steps'", bool(parts) and all(same) and kv_same,
                  f"{sum(same)}/{len(parts)} captured steps identical in batches of {spec.slots}, K/V rows "
                  f"{'identical' if kv_same else 'differ'}")]


def reference_outputs(reference_module, prompts: list[list[int]], config: GenerationConfig,
                      max_len: int) -> list[list[int]]:
    """PyTorch plain decoding's greedy outputs: what every graph kind's end-to-end check compares against."""
    decoder = SpeculativeDecoder(TorchTarget(reference_module, max_len), None)
    return [decoder.generate(ids, config).output_ids for ids in prompts]


def end_to_end(artifacts: Artifacts, target_fp32, head_fp32, references: list[list[int]], prompts: list[list[int]],
               config: GenerationConfig, tolerance: Tolerance, max_len: int, graphs: str = "standard") -> list[Check]:
    """Greedy outputs: ORT speculative vs ORT plain (must match) and vs PyTorch plain (`references`, must match in
    fp32, unless the graphs run a quantised target: then how far its output follows fp32 is reported, not required).
    The models were checked against `artifacts` already (`validate_artifacts`)."""
    ort_target, ort_draft = BACKENDS["onnxruntime"].open(target_fp32, head_fp32, BackendOptions(ort_graphs=graphs),
                                                         artifacts, max_len, config.tree.draft_rows)
    quantization = artifacts.manifest.target_quantization
    quantized = graphs == "fused" and quantization is not None
    label = "ORT" if graphs == "standard" else "ORT fused" + (f" {quantization}" if quantized else "")
    ort_plain = SpeculativeDecoder(ort_target, None)
    ort_spec = SpeculativeDecoder(ort_target, ort_draft) if ort_draft is not None else None
    same_torch, same_ort, first_divergence = 0, 0, []
    for ids, reference in zip(prompts, references):
        plain = ort_plain.generate(ids, config).output_ids
        ours = ort_spec.generate(ids, config).output_ids if ort_spec is not None else plain
        same_torch += ours == reference
        same_ort += ours == plain
        if ours != reference:
            first_divergence.append(next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b),
                                         min(len(ours), len(reference))))
    n = len(prompts)
    kind = "speculative" if ort_spec is not None else "plain"
    detail = f"{same_torch}/{n} prompts identical, {config.max_new_tokens} new tokens each"
    if first_divergence:
        detail += (f"; first divergence at token {min(first_divergence)} (median "
                   f"{sorted(first_divergence)[len(first_divergence) // 2]})")
    exact = tolerance.end_to_end_exact and not quantized
    reference = "PyTorch fp32 plain" if quantized else "PyTorch plain"
    checks = [Check(f"{label} {kind} == {reference}", same_torch == n if exact else None, detail)]
    if ort_spec is not None:
        checks.append(Check(f"{label} speculative == {label} plain", same_ort == n, f"{same_ort}/{n} prompts "
                            f"identical (tree {config.tree.tokens} nodes, depth {config.tree.depth}, "
                            f"top-k {config.tree.top_k})"))
    return checks


def validate_artifacts(artifacts: str | Path, target_dir: str | Path, draft_dir: str | Path | None,
                       prompts: list[list[int]] | None = None, max_new_tokens: int = 32,
                       tree: TreeConfig = TreeConfig(), samples_per_graph: int = 12) -> ValidationReport:
    """Validate an artifacts directory against the target (and draft) it was exported from.

    Args:
        artifacts: the `hass-deploy export` directory.
        target_dir, draft_dir: the models; draft_dir is required when the artifacts hold a draft graph.
        prompts: token-id prompts; None = `default_prompts`.
        max_new_tokens: generated per prompt in the end-to-end checks.
        tree: the draft tree used for capture and end to end (clipped to the artifacts' budget).
        samples_per_graph: captured steps compared per graph.

    Returns:
        The report; `report.passed` is False on any mismatch.
    """
    exported = Artifacts.open(artifacts)
    artifacts, manifest = exported.directory, exported.manifest
    target = load_target(target_dir, "fp32", tokenizer=False)
    exported.check_target(target)
    if exported.has_draft and draft_dir is None:
        raise HassDeployError("the artifacts hold a draft graph: give --draft DIR, the draft they were exported from")
    head = None if draft_dir is None else load_draft(draft_dir, target)[0]
    exported.check_draft(head, str(draft_dir))
    report = ValidationReport(artifacts, manifest)
    if manifest.dtype == "bf16":
        report.checks.append(Check("bf16 on ONNX Runtime CPU", None, "skipped: ORT's CPU provider has no bf16 MatMul "
                                   "kernel (NOT_IMPLEMENTED: MatMul(13)); validate bf16 graphs on CUDA or TensorRT"))
        return report
    tolerance = TOLERANCES[manifest.dtype]
    reference = target if manifest.dtype == "fp32" else load_target(target_dir, manifest.dtype, tokenizer=False)
    reference_head = head if head is None or manifest.dtype == "fp32" else load_draft(draft_dir, reference)[0]
    max_len = manifest.max_seq_len
    tree = TreeConfig(tokens=min(tree.tokens, exported.max_tree_tokens), depth=tree.depth,
                      top_k=min(tree.top_k, exported.max_top_k))
    config = GenerationConfig(max_new_tokens=max_new_tokens, tree=tree, eos_token_ids=())
    prompts = prompts or default_prompts(target.config.vocab_size, max_len, max_new_tokens)
    samples = capture_samples(reference.module, reference_head, prompts, config, max_len, samples_per_graph)
    modules = {"target": steps.TargetStep(reference.module).eval()}
    if reference_head is not None:
        modules["draft"] = steps.DraftStep(reference_head, reference.module.lm_head, manifest.max_top_k).eval()
    # Every graph the export wrote is run, whatever its kind: a graph ORT refuses at run time (an operator's shape
    # condition that it checks only then) fails here, in its own line, instead of on a user's first prompt.
    for graph, spec in manifest.graphs.items():
        if spec.slots is not None:  # a batched fused graph: against its one-sequence graph, bit for bit
            role = graph.removesuffix("_ort_batch")
            report.checks.extend(_running(graph, compare_batched, graph, artifacts, manifest, samples[role],
                                          max_len))
            continue
        module = modules.get(graph.removesuffix("_ort"))
        if module is None:
            report.checks.append(Check(f"{graph} graph", False, "not validated: no module of ours computes it"))
            continue
        compare = _fused if spec.kv_update == "in_graph" else _standard
        report.checks.extend(_running(graph, compare, graph, artifacts, manifest, module, samples, tolerance, max_len))
    references = reference_outputs(reference.module, prompts, config, max_len)
    for graphs in ("standard", "fused") if exported.has_fused else ("standard",):
        report.checks.extend(_running(f"{graphs} graphs end to end", end_to_end, exported, target, head,
                                      references, prompts, config, tolerance, max_len, graphs))
    return report


def _running(name: str, checks: Callable[..., list[Check]], *args) -> list[Check]:
    """`checks(*args)`, or one failed check with ONNX Runtime's own message when a graph does not run at all."""
    try:
        return checks(*args)
    except RuntimeError as err:  # onnxruntime's run-time failures (its Fail/RuntimeException are RuntimeErrors)
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        return [Check(f"{name} runs on ONNX Runtime", False, message)]


def _fused(graph: str, artifacts: Path, manifest: Manifest, module, samples, tolerance: Tolerance,
           max_len: int) -> list[Check]:
    """A fused graph through the backend that runs it (`compare_fused`). Quantised weights are meant to differ from
    PyTorch fp32: their parity is reported, not required (the end-to-end checks still require speculative decoding
    to equal plain decoding of the same graphs, token for token)."""
    checks = compare_fused(graph, artifacts, manifest, module, samples[graph.removesuffix("_ort")], tolerance, max_len)
    quantization = manifest.graphs[graph].quantization
    if quantization is None:
        return checks
    return [Check(f"{c.name} [{quantization} weights]", None, c.detail) for c in checks]


def _standard(graph: str, artifacts: Path, manifest: Manifest, module, samples, tolerance: Tolerance,
              max_len: int) -> list[Check]:
    """A standard graph against our step module through polygraphy (`compare_graph`)."""
    spec = manifest.graphs[graph]
    session = open_session(artifacts / spec.file, torch.device("cpu"), OrtConfig())
    checks = compare_graph(graph, session, module, spec, samples[graph], tolerance)
    quantized = spec.quantization or (manifest.draft_quantization if "draft_ort" not in manifest.graphs else None)
    if graph == "draft" and quantized is not None:
        # A quantised draft is meant to differ from PyTorch; what it proposes can only change acceptance, and
        # the end-to-end checks still require every output to be the target's own, token for token.
        checks = [Check(f"{c.name} [{quantized} draft]", None, c.detail) for c in checks]
    return checks
