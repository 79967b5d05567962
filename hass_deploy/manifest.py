"""`manifest.json`: what an artifacts directory holds and where it came from (DESIGN D7).

Nothing about an export is inferred from a path: the runtime reads I/O names, shapes, dtypes, KV layout, the
size envelope (S_max, tree budget, top-k) and the identities of the target and draft from here; an opened export
(`hass_deploy.artifacts.Artifacts`) refuses a target, draft or request that does not fit them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hass_deploy.errors import ConfigError, HassDeployError, ModelLoadError

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style name: float32, float16, bfloat16, int64, bool
    shape: list  # ints for static axes, names (T, S, R, M) for dynamic ones


@dataclass(frozen=True)
class GraphSpec:
    """One step graph: its file, I/O, KV layout and the operators it uses."""

    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    num_layers: int  # KV layers: one (past_key_i, past_value_i) input pair and (new_key_i, new_value_i) output pair each
    num_kv_heads: int
    head_dim: int
    operators: list[str]  # "domain::op_type", sorted
    tensorrt_unsupported: list[str]  # operators TensorRT's ONNX parser would reject (see `tensorrt_ops.py`)
    external_data: bool
    # "runtime": the graph reads past_* and returns the step's rows as new_*, which the runtime writes (standard
    # graphs). "in_graph": present_* alias past_*, bound at full length, and the graph writes its rows into them
    # (the fused ONNX Runtime graphs, `export/fused.py`).
    kv_update: str = "runtime"
    quantization: str | None = None  # "int8": this graph's MatMul weights are int8
    slots: int | None = None  # a batched step graph: how many sequences one run computes (`export/fused.py`)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs) if any(isinstance(d, str) for d in t.shape)}


@dataclass(frozen=True)
class Manifest:
    engine: str  # "onnx"
    dtype: str  # fp32, fp16 or bf16: the weights and KV buffers
    opset: int
    max_seq_len: int  # S_max: KV rows the runtime may allocate
    max_tree_tokens: int  # the tree budget: most nodes one verification step takes
    max_top_k: int  # K of the draft graph's top-k
    prefill_chunk: int  # longer causal steps run as chunks of this many rows
    target: dict  # identity of the target the graphs were exported from (checkpoint.target_identity)
    draft: dict | None  # identity of the draft head, or None for a target-only export
    # "target", "draft" (standard ops); "target_ort", "draft_ort" (fused, ORT only); "target_ort_batch",
    # "draft_ort_batch" (fused, several sequences' steps in one run: serving's batched steps)
    graphs: dict[str, GraphSpec]
    versions: dict[str, str]  # exporter and library versions
    format_version: int = FORMAT_VERSION
    draft_quantization: str | None = None  # "int8": the draft graph's weights are quantised (export.onnx)
    target_quantization: str | None = None  # "int8": the fused target graph's weights are int8 (export.fused)
    attention: str = "onnx"  # "decomposed": the standard graphs' function operators expanded (export.decompose)
    # TensorRT plans built from the standard graphs (`export/tensorrt.py`): version, GPU, compute capability,
    # precision, profiles and a rebuild key per plan; None for an ONNX-only export.
    tensorrt: dict | None = None
    # The settings the target graphs were made with besides the target (`export/shared.py`): an export of the same
    # target with equal settings may link this one's target graphs. None in manifests from before it was recorded.
    target_settings: dict | None = None
    notes: dict = field(default_factory=dict)  # free-form: how the KV buffers are meant to be bound, etc.

    def write(self, directory: Path) -> Path:
        """Write (or replace, atomically) the manifest in `directory`."""
        path = Path(directory) / MANIFEST_FILE
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)
        return path


def read_manifest(directory: str | Path) -> Manifest:
    """Read and validate an artifacts directory's manifest (one-line errors for anything missing or malformed)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: no such artifacts directory")
    path = directory / MANIFEST_FILE
    if not path.exists():
        raise ModelLoadError(f"{directory}: not an export (no {MANIFEST_FILE}); run `hass-deploy export` first")
    try:
        raw = json.loads(path.read_text())
        version = raw.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise HassDeployError(f"{path}: manifest format {version!r} is newer than this hass-deploy")
        graphs = {name: GraphSpec(**{**g, "inputs": [TensorSpec(**t) for t in g["inputs"]],
                                     "outputs": [TensorSpec(**t) for t in g["outputs"]]})
                  for name, g in raw.pop("graphs").items()}
        manifest = Manifest(**raw, graphs=graphs)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{path}: malformed manifest ({type(err).__name__}: {err})") from None
    for name, graph in manifest.graphs.items():
        if not (directory / graph.file).exists():
            raise ModelLoadError(f"{directory}: the manifest names {graph.file} for the {name} graph, but it is missing")
    return manifest


