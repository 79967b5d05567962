"""Half-precision step graphs (`--dtype fp16|bf16`) keep their numerically sensitive computations in float32.

TensorRT's strongly typed mode (as ONNX Runtime always does) computes each operator in the element type the graph
gives it, so an fp16/bf16 export is only as accurate as the graph's own dtypes. The RMSNorm statistics (square,
mean, rsqrt: `RMSNormalization`'s stash_type, or the ReduceMean/Sqrt it expands into with `--attention
decomposed`), the attention softmax (`blocked_attention`), the draft's LogSoftmax and TopK and the RoPE angles
(Cos/Sin of position x frequency: fp16 holds integers exactly only up to 2048) must be float32; the weights and
MatMuls must be in the half dtype (or the graph is not half precision at all); every input and output must be in the
dtype the runtime binds to it. Checked on the element types ONNX shape inference gives, nothing assumed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import onnx
import pytest
import torch
from onnx import TensorProto, shape_inference

from ort_artifacts import CONFIG
from hass_deploy.export import onnx as onnx_export
from hass_deploy.export import steps
from hass_deploy.export.decompose import decompose
from hass_deploy.export.onnx import export_onnx
from hass_deploy.export.parity import validate_artifacts
from hass_deploy.manifest import read_manifest
from hass_deploy.models import target as target_module
from hass_deploy.models.checkpoint import FORMAT_VERSION, DraftMetadata, save_draft, target_identity
from hass_deploy.models.target import RMSNorm
from hass_deploy.runtime.backends.tensorrt import buffer_sizes

HALF = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_ONNX_TYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
               torch.bfloat16: TensorProto.BFLOAT16, torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL}
# Operators whose first input must be float32 in a half-precision graph: a norm's statistics in whichever form the
# exporter or `decompose` writes them (the graphs hold ReduceMean, Sqrt; a norm left in half precision exports as
# Pow, ReduceMean, Sqrt, Reciprocal), the softmaxes, the draft's top-k and the RoPE angles. The other reductions
# and Exp/Log are here for a softmax or norm written out by hand: the graphs hold none of them today.
FLOAT32_OPS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceMax", "ReduceLogSumExp", "Pow", "Sqrt",
               "Reciprocal", "Exp", "Log", "Softmax", "LogSoftmax", "TopK", "Cos", "Sin"}
# Fused norms compute in their stash_type (ONNX's default: float32), whatever their input's type.
NORM_OPS = {"RMSNormalization", "LayerNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization"}
HALF_OPS = {"MatMul", "Gemm"}  # the weights' products: float32 ones would mean the graph is not half precision


def _typed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The model with inferred types, and the element type of every tensor in it."""
    model = shape_inference.infer_shapes(model, strict_mode=True)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return model, types


def precision_problems(model: onnx.ModelProto, half: int, float32_shapes: set[tuple[int, ...]]) -> list[str]:
    """What in `model` computes in the wrong precision for a `half` graph, one line each (empty: nothing).

    float32_shapes: the shapes a float32 initializer or constant may have (RoPE's frequencies, scalars); every other
    floating one must be in `half`.
    """
    model, types = _typed(model)
    name = TensorProto.DataType.Name
    producers = {out: node for node in model.graph.node for out in node.output}
    problems = []
    for node in model.graph.node:
        untyped = [out for out in node.output if out and not types.get(out)]
        if untyped:  # a tensor without a type would slip through every check below
            problems.append(f"{node.op_type} {node.name} has outputs shape inference cannot type: {untyped}")
        first = types.get(node.input[0]) if node.input else None
        if node.op_type in NORM_OPS:
            stash = next((a.i for a in node.attribute if a.name == "stash_type"), TensorProto.FLOAT)
            if stash != TensorProto.FLOAT:
                problems.append(f"{node.op_type} {node.name} computes in stash_type {name(stash)}")
        elif node.op_type in FLOAT32_OPS and first != TensorProto.FLOAT:
            problems.append(f"{node.op_type} {node.name} computes in {name(first or 0)}")
        elif node.op_type in HALF_OPS and first != half:
            problems.append(f"{node.op_type} {node.name} computes in {name(first or 0)}, not {name(half)}")
        if node.op_type.startswith("Reduce"):
            # An upcast right before the reduction is too late if the square was taken in half (x² overflows fp16
            # from |x| = 256): follow the data back through its Casts to the square.
            source = producers.get(node.input[0])
            while source is not None and source.op_type == "Cast":
                source = producers.get(source.input[0])
            if source is None or source.op_type not in ("Mul", "Pow"):
                continue
            squared = types.get(source.output[0], 0)
            if squared != TensorProto.FLOAT:
                problems.append(f"{source.op_type} {source.name} squares in {name(squared)} before {node.op_type} "
                                f"{node.name}")
    floating = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    constants = [a.t for node in model.graph.node if node.op_type == "Constant" for a in node.attribute
                 if a.name == "value"]
    for t in (*model.graph.initializer, *constants):
        if t.data_type in floating and t.data_type != half and tuple(t.dims) not in float32_shapes:
            problems.append(f"initializer {t.name} {list(t.dims)} is {name(t.data_type)}, not {name(half)}")
    return problems


