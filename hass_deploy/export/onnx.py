"""Export the target and draft step graphs to ONNX (DESIGN D2, D8): `hass-deploy export --engine onnx`.

    out/
      manifest.json        I/O, shapes, dtypes, opset, versions, identities, S_max, tree budget (`manifest.py`)
      target.onnx          target step: prefill and tree verification (`steps.TargetStep`)
      draft.onnx           draft step with the target's lm_head and an in-graph top-k (`steps.DraftStep`)
      *.onnx.data          the weights, beside each graph, when they are large (external data)

The graphs are our own modules through `torch.onnx.export(dynamo=True)`, checked with `onnx.checker` and
against TensorRT's operator table. Everything is written into a temporary directory next to `out` and renamed
into place at the end, so a failed export leaves no half-written directory behind. An export may take its target
graphs from an earlier one of the same target and settings instead of exporting them again (`shared.py`).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from hass_deploy.atomic import check_output_dir, replacing_directory
from hass_deploy.errors import ConfigError, HassDeployError, ModelLoadError
from hass_deploy.export import fused, shared, steps, tensorrt_ops
from hass_deploy.export.config import ExportConfig
from hass_deploy.export.decompose import decompose
from hass_deploy.export.tensorrt import build_engines
from hass_deploy.generation import default_max_seq_len
from hass_deploy.manifest import GraphSpec, Manifest, TensorSpec, draft_identity
from hass_deploy.models.checkpoint import load_draft, target_identity
from hass_deploy.models.draft import DraftHead
from hass_deploy.models.gguf import gguf_source, read_info
from hass_deploy.models.gguf_blocks import Blocks, check_matches, read_blocks
from hass_deploy.models.loading import TargetModel, load_target, parse_dtype
from hass_deploy.models.target import Rotary

# Above this many bytes of weights a graph keeps them in a side file: a single protobuf cannot exceed 2 GiB.
EXTERNAL_DATA_BYTES = 1 << 30
_NUMPY_NAMES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401  (the dynamo exporter's backend)
    except ImportError:
        raise HassDeployError("ONNX export needs the onnx extra: pip install 'hass-deploy[onnx]'") from None


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy in dtype whose RoPE frequencies stay fp32 (as `loading.build_target` does); the caller's is untouched."""
    if dtype == torch.float32:
        return module
    module = copy.deepcopy(module).to(dtype)  # deepcopy keeps tied embeddings tied
    module.rotary = Rotary(module.config)
    return module


def _spec(value) -> TensorSpec:
    tensor_type = value.type.tensor_type
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim]
    return TensorSpec(name=value.name, dtype=_NUMPY_NAMES.get(tensor_type.elem_type, str(tensor_type.elem_type)),
                      shape=shape)


def _weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in module.parameters()}.values())


def _save_graph(module: torch.nn.Module, args: tuple, dynamic_shapes: tuple, input_names: list[str],
                output_names: list[str], path: Path, config: ExportConfig, kv_shape: tuple[int, int, int]) -> GraphSpec:
    """torch.onnx.export (dynamo) one step module, save it, check it, and describe it."""
    external = config.external_data if config.external_data is not None else _weight_bytes(module) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), _quiet_registration(), torch.no_grad():
        # The exporter's own notes, not actionable by a user: torch's pytree deprecation, raised inside torch, and
        # that the dim names we give shared dimensions (T, S) are merged. Every other warning still shows.
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=config.opset, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False)
    program.save(str(path), external_data=external)
    return _describe(path, kv_shape, external)


