"""The ONNX Runtime backend: the exported step graphs over KV buffers the backend owns (DESIGN D2, D8).

The graphs read the KV buffers and return only the step's new K/V rows (`export/steps.py`); this module owns
the buffers as torch tensors, binds them to the sessions by pointer (IO binding: zero copy on CPU and on CUDA),
writes the new rows itself and compacts the accepted path itself, both O(new rows). Per step only tiny
tensors are copied into bound staging buffers (through a run plan cached per step shape): ids, positions,
cache_len, the tree mask.

The standard graphs attend over every bound row, so their buffers are bound as a context-sized view that grows
with the context (`runtime/kv.py`, `full=False`); the fused graphs read only the rows in use and are bound at
full length.

`onnxruntime` is imported inside this module, so `import hass_deploy` works without it.
"""

from __future__ import annotations

import math
import platform
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hass_deploy.errors import ConfigError, HassDeployError, ModelLoadError
from hass_deploy.cache import json_key
from hass_deploy.manifest import GraphSpec, Manifest, batch_graph, profile_shapes, profiles, runtime_graph
from hass_deploy.models.loading import parse_dtype
from hass_deploy.models.target import causal_tree_mask
from hass_deploy.runtime.backends.base import (DraftBackend, DraftOutput, DraftSequenceStep, SequenceStep, TargetBackend,
                                               TargetOutput, run_chunked)
from hass_deploy.runtime.kv import KVBuffers

# ONNX TensorProto element types of the torch dtypes bound to the graphs (IO binding takes the int for bf16).
_ONNX_TYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.int64: 7, torch.bool: 9}
MAX_PLANS = 64  # run plans cached per session (one per distinct step shape, until the KV layout moves)
_INPUT_DTYPES = {"input_ids": torch.int64, "position_ids": torch.int64, "cache_len": torch.int64,
                 "tree_mask": torch.bool, "logits_index": torch.int64}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise HassDeployError("the onnxruntime backend needs ONNX Runtime: pip install 'hass-deploy[onnx]'") from None
    return onnxruntime