def batch_graph(manifest: Manifest, graph: str) -> str | None:
    """The batched variant of the fused graph `graph` ("target_ort" -> "target_ort_batch") when it was exported."""
    name = graph + "_batch"
    return name if graph.endswith("_ort") and name in manifest.graphs else None


def runtime_graph(manifest: Manifest, role: str, choice: str = "auto") -> str:
    """Which graph of `role` ("target" or "draft") the ONNX Runtime backend runs: the fused variant when it was
    exported (choice "auto"), or the one asked for ("standard", "fused")."""
    fused = f"{role}_ort"
    if choice == "standard" or (choice == "auto" and fused not in manifest.graphs):
        return role
    if fused not in manifest.graphs:
        raise ConfigError(f"the artifacts hold no fused ONNX Runtime {role} graph (exported with --no-ort-graphs)")
    return fused


def draft_identity(head) -> dict:
    """What a draft head is, for manifests: its shape and a hash of a sample of its fc weight (fp32)."""
    weight = head.fc.weight.detach()
    stride = max(1, weight.shape[0] // 1024)
    sample = weight[::stride].float().contiguous().cpu().numpy().tobytes()
    c = head.config
    identity = {"hidden_size": c.hidden_size, "vocab_size": c.vocab_size, "num_kv_heads": c.num_kv_heads}
    vocabulary = head.vocabulary()
    if vocabulary is not None:  # the token map is part of what the graph computes
        sample += vocabulary.cpu().numpy().tobytes()
        identity["draft_vocab"] = vocabulary.numel()
    return {**identity, "fingerprint": hashlib.sha256(sample).hexdigest()[:16]}


# The step shapes an export's engines accept: TensorRT plans are built for them (`export/tensorrt.py`), and ORT's
# TensorRT provider gets the same ranges (`runtime/backends/onnxruntime.py`). Two optimisation profiles, as
# TensorRT-LLM and Edge-LLM build them.
@dataclass(frozen=True)
class Profile:
    """Row ranges of one optimisation profile: T new rows (min, opt, max) and S bound KV rows."""

    name: str
    rows: tuple[int, int, int]
    kv_rows: tuple[int, int, int]


def profiles(manifest: Manifest) -> list[Profile]:
    """decode (T = 1) and tree/prefill (T = 2 .. the largest step the runtime makes)."""
    largest = max(manifest.max_tree_tokens, manifest.prefill_chunk, 2)
    kv = (1, min(1024, manifest.max_seq_len), manifest.max_seq_len)
    return [Profile("decode", (1, 1, 1), kv),
            Profile("tree_and_prefill", (2, min(manifest.max_tree_tokens, largest), largest), kv)]


def profile_shapes(spec: GraphSpec, profile: Profile) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shapes of every dynamic input of `spec` under `profile`.

    Named axes (manifest): T new rows; R rows that get logits (1 .. T); S bound KV rows; M the rows a draft tree
    level's mask covers (T .. S + T).
    """
    def size(axis: str, which: int) -> int:
        rows, kv = profile.rows[which], profile.kv_rows[which]
        return {"T": rows, "R": rows if which else 1, "S": kv, "M": rows if which == 0 else rows + kv}[axis]

    shapes = {}
    for tensor in spec.inputs:
        if any(isinstance(d, str) for d in tensor.shape):
            shapes[tensor.name] = tuple(tuple(d if isinstance(d, int) else size(d, which) for d in tensor.shape)
                                        for which in range(3))
    return shapes
