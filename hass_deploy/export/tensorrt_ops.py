"""Which ONNX operators TensorRT's ONNX parser imports, so an exported graph is known to build later (DESIGN D8).

Source: onnx/onnx-tensorrt `docs/operators.md`, the table for **TensorRT 10.15** (opsets 9 to 24), every
operator marked "Y". Update the list and `TENSORRT_VERSION` together when moving to a newer TensorRT. Only
the default ONNX domain is importable without plugins, so any other domain (`com.microsoft`, custom ops) fails
the check. Restrictions that the table states and our graphs could hit are checked where they can be checked
statically (TopK: `K` a constant below 3840, `sorted` = 1).
"""

from __future__ import annotations

TENSORRT_VERSION = "10.15"
SOURCE = "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md (TensorRT 10.15, opset 9-24)"

SUPPORTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal
RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose Trilu
Unsqueeze Upsample Where Xor
""".split())

TOPK_LIMIT = 3840  # the table's bound on TopK's K


def _constants(model) -> dict:
    values = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = attr.t
    return values


def unsupported_operators(model) -> list[str]:
    """Every node TensorRT would refuse, as "domain::op_type (reason)", sorted and de-duplicated; [] = importable.

    Args:
        model: the onnx.ModelProto, loaded with or without its external data (weights are not read).
    """
    from onnx import numpy_helper  # onnx is an optional extra: imported when a graph is checked

    constants = _constants(model)
    problems = set()
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    for node in nodes:
        domain = node.domain or ""
        if domain not in ("", "ai.onnx"):
            problems.add(f"{domain}::{node.op_type} (not the default ONNX domain)")
        elif node.op_type not in SUPPORTED:
            problems.add(f"::{node.op_type} (not in TensorRT {TENSORRT_VERSION}'s operator table)")
        elif node.op_type == "TopK":
            k = constants.get(node.input[1])
            if k is None or int(numpy_helper.to_array(k).reshape(-1)[0]) >= TOPK_LIMIT:
                problems.add(f"::TopK (K must be a constant below {TOPK_LIMIT})")
            if any(a.name == "sorted" and a.i == 0 for a in node.attribute):
                problems.add("::TopK (sorted must be 1)")
    return sorted(problems)


def operators(model) -> list[str]:
    """The operators a graph uses, as "domain::op_type", sorted."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return sorted({f"{node.domain or ''}::{node.op_type}" for node in nodes})