@dataclass(frozen=True)
class OrtConfig:
    """Session settings, tuned for batch-1 decoding on a few CPU cores (deploy-notes §3, cpu-notes §4)."""

    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    threads: int = 0  # intra-op threads; 0 = ORT's default, one per physical core
    # CPU: the target and draft sessions run on ORT's one process-wide intra-op pool, whose threads spin between
    # runs. Per-session pools either sleep between runs (each of the ~100 parallel ops of a step then pays a thread
    # wake-up: a T = 1 step of the default demo target took 3.7 ms instead of 2.2 ms on 2 cores) or, spinning,
    # hold the cores the other session needs (speculative decoding 31 % slower). docs/ONNX.md has the numbers.
    shared_pool: bool = True
    spinning: bool = False  # per-session pools only (shared_pool=False)
    optimization: str = "all"  # ORT graph optimisation level: basic, extended or all
    # On CPU torch only does bookkeeping beside ORT (ids, masks, argmax, KV row copies), but its OpenMP pool
    # spin-waits after each parallel op and starves ORT's threads: with torch at 2 threads on 2 cores a T = 8
    # step took 8.2 ms instead of 2.1 ms and a 32-row KV write 7.7 ms instead of 13 µs (docs/ONNX.md). 1 pins
    # torch to one thread when the backend opens; None leaves torch's setting alone (e.g. OMP_WAIT_POLICY=PASSIVE).
    torch_threads: int | None = 1
    cache_optimized: bool = True  # keep the optimised graph in <artifacts>/cache and reuse it on the next load
    # "auto": the fused graphs (`export/fused.py`) when the export has them, else the standard ones; "standard" or
    # "fused" to insist (benchmarks compare the two).
    graphs: str = "auto"
    # On a GPU: "auto" runs the graphs with ORT's CUDA provider; "tensorrt" with its TensorRT provider (engines built
    # by ORT on first use and cached beside the artifacts; the CUDA provider takes any node TensorRT does not).
    provider: str = "auto"

    def __post_init__(self) -> None:
        if self.provider not in ("auto", "tensorrt"):
            raise ConfigError(f"the ORT provider must be auto or tensorrt, got {self.provider!r}")
        if self.provider == "tensorrt" and self.device == "cpu":
            raise ConfigError("ONNX Runtime's TensorRT provider runs on an NVIDIA GPU: use --device cuda")
        if self.graphs not in ("auto", "standard", "fused"):
            raise ConfigError(f"ORT graphs must be auto, standard or fused, got {self.graphs!r}")
        if self.optimization not in ("basic", "extended", "all"):
            raise ConfigError(f"ORT optimization must be basic, extended or all, got {self.optimization!r}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ConfigError(f"the onnxruntime backend runs on cpu or cuda[:N], not {self.device!r}")


def _providers(ort, device: torch.device, tensorrt: dict[str, str] | None = None) -> list:
    """The session's providers; `tensorrt`: options of ORT's TensorRT provider to put first (`tensorrt_options`)."""
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise HassDeployError("this ONNX Runtime has no CUDA execution provider: pip install onnxruntime-gpu")
    index = device.index or 0
    # ORT enqueues on torch's current stream, so the bound torch tensors need no extra synchronisation.
    stream = str(torch.cuda.current_stream(index).cuda_stream)
    providers = [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": stream}), "CPUExecutionProvider"]
    if tensorrt is None:
        return providers
    if "TensorrtExecutionProvider" not in available:
        raise HassDeployError("this ONNX Runtime has no TensorRT execution provider: install onnxruntime-gpu with "
                              "TensorRT 10 (libnvinfer on the library path), or drop --ort-provider tensorrt")
    options = {"device_id": str(index), "has_user_compute_stream": "1", "user_compute_stream": stream, **tensorrt}
    return [("TensorrtExecutionProvider", options), *providers]


def tensorrt_options(spec, profile_shapes: list[dict[str, tuple[tuple[int, ...], ...]]],
                     cache: Path) -> dict[str, str]:
    """ORT TensorRT provider options for one graph: engines and timing cached in `cache`, and an explicit shape range
    for every dynamic input (else ORT rebuilds the engine whenever a step's shape leaves the range it has seen).

    `profile_shapes`: (min, opt, max) per dynamic input of each of the export's profiles, decode first
    (`manifest.profile_shapes`); ORT gets one range spanning them, from decode's minimum to the largest
    step's maximum, tuned for the tree step.
    """
    def shapes(which: int, profile: dict) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, profile[name][which]))}" for name in sorted(profile))

    return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache / f"trt-{Path(spec.file).stem}"),
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache),
            "trt_profile_min_shapes": shapes(0, profile_shapes[0]),
            "trt_profile_opt_shapes": shapes(1, profile_shapes[-1]),
            "trt_profile_max_shapes": shapes(2, profile_shapes[-1])}


def _cache_path(graph: Path, provider: str, config: OrtConfig, ort) -> Path:
    """Where the optimised graph of `graph` lives: keyed by the source file, ORT version, provider and machine,
    because ORT's optimised graphs may hold hardware-specific layouts."""
    stat = graph.stat()
    digest = json_key([stat.st_size, stat.st_mtime_ns, ort.__version__, provider, config.optimization,
                       platform.machine()], length=12)
    return graph.parent / "cache" / f"{graph.stem}.{provider.lower()}.{digest}.onnx"


