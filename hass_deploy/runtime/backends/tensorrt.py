"""The TensorRT backend (`--backend tensorrt`): the plans `export --engine trt` built, on torch CUDA tensors.

The step contract is the one every backend keeps (`base.py`). KV rows live in `KVBuffers` on the GPU, bound as the
growing context-sized view the standard graphs read (so a step's attention costs the rows in use, not S_max; the
S axis of both profiles is dynamic); the engine returns a step's new rows, which are written into the buffers on
the device, as for ONNX Runtime's standard graphs: never an input and an output at one address, which TensorRT
does not define for generic networks (trt-notes §0). Outputs go to one allocation of flat buffers sized for the
largest step, each at a 256-byte boundary (`setTensorAddress`'s rule), and every step's inputs are copied into
aligned staging buffers the same way. Steps of one row run in profile 0 (decode), longer ones in profile 1 (tree
verification, prefill chunks), each profile with an execution context of its own sharing one scratch allocation,
on a non-default stream ordered after and before torch's.

Steps are padded to row buckets and captured as CUDA graphs per (profile, input shapes, bound KV rows)
(`graphs.py`, trt-notes §4): between two growths of the bound view a step's shapes and addresses are fixed, and
its position (`cache_len`) is data. A capture that fails leaves that shape eager.

Every TensorRT call is in `_Engine` (trt-notes §2). Everything around it (profiles, padding, buffer layout, staging,
the KV writes, the manifest check) is tested on the CPU, with an engine that runs the same ONNX graphs in ONNX
Runtime (tests/ort_artifacts.py) in the backend contract suite. The TensorRT calls themselves have not run in this
project's own testing yet (docs/RESULTS.md, "The GPU half: what has run where").
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from hass_deploy.errors import ConfigError, HassDeployError, ModelLoadError
from hass_deploy.export.tensorrt import import_tensorrt
from hass_deploy.manifest import GraphSpec, Manifest
from hass_deploy.models.loading import parse_dtype
from hass_deploy.runtime.backends import graphs
from hass_deploy.runtime.backends.base import DraftBackend, DraftOutput, TargetBackend, TargetOutput, run_chunked
from hass_deploy.runtime.kv import MIN_BOUND_ROWS, KVBuffers

ALIGN_BYTES = 256
_PADDED = ("input_ids", "position_ids", "features")  # the per-row inputs a padded step extends with zeros
_FIXED = {"input_ids": torch.int64, "position_ids": torch.int64, "cache_len": torch.int64, "tree_mask": torch.bool,
          "logits_index": torch.int64, "top_tokens": torch.int64, "top_logprobs": torch.float32}


def _device_int(value: int, device: torch.device) -> torch.Tensor:
    """[1] int64 on the device, written by a fill kernel: `torch.tensor([v], device=...)` would copy it from pageable
    host memory, which synchronises the stream."""
    return torch.full((1,), value, dtype=torch.int64, device=device)


def profile_for(rows: int) -> int:
    """Profile 0 is decode (one row), 1 tree verification and prefill chunks (`export/tensorrt.py`)."""
    return 0 if rows == 1 else 1


class AlignedBuffers:
    """One device allocation of named flat buffers, each starting at a 256-byte boundary and sized for the largest
    step; `view(name, shape)` is a contiguous tensor of that shape at the buffer's start."""

    def __init__(self, sizes: dict[str, tuple[int, torch.dtype]], device: torch.device):
        self.layout: dict[str, tuple[int, int, torch.dtype]] = {}
        end = 0
        for name, (numel, dtype) in sizes.items():
            start = -(-end // ALIGN_BYTES) * ALIGN_BYTES
            self.layout[name] = (start, numel, dtype)
            end = start + numel * torch.empty((), dtype=dtype).element_size()
        self.storage = torch.empty(max(end, 1), dtype=torch.uint8, device=device)

    def view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        start, numel, dtype = self.layout[name]
        if math.prod(shape) > numel:
            raise HassDeployError(f"{name} {shape} is larger than its buffer ({numel} elements)")
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return self.storage[start:start + nbytes].view(dtype).view(shape)


def buffer_sizes(tensors, rows: int, mask_columns: int, dtype: torch.dtype) -> dict[str, tuple[int, torch.dtype]]:
    """Elements and dtype of each tensor of a graph at the largest step: T and R (rows) at `rows`, M (the draft
    mask's columns) at `mask_columns`; past_* are not here (they are the KV buffers themselves)."""
    sizes = {}
    for tensor in tensors:
        if tensor.name.startswith("past_"):
            continue
        dims = [rows if d in ("T", "R") else mask_columns if d == "M" else d for d in tensor.shape]
        if any(isinstance(d, str) for d in dims):
            raise HassDeployError(f"{tensor.name} has an axis {tensor.shape} this backend cannot size")
        sizes[tensor.name] = (math.prod(dims), _FIXED.get(tensor.name, dtype))
    return sizes


class _Engine:
    """A deserialised plan, one execution context per optimisation profile sharing one scratch allocation, and
    the stream they run on: the only place this backend calls TensorRT."""

    def __init__(self, plan: Path, device: torch.device, engine=None):
        trt = self.trt = import_tensorrt()
        self.device = device
        if engine is None:
            logger = trt.Logger(trt.Logger.WARNING)
            engine = trt.Runtime(logger).deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise ModelLoadError(f"{plan}: TensorRT cannot load this plan (built by another TensorRT or GPU?); "
                                     "export again with --engine trt on this machine")
        self.plan, self.engine = plan, engine
        self.stream = torch.cuda.Stream(device)
        self.scratch = torch.empty(engine.device_memory_size_v2, dtype=torch.uint8, device=device)
        self.contexts = []
        for profile in range(engine.num_optimization_profiles):
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
            context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.contexts.append(context)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dynamic = {n for n in names if -1 in tuple(engine.get_tensor_shape(n))}

    def fork(self) -> "_Engine":
        """Contexts of their own over the same engine (a serving slot)."""
        return _Engine(self.plan, self.device, self.engine)

    def run(self, profile: int, inputs: dict[str, torch.Tensor], outputs: AlignedBuffers) -> dict[str, torch.Tensor]:
        context = self.contexts[profile]
        for name, tensor in inputs.items():
            if name in self.dynamic:
                context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        views = {}
        for name in self.outputs:  # every output's shape follows from the input shapes just set
            views[name] = outputs.view(name, tuple(context.get_tensor_shape(name)))
            context.set_tensor_address(name, views[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the inputs were written on torch's stream
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise HassDeployError(f"{self.plan}: TensorRT could not run a step (profile {profile})")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)  # torch reads the outputs after it
        return views


class _Steps:
    """What the target and draft backends share: the engine, KV buffers, aligned inputs and outputs, graphs."""

    def __init__(self, engine: _Engine, spec: GraphSpec, manifest: Manifest, max_len: int, mode: str):
        self.engine, self.spec, self.mode = engine, spec, mode
        self.dtype, device = parse_dtype(manifest.dtype), engine.device
        self.chunk = manifest.prefill_chunk
        self.largest = max(manifest.max_tree_tokens, manifest.prefill_chunk, 2)  # profile 1's most rows
        # Rows allocated in whole 64-row blocks, so that every layer's K and V slot starts at a 256-byte boundary
        # (`setTensorAddress`' rule) whatever --max-seq-len is; the contract's capacity stays max_len.
        allocated = -(-max_len // MIN_BOUND_ROWS) * MIN_BOUND_ROWS
        self.kv = KVBuffers(spec.num_layers, spec.num_kv_heads, spec.head_dim, allocated, self.dtype, device,
                            full=False)
        block = spec.num_kv_heads * allocated * spec.head_dim * torch.empty((), dtype=self.dtype).element_size()
        if block % ALIGN_BYTES:
            raise HassDeployError(f"KV slots of {allocated} rows do not align to {ALIGN_BYTES} bytes (head_dim "
                                  f"{spec.head_dim}, {spec.num_kv_heads} KV heads)")
        # A draft tree level's mask covers the rows of every level so far: at most the context and the step.
        self.inputs = AlignedBuffers(buffer_sizes(spec.inputs, self.largest, self.largest + allocated, self.dtype),
                                     device)
        self.outputs = AlignedBuffers(buffer_sizes(spec.outputs, self.largest, self.largest + allocated, self.dtype),
                                      device)
        self.graphs = graphs.step_graphs(mode, device)  # static: padded, uncaptured (the CPU tests' stand-in engine)

    def padded_rows(self, rows: int) -> int:
        """The rows a step of `rows` runs as: its bucket, within profile 1's range (else unpadded)."""
        bucket = graphs.row_bucket(rows) if self.graphs is not None else None
        return rows if bucket is None or bucket > self.largest else bucket

    def run(self, feeds: dict[str, torch.Tensor], cache_len: int, rows: int, padded: int) -> dict[str, torch.Tensor]:
        """Run a step of `rows` rows as `padded` rows (feeds' per-row inputs have `rows`; tree_mask [1, rows, M] or
        None for causal) and write its real rows' K/V at cache_len..; returns the engine's outputs (padded rows
        included), valid until the next step."""
        if padded != rows or feeds["tree_mask"] is None:  # the padded mask (or a causal one)
            feeds = dict(feeds, tree_mask=graphs.pad_tree_mask(feeds["tree_mask"], rows, padded, self.engine.device))
        if padded != rows:
            feeds.update({name: graphs.pad_rows(feeds[name], padded) for name in _PADDED if name in feeds})
        self.kv.reserve(cache_len + rows)
        inputs = {}
        for name, value in feeds.items():  # aligned, contiguous copies of this step's small inputs
            inputs[name] = self.inputs.view(name, tuple(value.shape))
            inputs[name].copy_(value)
        view = self.kv.view()  # [L, 2, 1, H_kv, S_b, D]
        profile = profile_for(padded)
        # Shapes and addresses a graph freezes: the inputs' shapes (their addresses are their buffers') and the bound
        # KV view, whose address is fixed and whose rows change only when it grows.
        key = (profile, self.kv.rows, tuple((name, tuple(value.shape)) for name, value in inputs.items()))
        for layer in range(self.spec.num_layers):
            inputs[f"past_key_{layer}"], inputs[f"past_value_{layer}"] = view[layer, 0], view[layer, 1]

        def compute(_: dict) -> dict[str, torch.Tensor]:
            return self.engine.run(profile, inputs, self.outputs)

        out = compute({}) if self.graphs is None else self.graphs.run(key, {}, compute)
        for layer in range(self.spec.num_layers):  # the step's real rows into the buffers, on the device
            view[layer, 0, :, :, cache_len:cache_len + rows] = out[f"new_key_{layer}"][:, :, :rows]
            view[layer, 1, :, :, cache_len:cache_len + rows] = out[f"new_value_{layer}"][:, :, :rows]
        return out


class TrtTarget(TargetBackend):
    def __init__(self, engine: _Engine, manifest: Manifest, max_len: int, steps: str = "auto"):
        self.manifest, self.steps = manifest, _Steps(engine, manifest.graphs["target"], manifest, max_len, steps)
        self.prefill_chunk = manifest.prefill_chunk
        self.device, self.max_len, self.max_tree_tokens = engine.device, max_len, manifest.max_tree_tokens
        self.vocab_size = manifest.target["vocab_size"]

    @property
    def kv(self) -> KVBuffers:
        return self.steps.kv

    @torch.no_grad()
    def _step(self, input_ids, position_ids, cache_len, tree_mask, last_only=False) -> TargetOutput:
        steps = input_ids.shape[1]

        def run(start: int, stop: int) -> dict:
            rows = stop - start
            padded = self.steps.padded_rows(rows)
            # Logits of the last row (a prefill), else of every row the step runs (padding rows' are dropped).
            index = torch.arange(rows - 1 if last_only else 0, rows if last_only else padded, device=self.device)
            feeds = {"input_ids": input_ids[:, start:stop], "position_ids": position_ids[:, start:stop],
                     "cache_len": _device_int(cache_len + start, self.device), "tree_mask": tree_mask,
                     "logits_index": index}
            out = self.steps.run(feeds, cache_len + start, rows, padded)
            return {"hidden": out["hidden"][:, :rows].clone(),
                    "logits": out["logits"][:, :1 if last_only else rows].clone()
                    if not last_only or stop == steps else None}

        out = run_chunked(steps, self.steps.chunk, tree_mask is None, run)
        return TargetOutput(logits=out["logits"], hidden=out["hidden"])

    def compact(self, cache_len: int, keep: torch.Tensor) -> None:
        self.steps.kv.compact(cache_len, keep)

    def fork(self) -> "TrtTarget":
        return TrtTarget(self.steps.engine.fork(), self.manifest, self.max_len, self.steps.mode)


class TrtDraft(DraftBackend):
    def __init__(self, engine: _Engine, manifest: Manifest, max_len: int, steps: str = "auto"):
        self.manifest, self.steps = manifest, _Steps(engine, manifest.graphs["draft"], manifest, max_len, steps)
        self.prefill_chunk = manifest.prefill_chunk
        self.device, self.max_len, self.max_top_k = engine.device, max_len, manifest.max_top_k

    @property
    def kv(self) -> KVBuffers:
        return self.steps.kv

    @torch.no_grad()
    def _step(self, features, input_ids, position_ids, cache_len, tree_mask, top_k) -> DraftOutput:
        def run(start: int, stop: int) -> dict:
            rows = stop - start
            feeds = {"features": features[:, start:stop], "input_ids": input_ids[:, start:stop],
                     "position_ids": position_ids[:, start:stop],
                     "cache_len": _device_int(cache_len + start, self.device), "tree_mask": tree_mask}
            out = self.steps.run(feeds, cache_len + start, rows, self.steps.padded_rows(rows))
            return {"hidden": out["hidden"][:, :rows].clone(),
                    "logprobs": out["top_logprobs"][:, :rows, :top_k].clone(),
                    "tokens": out["top_tokens"][:, :rows, :top_k].clone()}

        out = run_chunked(input_ids.shape[1], self.steps.chunk, tree_mask is None, run)
        return DraftOutput(hidden=out["hidden"], logprobs=out["logprobs"], tokens=out["tokens"])

    def fork(self) -> "TrtDraft":
        return TrtDraft(self.steps.engine.fork(), self.manifest, self.max_len, self.steps.mode)


def check_plans(manifest: Manifest, with_draft: bool) -> dict:
    """The manifest's TensorRT record, refusing an export without plans (for the graphs asked for)."""
    record = manifest.tensorrt
    wanted = ("target", "draft") if with_draft else ("target",)
    if record is None or any(name not in record.get("plans", {}) for name in wanted):
        raise ConfigError("the artifacts hold no TensorRT plans: export them with `hass-deploy export --engine trt` "
                          "on the GPU machine that will run them")
    return record


def open_trt_backends(artifacts: Path, manifest: Manifest, with_draft: bool, max_len: int, draft_extra_rows: int,
                      device: str = "cuda", steps: str = "auto") -> tuple[TrtTarget, TrtDraft | None]:
    """Engines for an artifacts directory whose manifest was checked against the models."""
    record = check_plans(manifest, with_draft)
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise HassDeployError("--backend tensorrt runs on an NVIDIA GPU: pass --device cuda on a machine with one")
    cuda = torch.device(device)
    target = TrtTarget(_Engine(artifacts / record["plans"]["target"]["file"], cuda), manifest, max_len, steps)
    if not with_draft:
        return target, None
    draft = TrtDraft(_Engine(artifacts / record["plans"]["draft"]["file"], cuda), manifest, max_len + draft_extra_rows,
                     steps)
    return target, draft
