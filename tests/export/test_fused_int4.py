"""`--target-quantization int4` (export/fused.py, export/onnx.py `int4_blocks`): the fused target graph's weights are
the GGUF's own blocks, which ONNX Runtime's MatMulNBits kernel dequantizes, tensor by tensor, to exactly the weights
transformers' GGUF loader converted the file to; a weight of another type stays an fp32 MatMul of them; a target
without a GGUF of 4-bit blocks gets one line and exit code 1. (Losslessness: tests/runtime/backends.)"""

from __future__ import annotations

import re

import numpy as np
import pytest

from export.test_cli_export import invoke, one_line_error
from models.gguf_files import write_gguf
from ort_artifacts import INT4
from hass_deploy.errors import ConfigError
from hass_deploy.export import fused
from hass_deploy.export.config import ExportConfig
from hass_deploy.export.onnx import export_onnx
from hass_deploy.models.gguf import convert_gguf
from hass_deploy.models.loading import load_target
from hass_deploy.models.random_target import random_hf_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def linear_alone(model, node):
    """The nodes from a MatMulNBits node's input x to its linear's output (the Q4_1 min's Add, when there is one), as
    a graph of their own at accuracy level 0: fp32 activations, so that on the identity every output is one weight
    as the kernel dequantizes it (level 4 would round the identity's rows to int8 blocks as well)."""
    graph, x = model.graph, node.input[0]
    initializers = {i.name: i for i in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    last = next((n for n in graph.node if n.op_type == "Add" and node.output[0] in n.input
                 and not any(i in initializers for i in n.input)), node)
    chosen, stack = set(), [last]
    while stack:
        current = stack.pop()
        chosen.add(current.name)
        stack += [producers[i] for i in current.input if i != x and i in producers]
    nodes = []
    for n in graph.node:
        if n.name in chosen:
            n = onnx.NodeProto.FromString(n.SerializeToString())
            for attr in n.attribute:
                if attr.name == "accuracy_level":
                    attr.i = 0
            nodes.append(n)
    used = {i for n in nodes for i in n.input}
    k = next(a.i for a in node.attribute if a.name == "K")
    sub = onnx.helper.make_graph(nodes, "linear", [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT,
                                                                                      [1, "T", k])],
                                 [onnx.helper.make_tensor_value_info(last.output[0], onnx.TensorProto.FLOAT, None)],
                                 [initializers[name] for name in used if name in initializers])
    return onnx.helper.make_model(sub, opset_imports=model.opset_import), k


def layers_of(hint: str, module):
    """The linear layers a fused graph's product named `hint` stacks (fused.py's hints)."""
    if hint == "lm_head":
        return [module.lm_head]
    index, part = re.fullmatch(r"l(\d+)_(\w+)", hint).groups()
    layer = module.layers[int(index)]
    attn, mlp = layer.self_attn, layer.mlp
    return {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "o": [attn.o_proj], "gate_up": [mlp.gate_proj, mlp.up_proj],
            "down": [mlp.down_proj]}[part]


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_the_kernel_dequantizes_the_ggufs_blocks_to_the_converted_weights_bit_for_bit(variant, int4_exports):
    target, _, out = int4_exports[variant]
    model = onnx.load(str(out / "target.ort.onnx"))
    summary = {p.key: p.value for p in model.metadata_props}[fused.WEIGHTS_PROP]
    counts = {kind: int(n) for n, kind in (part.split(" ") for part in summary.split(", "))}
    head = {"tied": "Q8_0", "untied": "Q4_1"}[variant]
    # gguf_files.q4_types: layer 0 Q4_0 but its K, layer 1 Q4_1 but its F16 down, and the lm_head.
    assert counts == {"Q4_0": 6 + (head == "Q4_0"), "Q4_1": 7 + (head == "Q4_1"), "fp32": 1,
                      **({"Q8_0": 1} if head == "Q8_0" else {})}
    seen = set()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        hint = next(i for i in node.input if "_q_" in i).rsplit("_q_", 1)[0]
        seen.add(hint)
        sub, k = linear_alone(model, node)
        session = ort.InferenceSession(sub.SerializeToString(), _options(ort), providers=["CPUExecutionProvider"])
        product = session.run(None, {node.input[0]: np.eye(k, dtype=np.float32)[None]})[0][0]  # [K, N] = w^T
        weight = np.concatenate([layer.weight.detach().numpy() for layer in layers_of(hint, target.module)])
        assert np.array_equal(product.T, weight), hint
        bits = next(a.i for a in node.attribute if a.name == "bits")
        assert bits == (8 if hint == "lm_head" and head == "Q8_0" else 4), hint
    assert seen == {"l0_qkv", "l0_o", "l0_gate_up", "l0_down", "l1_qkv", "l1_o", "l1_gate_up", "lm_head"}
    # The F16 weight: an fp32 MatMul of the converted values.
    down = next(n for n in model.graph.node if n.op_type == "MatMul" and n.output[0].startswith("l1_down"))
    stored = next(i for i in model.graph.initializer if i.name == down.input[1])
    assert np.array_equal(onnx.numpy_helper.to_array(stored).T, target.module.layers[1].mlp.down_proj.weight.detach().numpy())


def test_int4_needs_a_gguf_with_4bit_blocks(fusable_targets, fusable_dirs, tmp_path):
    with pytest.raises(ConfigError, match="is not a converted GGUF"):
        export_onnx(fusable_targets["llama"], None, tmp_path / "a", INT4)
    model = random_hf_model("llama", "tiny", seed=4, hidden_size=64, intermediate_size=128, vocab_size=96)
    f32 = convert_gguf(write_gguf(model, tmp_path / "f32.gguf"), tmp_path / "f32", progress=False)
    with pytest.raises(ConfigError, match=r"no Q4_0 or Q4_1 weights \(file type F32\)"):
        export_onnx(load_target(f32, tokenizer=False), None, tmp_path / "b", INT4)
    with pytest.raises(ConfigError, match="--target-quantization int4 quantises the fused"):
        ExportConfig(target_quantization="int4", ort_graphs=False)
    with pytest.raises(ConfigError, match="must be one of int8, int4"):
        ExportConfig(target_quantization="int2")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    one_line_error(invoke("export", "--target", fusable_dirs["llama"], "--no-draft", "--out", tmp_path / "c",
                          "--target-quantization", "int4"), "is not a converted GGUF")


def _options(ort):
    """Session options that work in a process whose ORT backend already made the global thread pools (the whole
    suite) and in one where none exist yet (this file alone): the same pools the backend uses."""
    try:
        ort.capi._pybind_state.set_global_thread_pool_sizes(1, 1)
    except Exception as err:
        if "already been created" not in str(err):
            raise
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    return options