def open_session(graph: Path, device: torch.device, config: OrtConfig, tensorrt: dict[str, str] | None = None):
    """An InferenceSession for `graph`, reusing (or writing) its optimised form in the artifacts' cache (not with
    ORT's TensorRT provider, `tensorrt`: a graph with compiled nodes cannot be saved; TensorRT caches its engines)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if config.shared_pool and device.type == "cpu":
        # Sizes the global pools ORT creates on first use; the sessions then use no pools of their own. Once the
        # pools exist (an earlier session in this process) ORT refuses new sizes, and the existing pools serve.
        try:
            ort.capi._pybind_state.set_global_thread_pool_sizes(config.threads, 1)
        except Exception as err:  # onnxruntime's Fail, which it does not export under a stable name
            if "already been created" not in str(err):
                raise
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = config.threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spinning else "0")
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options.log_severity_level = 3  # errors only: ORT's warnings (e.g. on saving an optimised graph) are not actionable
    providers = _providers(ort, device, tensorrt)
    cached = _cache_path(graph, device.type, config, ort) if config.cache_optimized and tensorrt is None else None
    if cached is not None and cached.exists():
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimised already
        try:
            return ort.InferenceSession(str(cached), options, providers=providers)
        except Exception:  # a cache left half-written by an interrupted run: drop it and optimise again
            for stale in (cached, cached.with_name(cached.name + ".data")):
                stale.unlink(missing_ok=True)
    options.graph_optimization_level = levels[config.optimization]
    if cached is not None and _writable(cached.parent):
        options.optimized_model_filepath = str(cached)
        # Weights of the optimised graph go to a side file, so a large model stays under protobuf's 2 GiB.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", cached.name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        return ort.InferenceSession(str(graph), options, providers=providers)
    except Exception as err:  # ORT raises its own exception types; name the graph and the usual cause
        message = " ".join(str(err).split())
        if "NOT_IMPLEMENTED" in message:
            raise HassDeployError(f"{graph}: ONNX Runtime's {device.type} provider cannot run this graph ({message}); "
                                  "bf16 graphs need CUDA, export fp32 or fp16 for CPU") from None
        raise ModelLoadError(f"{graph}: ONNX Runtime cannot load it ({message})") from None


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(exist_ok=True)
        probe = directory / ".write-test"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


class Staging:
    """Grow-only device buffers, one per name, handed out as contiguous views of exact shape.

    Every step shape takes its inputs and outputs from the same buffers, so memory follows the largest step (a
    prefill chunk), not the number of shapes seen. A view's address only changes when its buffer grows
    (geometrically, so rarely); `allocations` counts those moments.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[str, torch.Tensor] = {}
        self.allocations = 0

    def view(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < count or buffer.dtype != dtype:
            size = max(count, 2 * buffer.numel() if buffer is not None and buffer.dtype == dtype else count)
            buffer = torch.empty(size, dtype=dtype, device=self.device)
            self.buffers[name] = buffer
            self.allocations += 1
        return buffer[:count].view(shape)


@dataclass(frozen=True)
class _Plan:
    """Everything one step shape needs, made once: views of the staging buffers for its inputs and outputs, the
    KV views and the IO binding that points the session at all of them. A step then only copies its few small
    inputs in."""

    inputs: dict[str, torch.Tensor]  # the small per-step inputs (ids, positions, cache_len, mask, ...)
    constants: dict[str, torch.Tensor]  # inputs that follow from the shape (causal mask, logit rows); held: bound
    outputs: dict[str, torch.Tensor]  # logits / hidden / top-k, overwritten by the next run
    new_rows: torch.Tensor | None  # [L, 2, 1, H_kv, T, D] the step's new K/V rows (None: the graph writes them)
    binding: object  # onnxruntime.IOBinding


class _Stepper:
    """What the target and draft backends share: a session, KV buffers, cached run plans, and the chunking of
    long causal steps into pieces of `chunk` rows.

    Per-step host work matters on 2 CPU cores: a round of speculative decoding makes four graph runs of a few
    milliseconds each, so the plan (buffers, per-layer KV views, binding) is built once per step shape and KV
    layout instead of on every run.

    Two KV contracts (`GraphSpec.kv_update`): a standard graph returns the step's rows and the stepper writes them
    into a context-sized view; a fused graph writes them itself into buffers bound at full length (its attention
    reads only the rows in use), its present_* outputs bound to the same memory as its past_* inputs.
    """

    def __init__(self, session, spec: GraphSpec, dtype: torch.dtype, device: torch.device, max_len: int, chunk: int):
        self.session = session
        self.spec, self.dtype, self.device, self.max_len, self.chunk = spec, dtype, device, max_len, chunk
        self.device_type, self.device_id = device.type, device.index or 0
        self.in_graph = spec.kv_update == "in_graph"
        self.kv = KVBuffers(spec.num_layers, spec.num_kv_heads, spec.head_dim, max_len, dtype, device,
                            full=self.in_graph)
        self.staging = Staging(device)
        self.plans: dict[tuple, _Plan] = {}

    def run(self, key: tuple, feeds: dict[str, torch.Tensor], shape: Callable[[], tuple[dict, dict]],
            cache_len: int, steps: int) -> dict[str, torch.Tensor]:
        """One graph run of `steps` new rows at cache_len; returns the named outputs (views of staging, valid until
        the next run).

        `key` names the step's shape: every input and output shape follows from it. `feeds` change from run to
        run and are copied into the plan's staging buffers (converting dtype). `shape()` is called only when a
        plan is made, and returns the inputs that follow from the shape alone (a causal mask, the rows that get
        logits), which the plan owns and binds once, and the outputs {name: (shape, dtype)}.
        """
        if self.kv.reserve(cache_len + steps):
            self.plans.clear()  # the KV views moved
        plan = self.plans.get(key)
        if plan is None:
            allocations = self.staging.allocations
            plan = self._plan(feeds, *shape(), steps)
            if self.staging.allocations != allocations or len(self.plans) >= MAX_PLANS:
                self.plans.clear()  # a staging buffer moved: the other plans still point at (and hold) the old one
            self.plans[key] = plan
        for name, value in feeds.items():
            plan.inputs[name].copy_(value)
        plan.inputs["cache_len"].fill_(cache_len)
        self.session.run_with_iobinding(plan.binding)
        if plan.new_rows is not None:
            self.kv.write(cache_len, plan.new_rows)
        return plan.outputs

    def _plan(self, feeds: dict[str, torch.Tensor], constants: dict[str, torch.Tensor],
              outputs: dict[str, tuple[tuple[int, ...], torch.dtype]], steps: int) -> _Plan:
        spec, staging = self.spec, self.staging
        inputs = {name: staging.view(name, tuple(value.shape), self._dtype(name)) for name, value in feeds.items()}
        inputs["cache_len"] = staging.view("cache_len", (1,), torch.int64)
        owned = {name: value.to(device=self.device, dtype=self._dtype(name)).contiguous()
                 for name, value in constants.items()}
        bound_outputs = {name: staging.view("out:" + name, shape, dtype) for name, (shape, dtype) in outputs.items()}
        new_rows = None if self.in_graph else staging.view(
            "new_rows", (spec.num_layers, 2, 1, spec.num_kv_heads, steps, spec.head_dim), self.dtype)
        view = self.kv.view()
        binding = self.session.io_binding()

        def bind(method, name: str, tensor: torch.Tensor) -> None:
            method(name, self.device_type, self.device_id, _ONNX_TYPES[tensor.dtype], tuple(tensor.shape),
                   tensor.data_ptr())

        for name, tensor in {**inputs, **owned}.items():
            bind(binding.bind_input, name, tensor)
        for layer in range(spec.num_layers):
            bind(binding.bind_input, f"past_key_{layer}", view[layer, 0])
            bind(binding.bind_input, f"past_value_{layer}", view[layer, 1])
            if self.in_graph:  # the same memory in and out: ORT's shared-buffer mode writes the rows in place
                bind(binding.bind_output, f"present_key_{layer}", view[layer, 0])
                bind(binding.bind_output, f"present_value_{layer}", view[layer, 1])
            else:
                bind(binding.bind_output, f"new_key_{layer}", new_rows[layer, 0])
                bind(binding.bind_output, f"new_value_{layer}", new_rows[layer, 1])
        for name, tensor in bound_outputs.items():
            bind(binding.bind_output, name, tensor)
        return _Plan(inputs, owned, bound_outputs, new_rows, binding)

    def _dtype(self, name: str) -> torch.dtype:
        return _INPUT_DTYPES.get(name, self.dtype)  # features (the draft's) are in the graph's precision


@dataclass(frozen=True)
class _Part:
    """One sequence's rows in a batched run: the feeds its own step would give its graph, and where its KV lives."""

    stepper: _Stepper
    cache_len: int
    feeds: dict[str, torch.Tensor]  # input_ids, position_ids [1, T], tree_mask [1, T, M] (the draft's: features)
    wanted: range = range(0)  # the target's: the part's rows whose logits are computed


class _BatchGraph:
    """A batched fused graph (`export/fused.py`, `slots` sequences a run), shared by a backend and its forks and
    opened on first use: a process that never batches (offline `generate`) never loads its weights.

    One run takes up to `slots` parts; a slot without a part computes one dummy row (ids 0, position 0) over a
    two-row scratch buffer of its own, since GroupQueryAttention takes no empty sequence. The graph binds each
    part's own KV buffers, at full length, in and out (the rows written in place, as a one-sequence run does).
    """

    def __init__(self, opener: Callable[[], object], spec: GraphSpec, dtype: torch.dtype, device: torch.device):
        self.spec, self.slots, self.dtype, self.device = spec, spec.slots, dtype, device
        self._opener, self._session, self._lock = opener, None, threading.Lock()
        self.scratch = [KVBuffers(spec.num_layers, spec.num_kv_heads, spec.head_dim, 2, dtype, device)
                        for _ in range(spec.slots)]

    @property
    def session(self):
        with self._lock:
            if self._session is None:
                self._session = self._opener()
            return self._session

    def run(self, parts: list[_Part], outputs: dict[str, tuple[tuple[int, ...], torch.dtype]],
            logits_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One run of `parts` (at most `slots`); returns the named outputs over all the parts' rows, in order."""
        session, device = self.session, self.device
        dummy = {"input_ids": torch.zeros(1, 1, dtype=torch.int64), "position_ids": torch.zeros(1, 1, dtype=torch.int64),
                 "tree_mask": torch.ones(1, 1, 1, dtype=torch.bool)}
        if "features" in parts[0].feeds:
            dummy["features"] = torch.zeros(1, 1, parts[0].feeds["features"].shape[-1])
        slots = [(part.stepper.kv, part.cache_len, part.feeds) for part in parts]
        slots += [(scratch, 0, dummy) for scratch in self.scratch[len(parts):]]
        held = {}  # every bound tensor, alive until the run returns

        def tensor(name: str, value: torch.Tensor) -> torch.Tensor:
            dtype = self.dtype if value.is_floating_point() else value.dtype  # features: the graph's precision
            held[name] = value.to(device=device, dtype=dtype).contiguous()
            return held[name]

        binding = session.io_binding()

        def bind(method, name: str, value: torch.Tensor) -> None:
            method(name, device.type, device.index or 0, _ONNX_TYPES[value.dtype], tuple(value.shape),
                   value.data_ptr())

        for name in ("input_ids", "position_ids", "features"):
            if name in dummy:
                bind(binding.bind_input, name, tensor(name, torch.cat([feeds[name] for _, _, feeds in slots], dim=1)))
        bind(binding.bind_input, "slot_rows",
             tensor("slot_rows", torch.tensor([feeds["input_ids"].shape[1] for _, _, feeds in slots])))
        if logits_index is not None:
            bind(binding.bind_input, "logits_index", tensor("logits_index", logits_index))
        for i, (kv, cache_len, feeds) in enumerate(slots):
            bind(binding.bind_input, f"cache_len_s{i}", tensor(f"cache_len_s{i}", torch.tensor([cache_len])))
            bind(binding.bind_input, f"tree_mask_s{i}", tensor(f"tree_mask_s{i}", feeds["tree_mask"]))
            view = kv.view()  # full length: the graph reads only the rows in use and writes its own
            for layer in range(self.spec.num_layers):
                for j, kind in enumerate(("key", "value")):
                    bind(binding.bind_input, f"past_{kind}_{layer}_s{i}", view[layer, j])
                    bind(binding.bind_output, f"present_{kind}_{layer}_s{i}", view[layer, j])
        results = {name: torch.empty(shape, dtype=dtype, device=device) for name, (shape, dtype) in outputs.items()}
        for name, value in results.items():
            bind(binding.bind_output, name, value)
        session.run_with_iobinding(binding)
        return results


def _batch(parts: list, slots: int, runs_alone: Callable) -> list[list]:
    """Groups of at most `slots` parts, in order, with the parts `runs_alone` picks (a long prompt, which its
    backend cuts into chunks) as groups of one."""
    groups: list[list] = []
    for part in parts:
        if runs_alone(part):
            groups.append([part])
        elif groups and len(groups[-1]) < slots and not runs_alone(groups[-1][0]):
            groups[-1].append(part)
        else:
            groups.append([part])
    return groups


class OrtTarget(TargetBackend):
    """`TargetBackend` over the exported target step graph.

    An int8 target runs every one-row step as two rows (the row twice; the copy's logits are not computed and its
    KV row, past the committed ones, is overwritten later). ORT's int8 MatMulNBits kernel computes a row of a
    one-row product slightly differently (~1e-6) from the same row of a longer one, and int8 activation rounding
    can turn that into a different token at a near-tie: plain decoding (one-row steps) would then not be the
    model that verifies trees. From two rows on, a chain row's result does not depend on how many rows the step has
    (tests/runtime/backends/test_onnxruntime_fused.py). A tree row's does depend on where its siblings sit, and the
    same rounding amplifies that, so a quantised target verifies chains (`tree_rows_exact`): then plain and
    speculative decoding compute bit for bit the same quantised model.
    """

    def __init__(self, session, manifest: Manifest, device: torch.device, max_len: int, graph: str = "target",
                 batch: _BatchGraph | None = None):
        spec = manifest.graphs[graph]
        self.manifest, self.graph, self.batch = manifest, graph, batch
        self.dtype = parse_dtype(manifest.dtype)
        self.pad_single_rows = spec.quantization is not None
        self.tree_rows_exact = spec.quantization is None  # quantised rows: chains only (`TargetBackend`)
        # The padded copy's KV row may sit one past the last usable row.
        self.prefill_chunk = manifest.prefill_chunk
        self.stepper = _Stepper(session, spec, self.dtype, device, max_len + self.pad_single_rows,
                                manifest.prefill_chunk)
        self.device, self.max_len, self.max_tree_tokens = device, max_len, manifest.max_tree_tokens
        self.vocab_size = manifest.target["vocab_size"]
        self.hidden_size = manifest.target["hidden_size"]

    def _feeds(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tree_mask: torch.Tensor | None,
               last_only: bool) -> tuple[dict[str, torch.Tensor], range, bool]:
        """The graph's feeds for a step of at most one chunk (a causal step gets its causal mask), the rows whose
        logits it computes, and whether it is a padded one-row step (see the class docstring: [x] -> [x, x])."""
        rows = input_ids.shape[1]
        wanted = 1 if last_only else rows
        padded = rows == 1 and self.pad_single_rows
        if padded:
            input_ids, position_ids, tree_mask, rows = input_ids.expand(1, 2), position_ids.expand(1, 2), None, 2
        first = 0 if padded else rows - wanted
        mask = causal_tree_mask(rows) if tree_mask is None else tree_mask
        return {"input_ids": input_ids, "position_ids": position_ids, "tree_mask": mask}, range(first, first + wanted), padded

    @torch.no_grad()
    def _step(self, input_ids, position_ids, cache_len, tree_mask, last_only=False) -> TargetOutput:
        steps = input_ids.shape[1]

        def run(start: int, stop: int) -> dict:
            # Prefill wants the last row's logits only; an earlier chunk's row is computed and dropped.
            feeds, wanted, padded = self._feeds(input_ids[:, start:stop], position_ids[:, start:stop], tree_mask,
                                                last_only)
            rows = feeds["input_ids"].shape[1]
            causal = tree_mask is None or padded
            if causal:
                del feeds["tree_mask"]  # the plan's own constant

            def shape():
                constants = {"logits_index": torch.tensor(wanted)}
                if causal:
                    constants["tree_mask"] = causal_tree_mask(rows)
                return constants, {"logits": ((1, len(wanted), self.vocab_size), self.dtype),
                                   "hidden": ((1, rows, self.hidden_size), self.dtype)}

            out = self.stepper.run((rows, len(wanted), causal, padded), feeds, shape, cache_len + start, rows)
            return {"hidden": out["hidden"][:, :stop - start].clone(),
                    "logits": out["logits"].clone() if not last_only or stop == steps else None}

        out = run_chunked(steps, self.stepper.chunk, tree_mask is None, run)
        return TargetOutput(logits=out["logits"], hidden=out["hidden"])

    @torch.no_grad()
    def _step_batch(self, batch: Sequence[SequenceStep]) -> list[TargetOutput]:
        """With a batched graph (--ort-batch), up to its `slots` parts a run, each fed exactly what its own step
        would feed the one-sequence graph (a padded one-row step stays padded), so each row's arithmetic is its
        own step's, bit for bit (`_BatchGraph`); a prompt longer than a chunk runs alone. Without one, in turn."""
        if self.batch is None or len(batch) < 2:
            return super()._step_batch(batch)
        if any(not isinstance(p.backend, OrtTarget) or p.backend.batch is not self.batch for p in batch):
            raise ValueError("a batched step's sequences must run on this backend or its forks (the same graphs)")

        def alone(part: SequenceStep) -> bool:
            return part.tree_mask is None and part.input_ids.shape[1] > self.stepper.chunk

        outputs: dict[int, TargetOutput] = {}
        for group in _batch(list(batch), self.batch.slots, alone):
            if len(group) == 1:
                part = group[0]
                outputs[id(part)] = part.backend._step(part.input_ids, part.position_ids, part.cache_len,
                                                       part.tree_mask, part.last_only)
                continue
            parts, index, offset = [], [], 0
            for part in group:
                feeds, wanted, _ = self._feeds(part.input_ids, part.position_ids, part.tree_mask, part.last_only)
                parts.append(_Part(part.backend.stepper, part.cache_len, feeds, wanted))
                index += [offset + row for row in wanted]
                offset += feeds["input_ids"].shape[1]
            rows = offset + self.batch.slots - len(group)  # a dummy row for each slot without a part
            out = self.batch.run(parts, {"logits": ((1, len(index), self.vocab_size), self.dtype),
                                         "hidden": ((1, rows, self.hidden_size), self.dtype)}, torch.tensor(index))
            row, logit = 0, 0
            for part, piece in zip(group, parts):
                steps = piece.feeds["input_ids"].shape[1]
                outputs[id(part)] = TargetOutput(logits=out["logits"][:, logit:logit + len(piece.wanted)],
                                                 hidden=out["hidden"][:, row:row + part.input_ids.shape[1]])
                row, logit = row + steps, logit + len(piece.wanted)
        return [outputs[id(part)] for part in batch]

    @property
    def kv(self):
        return self.stepper.kv

    def compact(self, cache_len: int, keep: torch.Tensor) -> None:
        self.stepper.kv.compact(cache_len, keep)

    def fork(self) -> "OrtTarget":
        """The same session (ORT runs one session from several threads), new KV buffers and run plans."""
        return OrtTarget(self.stepper.session, self.manifest, self.device, self.max_len, self.graph, self.batch)


class OrtDraft(DraftBackend):
    """`DraftBackend` over the exported draft step graph (the target's lm_head and top-k inside the graph)."""

    def __init__(self, session, manifest: Manifest, device: torch.device, max_len: int, graph: str = "draft",
                 batch: _BatchGraph | None = None):
        spec = manifest.graphs[graph]
        self.manifest, self.graph, self.batch = manifest, graph, batch
        self.dtype = parse_dtype(manifest.dtype)
        self.prefill_chunk = manifest.prefill_chunk
        self.stepper = _Stepper(session, spec, self.dtype, device, max_len, manifest.prefill_chunk)
        self.device, self.max_len, self.max_top_k = device, max_len, manifest.max_top_k
        self.hidden_size = manifest.target["hidden_size"]

    @torch.no_grad()
    def _step(self, features, input_ids, position_ids, cache_len, tree_mask, top_k) -> DraftOutput:
        def run(start: int, stop: int) -> dict:
            rows = stop - start
            feeds = {"features": features[:, start:stop], "input_ids": input_ids[:, start:stop],
                     "position_ids": position_ids[:, start:stop]}
            if tree_mask is not None:
                feeds["tree_mask"] = tree_mask  # [1, T, M]: a tree level sees earlier levels' rows

            def shape():
                constants = {} if tree_mask is not None else {"tree_mask": causal_tree_mask(rows)}
                return constants, {"hidden": ((1, rows, self.hidden_size), self.dtype),
                                   "top_logprobs": ((1, rows, self.max_top_k), torch.float32),
                                   "top_tokens": ((1, rows, self.max_top_k), torch.int64)}

            key = (rows, None if tree_mask is None else tree_mask.shape[-1])
            out = self.stepper.run(key, feeds, shape, cache_len + start, rows)
            # TopK sorts descending, so the first top_k of the graph's K columns are the top_k.
            return {"hidden": out["hidden"].clone(), "logprobs": out["top_logprobs"][..., :top_k].clone(),
                    "tokens": out["top_tokens"][..., :top_k].clone()}

        out = run_chunked(input_ids.shape[1], self.stepper.chunk, tree_mask is None, run)
        return DraftOutput(hidden=out["hidden"], logprobs=out["logprobs"], tokens=out["tokens"])

    @torch.no_grad()
    def _step_batch(self, batch: Sequence[DraftSequenceStep]) -> list[DraftOutput]:
        """As `OrtTarget._step_batch`: up to the batched graph's `slots` parts a run (each its own top-k of the graph's
        K columns), a context pass longer than a chunk alone; without a batched graph, in turn."""
        if self.batch is None or len(batch) < 2:
            return super()._step_batch(batch)
        if any(not isinstance(p.backend, OrtDraft) or p.backend.batch is not self.batch for p in batch):
            raise ValueError("a batched step's sequences must run on this backend or its forks (the same graphs)")

        def alone(part: DraftSequenceStep) -> bool:
            return part.tree_mask is None and part.input_ids.shape[1] > self.stepper.chunk

        outputs: dict[int, DraftOutput] = {}
        for group in _batch(list(batch), self.batch.slots, alone):
            if len(group) == 1:
                part = group[0]
                outputs[id(part)] = part.backend._step(part.features, part.input_ids, part.position_ids,
                                                       part.cache_len, part.tree_mask, part.top_k)
                continue
            parts = [_Part(part.backend.stepper, part.cache_len, {
                "features": part.features, "input_ids": part.input_ids, "position_ids": part.position_ids,
                "tree_mask": causal_tree_mask(part.input_ids.shape[1]) if part.tree_mask is None else part.tree_mask})
                for part in group]
            rows = sum(part.input_ids.shape[1] for part in group) + self.batch.slots - len(group)
            out = self.batch.run(parts, {"hidden": ((1, rows, self.hidden_size), self.dtype),
                                         "top_logprobs": ((1, rows, self.max_top_k), torch.float32),
                                         "top_tokens": ((1, rows, self.max_top_k), torch.int64)})
            row = 0
            for part in group:
                end = row + part.input_ids.shape[1]
                outputs[id(part)] = DraftOutput(hidden=out["hidden"][:, row:end],
                                                logprobs=out["top_logprobs"][:, row:end, :part.top_k],
                                                tokens=out["top_tokens"][:, row:end, :part.top_k])
                row = end
        return [outputs[id(part)] for part in batch]

    @property
    def kv(self):
        return self.stepper.kv

    def fork(self) -> "OrtDraft":
        return OrtDraft(self.stepper.session, self.manifest, self.device, self.max_len, self.graph, self.batch)


def open_ort_backends(artifacts: Path, manifest: Manifest, with_draft: bool, max_len: int, draft_extra_rows: int,
                      config: OrtConfig = OrtConfig()) -> tuple[OrtTarget, OrtDraft | None]:
    """Sessions and KV buffers for an artifacts directory whose manifest was checked against the models."""
    device = torch.device(config.device)
    if device.type == "cpu" and config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)  # process-wide, deliberately: see OrtConfig.torch_threads

    def session(graph: str):
        spec, tensorrt = manifest.graphs[graph], None
        if config.provider == "tensorrt":
            shapes = [profile_shapes(spec, profile) for profile in profiles(manifest)]
            tensorrt = tensorrt_options(spec, shapes, artifacts / "cache")
        return open_session(artifacts / spec.file, device, config, tensorrt)

    def batch(graph: str) -> _BatchGraph | None:
        """The batched variant of a fused graph (--ort-batch), opened when a batched step first runs."""
        name = batch_graph(manifest, graph) if config.provider != "tensorrt" else None
        return None if name is None else _BatchGraph(lambda: session(name), manifest.graphs[name],
                                                     parse_dtype(manifest.dtype), device)

    target_graph = runtime_graph(manifest, "target", config.graphs)
    target = OrtTarget(session(target_graph), manifest, device, max_len, target_graph, batch(target_graph))
    if not with_draft:
        return target, None
    draft_graph = runtime_graph(manifest, "draft", config.graphs)
    draft_session = session(draft_graph)
    return target, OrtDraft(draft_session, manifest, device, max_len + draft_extra_rows, draft_graph,
                            batch(draft_graph))