def census(model: onnx.ModelProto) -> Counter:
    """(operator, element type of its first input) -> count, for the operators the checks are about."""
    model, types = _typed(model)
    watched = FLOAT32_OPS | NORM_OPS | HALF_OPS
    return Counter((node.op_type, TensorProto.DataType.Name(types[node.input[0]]))
                   for node in model.graph.node if node.op_type in watched)


@pytest.fixture(scope="module")
def half_exports(targets, random_drafts, tmp_path_factory):
    """dtype -> artifacts of Qwen3 (q/k norms: four norms a layer) and its draft, exported on first use."""
    exported = {}

    def get(dtype: str):
        if dtype not in exported:
            out = tmp_path_factory.mktemp(f"precision-{dtype}") / "out"
            export_onnx(targets["qwen3"], random_drafts["qwen3"], out, replace(CONFIG, dtype=dtype, ort_batch=0))
            exported[dtype] = out
        return exported[dtype]

    return get


def _graph(artifacts, name: str, attention: str) -> onnx.ModelProto:
    model = onnx.load(str(artifacts / f"{name}.onnx"))
    # `--attention decomposed` is this pass over the saved standard graph (`onnx.decompose_graph`): applying it here
    # saves two exports; test_fp16_decomposed_export_validates checks a real decomposed export.
    return decompose(model)[0] if attention == "decomposed" else model


def _norms(module: torch.nn.Module) -> int:
    return sum(isinstance(m, RMSNorm) for m in module.modules())