class _OptionalOpsFilter(logging.Filter):
    """Drops the exporter's note that it skips torchvision's operators (four lines per export when torchvision is
    not installed, which our graphs never use); every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("torchvision is not installed")


@contextmanager
def _quiet_registration():
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    quiet = _OptionalOpsFilter()
    registration.addFilter(quiet)
    try:
        yield
    finally:
        registration.removeFilter(quiet)


def _describe(path: Path, kv_shape: tuple[int, int, int], external: bool, **fields) -> GraphSpec:
    """Check a saved graph and describe it for the manifest."""
    import onnx

    onnx.checker.check_model(str(path))  # by path, so external data is resolved beside the file
    model = onnx.load(str(path), load_external_data=False)
    num_layers, num_kv_heads, head_dim = kv_shape
    return GraphSpec(file=path.name, inputs=[_spec(v) for v in model.graph.input],
                     outputs=[_spec(v) for v in model.graph.output], num_layers=num_layers,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, operators=tensorrt_ops.operators(model),
                     tensorrt_unsupported=tensorrt_ops.unsupported_operators(model), external_data=external, **fields)


def _save_fused(model, path: Path, config: ExportConfig, kv_shape: tuple[int, int, int],
                quantization: str | None, slots: int | None = None) -> GraphSpec:
    """Save a fused ONNX Runtime graph (`fused.py`) with its weights beside it when they are large."""
    import onnx

    weights = sum(t.ByteSize() for t in model.graph.initializer)
    external = config.external_data if config.external_data is not None else weights > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    return _describe(path, kv_shape, external, kv_update="in_graph", quantization=quantization, slots=slots)


def decompose_graph(path: Path, spec: GraphSpec) -> GraphSpec:
    """Rewrite a saved standard graph with its function operators expanded (`decompose.py`), in place."""
    import onnx

    model, _ = decompose(onnx.load(str(path)))
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=spec.external_data, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    num_kv = (spec.num_layers, spec.num_kv_heads, spec.head_dim)
    return _describe(path, num_kv, spec.external_data, kv_update=spec.kv_update, quantization=spec.quantization)


def int4_blocks(target: TargetModel) -> dict[str, Blocks]:
    """`--target-quantization int4`: the 4-bit (and 8-bit) blocks of the GGUF file the target was converted from,
    checked to dequantize to the target's weights bit for bit; one line for a target without such a file."""
    source = gguf_source(target.path)
    if source is None:
        raise ConfigError(f"--target-quantization int4 takes the 4-bit blocks of the GGUF file a target was "
                          f"converted from, and {target.path} is not a converted GGUF (use --target-quantization "
                          "int8, or --target model.gguf)")
    c = target.config
    blocks = read_blocks(source, c.num_heads, c.num_kv_heads)
    if not any(b.bits == 4 for b in blocks.values()):
        raise ConfigError(f"{source}: no Q4_0 or Q4_1 weights (file type {read_info(source).file_type}), and "
                          "--target-quantization int4 takes the file's own 4-bit blocks (use int8)")
    weights = {name: tensor.float().numpy() for name, tensor in target.module.state_dict().items()}
    check_matches(blocks, weights, source)
    return blocks


def export_fused_graphs(target_module: torch.nn.Module, draft: DraftHead | None, directory: Path,
                        config: ExportConfig, max_seq_len: int, log: Callable[[str], None],
                        blocks: dict[str, Blocks] | None = None, with_target: bool = True) -> dict[str, GraphSpec]:
    """Write the fused ONNX Runtime graphs (`target.ort.onnx`, `draft.ort.onnx`, and with --ort-batch their batched
    variants `target_batch.ort.onnx`, `draft_batch.ort.onnx`) for the runtime to run; an int4 target takes `blocks`
    (`int4_blocks`). `with_target` False: the draft's only (the target's are shared)."""
    c = target_module.config
    positions = max_seq_len + config.max_tree_tokens  # RoPE table rows: every position a target or draft row takes
    target_kv = (c.num_layers, c.num_kv_heads, c.head_dim)
    graphs = {}
    # (None, "") the one-sequence graphs; (N, "_batch") their batched variants (--ort-batch N)
    variants = [(None, "")] + ([(config.ort_batch, "_batch")] if config.ort_batch else [])
    for slots, name in variants:
        batched = f", {slots} sequences a run" if slots else ""
        if with_target:
            quantized = f", {config.target_quantization} weights" if config.target_quantization else ""
            log(f"writing the fused ONNX Runtime target graph{quantized}{batched}")
            model = fused.target_graph(target_module, positions, config.target_quantization, blocks, slots)
            if config.target_quantization == "int4" and slots is None:
                kinds = {prop.key: prop.value for prop in model.metadata_props}[fused.WEIGHTS_PROP]
                log(f"linear weights: {kinds} (the GGUF's blocks as they are; fp32: a type MatMulNBits does not "
                    "hold, the converted weights)")
            graphs[f"target_ort{name}"] = _save_fused(model, directory / f"target{name}.ort.onnx", config, target_kv,
                                                      config.target_quantization, slots)
        if draft is not None:
            quantized = f", {config.draft_quantization} weights" if config.draft_quantization else ""
            log(f"writing the fused ONNX Runtime draft graph{quantized}{batched}")
            graph = fused.draft_graph(draft, target_module.lm_head, config.max_top_k, positions,
                                      config.draft_quantization, slots)
            draft_kv = (1, draft.config.num_kv_heads, draft.config.head_dim)
            graphs[f"draft_ort{name}"] = _save_fused(graph, directory / f"draft{name}.ort.onnx", config, draft_kv,
                                                     config.draft_quantization, slots)
    return graphs


