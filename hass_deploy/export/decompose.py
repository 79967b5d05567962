"""The `decomposed` export variant: opset-23 function operators expanded into the plain operators that define them.

The exporter fuses our RMSNorm and RoPE into ONNX's `RMSNormalization` and `RotaryEmbedding` (opset 23). TensorRT's
ONNX parser imports them only from 10.15 (trt-notes §0), and an importer that fails to find a fused kernel has
nothing to fall back on. Both are *function* operators: the ONNX standard defines each as a small graph of
ReduceMean, Sqrt, Div, Mul, Split, Concat... (with the norm's reduction in fp32, its `stash_type`). This pass
replaces every such node by that definition, taken from ONNX's own schema for the node's attributes and input
types, so the graph computes the same thing in operators every TensorRT 10 parser (and every ONNX runtime) has.
Attention in our graphs is MatMul/Softmax/Where already (`models/target.py`, `blocked_attention`).
"""

from __future__ import annotations

FUNCTION_OPS = ("RMSNormalization", "RotaryEmbedding", "Attention")
_DOMAIN = "hass_deploy.decompose"  # a model-local domain for the expanded bodies, inlined away before saving


def decompose(model, ops: tuple[str, ...] = FUNCTION_OPS):
    """A copy of `model` whose nodes of `ops` (default-domain function operators) are replaced by the operators
    of their ONNX definitions. Returns (model, number of nodes expanded)."""
    import onnx
    from onnx import helper, inliner, shape_inference

    model = onnx.ModelProto.FromString(model.SerializeToString())
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    # The definitions depend on input element types (the norm casts to its stash type and back).
    inferred = shape_inference.infer_shapes(model)
    types = {v.name: v.type for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({t.name: helper.make_tensor_type_proto(t.data_type, list(t.dims)) for t in model.graph.initializer})
    functions = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            continue
        schema = onnx.defs.get_schema(node.op_type, opset)
        inputs = [(types[name] if name else onnx.TypeProto()).SerializeToString() for name in node.input]
        body = onnx.FunctionProto.FromString(schema.get_context_dependent_function(node.SerializeToString(), inputs))
        body.name, body.domain = f"{node.op_type}_{len(functions)}", _DOMAIN
        node.op_type, node.domain = body.name, _DOMAIN
        functions.append(body)
    if not functions:
        return model, 0
    model.functions.extend(functions)
    model.opset_import.append(helper.make_opsetid(_DOMAIN, 1))
    model = inliner.inline_local_functions(model)
    del model.opset_import[[o.domain for o in model.opset_import].index(_DOMAIN)]
    _drop_unused_initializers(model)
    return model, len(functions)


def _drop_unused_initializers(model) -> None:
    """The expanded bodies leave some of the exporter's shared constants unreferenced."""
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