@pytest.mark.parametrize("attention", ["onnx", "decomposed"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_graphs_keep_norms_softmax_top_k_and_rope_in_float32(dtype, attention, half_exports, targets,
                                                                 random_drafts):
    artifacts, target, draft = half_exports(dtype), targets["qwen3"], random_drafts["qwen3"]
    rope = {(), (target.config.head_dim // 2,)}  # inv_freq [D/2] and scalar constants stay float32
    half_name = TensorProto.DataType.Name(HALF[dtype])
    for name, module, layers in (("target", target.module, target.config.num_layers), ("draft", draft, 1)):
        model = _graph(artifacts, name, attention)
        assert precision_problems(model, HALF[dtype], rope) == [], name
        # Not vacuous: every norm, softmax and RoPE table is there, in float32 (the norms as fused operators that
        # compute in their stash_type, or as their expansion's ReduceMean and Sqrt), and the MatMuls in half.
        ops = census(model)
        norm = ("RMSNormalization", half_name) if attention == "onnx" else ("ReduceMean", "FLOAT")
        assert ops[norm] == _norms(module) > 0, (name, ops)
        assert ops["Sqrt", "FLOAT"] == (_norms(module) if attention == "decomposed" else 0), (name, ops)
        assert ops["Softmax", "FLOAT"] == layers and ops["Cos", "FLOAT"] == ops["Sin", "FLOAT"] == 1, (name, ops)
        assert ops["MatMul", half_name] > 0, (name, ops)
        if name == "draft":
            assert ops["LogSoftmax", "FLOAT"] == ops["TopK", "FLOAT"] == 1, ops
        weights = [t for t in model.graph.initializer if len(t.dims) == 2]
        assert weights and all(t.data_type == HALF[dtype] for t in weights), name


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_graph_inputs_and_outputs_are_what_the_runtime_binds(dtype, half_exports):
    """Logits, hidden and K/V rows in the half dtype, the draft's log-probs float32, its tokens int64: the TensorRT
    backend binds raw buffers of exactly these types (`buffer_sizes`), the ONNX Runtime backend the same."""
    artifacts = half_exports(dtype)
    manifest = read_manifest(artifacts)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    io = {}
    for name in ("target", "draft"):
        spec = manifest.graphs[name]
        model = onnx.load(str(artifacts / spec.file), load_external_data=False)
        io[name] = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
        bound = {n: t for n, (_, t) in buffer_sizes([*spec.inputs, *spec.outputs], 2, 3, half).items()}
        bound.update({n: half for n in io[name] if n.startswith("past_")})  # the KV buffers, in the manifest's dtype
        assert io[name] == {n: _ONNX_TYPES[t] for n, t in bound.items()}, name
        manifest_types = {t.name: t.dtype for t in (*spec.inputs, *spec.outputs)}  # what the runtime reads
        assert manifest_types == {n: str(t).removeprefix("torch.") for n, t in bound.items()}, name
    assert io["target"]["logits"] == io["target"]["hidden"] == io["draft"]["features"] == HALF[dtype]
    assert (io["draft"]["top_logprobs"], io["draft"]["top_tokens"]) == (TensorProto.FLOAT, TensorProto.INT64)


def test_the_check_catches_a_norm_softmax_or_log_softmax_left_in_half(targets, random_drafts, tmp_path, monkeypatch):
    """The draft graph (a norm, an attention softmax, LogSoftmax and TopK) exported from modules that drop each
    upcast: every one is reported, though the outputs keep their dtypes."""

    def norm_squared_in_half(self, x):  # upcast after the square: the mean is float32, x² was not
        return self.weight * (x.float() * torch.rsqrt((x * x).float().mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def attention_in_half(q, blocks):
        scale = q.shape[-1] ** -0.5
        scores = [torch.where(mask, q @ k.transpose(-1, -2) * scale, float("-inf")) for k, _, mask in blocks]
        return torch.softmax(torch.cat(scores, -1), -1) @ torch.cat([v for _, v, _ in blocks], 2)

    def log_softmax_in_half(self, features, input_ids, position_ids, cache_len, tree_mask, *kv_buffers):
        kv = steps._GraphKV(kv_buffers)
        hidden = self.head(features, input_ids, position_ids, tree_mask, kv, cache_len.reshape(()))
        top = torch.topk(torch.log_softmax(self.lm_head(hidden), dim=-1), self.top_k, dim=-1)
        return (hidden, top.values.float(), top.indices, *kv.new)

    monkeypatch.setattr(RMSNorm, "forward", norm_squared_in_half)
    monkeypatch.setattr(target_module, "blocked_attention", attention_in_half)
    monkeypatch.setattr(steps.DraftStep, "forward", log_softmax_in_half)
    target, draft = targets["qwen3"], random_drafts["qwen3"]
    config = replace(CONFIG, dtype="fp16", ort_batch=0)
    lm_head = onnx_export._cast(target.module, torch.float16).lm_head  # cast as the export casts them
    path = tmp_path / "draft.onnx"
    onnx_export.export_draft_graph(onnx_export._cast(draft, torch.float16), lm_head, path, config, 256)
    model = onnx.load(str(path))
    problems = precision_problems(model, TensorProto.FLOAT16, {(), (target.config.head_dim // 2,)})
    assert sorted(p.split()[0] for p in problems) == ["LogSoftmax", "Mul", "Softmax", "TopK"], problems
    assert "squares in FLOAT16 before ReduceMean" in next(p for p in problems if p.startswith("Mul"))
    assert {v.name: v.type.tensor_type.elem_type for v in model.graph.output}["top_logprobs"] == TensorProto.FLOAT


@pytest.mark.slow
def test_fp16_decomposed_export_validates(targets, random_drafts, hf_dirs, tmp_path):
    """fp16 graphs run on ONNX Runtime's CPU provider; `validate` on the `onnx` variant is test_parity's
    test_fp16_graphs_agree_in_argmax_and_top_k, this is the decomposed one (a real `--attention decomposed` export)."""
    pytest.importorskip("polygraphy")
    target, draft = targets["qwen3"], random_drafts["qwen3"]
    out = tmp_path / "out"
    export_onnx(target, draft, out, replace(CONFIG, dtype="fp16", attention="decomposed", ort_batch=0))
    for name in ("target", "draft"):
        model = onnx.load(str(out / f"{name}.onnx"))
        assert "RMSNormalization" not in {node.op_type for node in model.graph.node}
        assert precision_problems(model, TensorProto.FLOAT16, {(), (target.config.head_dim // 2,)}) == [], name
    draft_dir = save_draft(draft, tmp_path / "draft",
                           DraftMetadata(FORMAT_VERSION, "random-init", target_identity(target)))
    report = validate_artifacts(out, hf_dirs["qwen3"], draft_dir, max_new_tokens=24)
    assert report.passed, report.render()
    assert [check.name for check in report.checks if check.passed is None] == ["ORT speculative == PyTorch plain"]