def _dims(config: ExportConfig, max_seq_len: int):
    from torch.export import Dim

    # Sample sizes are >= 2 and pairwise different, so torch.export neither specialises an axis to 0/1 nor
    # unifies two axes that merely happen to be equal in the sample.
    rows = Dim("T", min=1, max=max_seq_len)  # new rows in one step
    kv = Dim("S", min=1, max=max_seq_len + 4096)  # KV rows bound (the runtime binds a context-sized view)
    logit_rows = Dim("R", min=1, max=max_seq_len)  # rows that get logits
    mask_cols = Dim("M", min=1, max=max_seq_len + 4096)  # the draft's tree levels see earlier levels' rows
    return rows, kv, logit_rows, mask_cols


def _kv_samples(config, layers: int, rows: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.zeros(1, config.num_kv_heads, rows, config.head_dim, dtype=dtype) for _ in range(2 * layers)]


def export_target_graph(target: torch.nn.Module, path: Path, config: ExportConfig, max_seq_len: int) -> GraphSpec:
    """Write the target step graph (see `steps.TargetStep`) to `path`."""
    c, dtype = target.config, target.embed_tokens.weight.dtype
    rows, kv, logit_rows, _ = _dims(config, max_seq_len)
    t, s, r = 3, 7, 2
    args = (torch.zeros(1, t, dtype=torch.long), torch.arange(4, 4 + t)[None], torch.tensor([4]),
            torch.ones(t, t, dtype=torch.bool).tril()[None], torch.arange(t - r, t),
            *_kv_samples(c, c.num_layers, s, dtype))
    dynamic = ({1: rows}, {1: rows}, None, {1: rows, 2: rows}, {0: logit_rows}, tuple({2: kv} for _ in args[5:]))
    return _save_graph(steps.TargetStep(target).eval(), args, dynamic,
                       steps.TARGET_INPUTS + steps.kv_input_names(c.num_layers),
                       steps.TARGET_OUTPUTS + steps.kv_output_names(c.num_layers), path, config,
                       (c.num_layers, c.num_kv_heads, c.head_dim))


def export_draft_graph(head: DraftHead, lm_head: torch.nn.Linear, path: Path, config: ExportConfig,
                       max_seq_len: int) -> GraphSpec:
    """Write the draft step graph (see `steps.DraftStep`) to `path`."""
    c, dtype = head.config, head.fc.weight.dtype
    rows, kv, _, mask_cols = _dims(config, max_seq_len)
    t, m, s = 3, 5, 7
    if config.max_top_k > c.vocab_size:
        raise ConfigError(f"--max-top-k {config.max_top_k} is more than the vocabulary ({c.vocab_size})")
    mask = torch.ones(1, t, m, dtype=torch.bool)
    args = (torch.zeros(1, t, c.hidden_size, dtype=dtype), torch.zeros(1, t, dtype=torch.long),
            torch.arange(4, 4 + t)[None], torch.tensor([4]), mask, *_kv_samples(c, 1, s, dtype))
    dynamic = ({1: rows}, {1: rows}, {1: rows}, None, {1: rows, 2: mask_cols}, tuple({2: kv} for _ in args[5:]))
    return _save_graph(steps.DraftStep(head, lm_head, config.max_top_k).eval(), args, dynamic,
                       steps.DRAFT_INPUTS + steps.kv_input_names(1), steps.DRAFT_OUTPUTS + steps.kv_output_names(1),
                       path, config, (1, c.num_kv_heads, c.head_dim))


def quantize_draft_graph(path: Path, spec: GraphSpec) -> GraphSpec:
    """Replace the draft graph at `path` by `<stem>.int8.onnx`: int8 MatMul weights, activations quantised per run.

    On a few CPU cores a draft step is bound by reading its weights (the lm_head alone is as large as the
    target's), so a quarter of the bytes is most of the gain; the embedding table is gathered, not multiplied,
    and stays fp32. The step contract (inputs, outputs, KV rows) is unchanged. A new file name rather than an
    in-place swap, because an external-data graph names its weights file after itself.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantized = path.with_name(path.stem + ".int8.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice to pre-process (shape inference) is for CNNs, not this
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(path, quantized, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                             use_external_data_format=spec.external_data)
    finally:
        root.setLevel(level)
    path.unlink()
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    onnx.checker.check_model(str(quantized))
    model = onnx.load(str(quantized), load_external_data=False)
    return replace(spec, file=quantized.name, operators=tensorrt_ops.operators(model),
                   tensorrt_unsupported=tensorrt_ops.unsupported_operators(model), quantization="int8")


def _versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for package in ("hass-deploy", "torch", "onnx", "onnxscript", "onnxruntime", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    versions["exporter"] = "torch.onnx.export(dynamo=True)"
    return versions


def export_onnx(target: TargetModel, draft: DraftHead | None, out: str | Path, config: ExportConfig = ExportConfig(),
                force: bool = False, log: Callable[[str], None] = lambda _: None,
                target_from: str | Path | None = None) -> Manifest:
    """Export a target (and its draft head) as ONNX step graphs into `out`, atomically.

    Args:
        target: the target, loaded in fp32 (its identity is recorded from fp32 weights); cast to `config.dtype` here.
        draft: the draft head for `target`, or None for a target-only export (plain decoding).
        out: the artifacts directory to create (or, with force, replace).
        config: dtype, S_max, tree budget, top-k, opset.
        force: replace a non-empty `out`.
        log: receives one line per stage.
        target_from: an earlier export of this target with the same target settings (`shared.target_settings`)
            whose target graphs `out` links instead of exporting its own; refused (one line) when they differ.

    Returns:
        The manifest written to `out/manifest.json`.
    """
    _require_onnx()
    out = Path(out)
    check_output_dir(out, force)
    max_seq_len = config.max_seq_len or default_max_seq_len(target)
    if config.max_tree_tokens >= max_seq_len:
        raise ConfigError(f"a tree budget of {config.max_tree_tokens} tokens does not fit S_max = {max_seq_len} "
                          "KV rows; lower --max-tree-tokens or raise --max-seq-len")
    if target.embedding.dtype != torch.float32:
        raise ModelLoadError("export_onnx takes the target in fp32 and casts it itself (load it with dtype='fp32')")
    identity, head_identity = target_identity(target), None if draft is None else draft_identity(draft)
    if draft is not None and draft.draft_vocab is not None and draft.draft_vocab < config.max_top_k:
        raise ConfigError(f"the draft scores {draft.draft_vocab} tokens, fewer than --max-top-k {config.max_top_k}")
    write_fused = config.fused
    reason = fused.unsupported_reason(target.config) if write_fused else None
    if reason is not None:
        if config.target_quantization is not None or config.ort_graphs:
            raise ConfigError(f"no fused ONNX Runtime graphs for this target: {reason}; export with --no-ort-graphs")
        log(f"no fused ONNX Runtime graphs for this target ({reason}): the runtime will run the standard graphs")
        write_fused = False
    settings = shared.target_settings(config, max_seq_len, write_fused)
    reused = None if target_from is None else shared.shared_target_graphs(Path(target_from), identity, settings)
    blocks = int4_blocks(target) if config.target_quantization == "int4" and reused is None else None
    dtype = parse_dtype(config.dtype)
    target_module = _cast(target.module, dtype)  # its lm_head is in the draft graphs too
    draft_module = None if draft is None else _cast(draft, dtype)

    with replacing_directory(out) as tmp:
        if reused is None:
            log(f"exporting the target step graph ({config.dtype}, opset {config.opset})")
            graphs = {"target": export_target_graph(target_module, tmp / "target.onnx", config, max_seq_len)}
        else:
            log(f"linking the target graphs of {target_from} (the same target and settings)")
            shared.link_graphs(Path(target_from), reused, tmp)
            graphs = dict(reused)
        if draft_module is not None:
            log("exporting the draft step graph")
            graphs["draft"] = export_draft_graph(draft_module, target_module.lm_head, tmp / "draft.onnx", config,
                                                 max_seq_len)
            if config.draft_quantization == "int8" and not write_fused:
                log("quantising the draft graph's MatMul weights to int8")
                graphs["draft"] = quantize_draft_graph(tmp / "draft.onnx", graphs["draft"])
        if config.attention == "decomposed":
            log("expanding RMSNormalization and RotaryEmbedding into plain operators (--attention decomposed)")
            for name in ("draft",) if reused is not None else ("target", "draft"):  # a linked one is already
                if name in graphs:
                    graphs[name] = decompose_graph(tmp / graphs[name].file, graphs[name])
        if write_fused:
            graphs.update(export_fused_graphs(target.module, draft, tmp, config, max_seq_len, log, blocks,
                                              with_target=reused is None))
        manifest = Manifest(
            engine="onnx", dtype=config.dtype, opset=config.opset, max_seq_len=max_seq_len,
            max_tree_tokens=config.max_tree_tokens, max_top_k=config.max_top_k, prefill_chunk=config.prefill_chunk,
            target=identity, draft=head_identity, graphs=graphs, versions=_versions(),
            draft_quantization=config.draft_quantization if draft is not None else None,
            target_quantization=config.target_quantization, attention=config.attention, target_settings=settings,
            notes={"kv": "past_* inputs are read-only KV buffers [1, H_kv, S, D] of which rows < cache_len are valid; "
                         "new_* outputs are the step's rows, to be written at cache_len.. by the runtime"})
        manifest.write(tmp)
    return manifest


def export_artifacts(target_dir: str | Path, draft_dir: str | Path | None, out: str | Path,
                     config: ExportConfig = ExportConfig(), force: bool = False,
                     log: Callable[[str], None] = lambda _: None, target_from: str | Path | None = None) -> Manifest:
    """`hass-deploy export`: check the cheap things first (engine, output directory), then load and export.

    Args:
        target_dir: the target's Hugging Face directory.
        draft_dir: the draft head's directory, or None for a target-only export.
        out, config, force, log, target_from: as for `export_onnx`.
    """
    _require_onnx()
    check_output_dir(Path(out), force)
    target = load_target(target_dir, "fp32", tokenizer=False)
    head = None if draft_dir is None else load_draft(draft_dir, target)[0]
    manifest = export_onnx(target, head, out, config, force, log, target_from)
    # The fused graphs are ONNX Runtime's by design; only the standard graphs are meant for TensorRT.
    unsupported = sorted({op for graph in manifest.graphs.values() if graph.kv_update == "runtime"
                          for op in graph.tensorrt_unsupported})
    if unsupported:
        log(f"warning: TensorRT's ONNX parser would reject: {', '.join(unsupported)}")
    if config.engine == "trt":
        manifest = _engines(Path(out), manifest, log)
    return manifest


def _engines(out: Path, manifest: Manifest, log: Callable[[str], None]) -> Manifest:
    """TensorRT plans beside the (complete, already written) ONNX graphs; the manifest records them."""
    try:
        manifest = build_engines(out, manifest, log)
    except HassDeployError as err:
        raise HassDeployError(f"the ONNX graphs are complete in {out}; {err}") from None
    manifest.write(out)
    return manifest
