"""Static-shape steps and their CUDA graphs (trt-notes §4), for backends whose steps a GPU would run kernel by kernel.

On a GPU a small model's step is bound by kernel launches, not arithmetic: a 32-layer decode step is ~500 launches.
A CUDA graph replays them as one, but it freezes shapes and addresses, so a captured step must read static buffers:
T is padded to a row bucket (a padding row sees only itself, so the real rows compute what they would alone), the
step's place in the KV buffers is a device tensor (`cache_len`), and attention reads a whole block of KV rows, the
ones past the step masked out, so a step costs the context in use rounded up to `KV_BLOCK` rows, not S_max.

`StepGraphs` keys each static shape, copies a step's inputs into that key's buffers and runs the step: eagerly the
first time (the warm-up capture needs), captured the second, replayed after. With capture off it runs the same
static computation eagerly every time, which is how the CPU tests check everything here but the capture itself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable

import torch

from hass_deploy.errors import ConfigError, HassDeployError

STEP_MODES = ("auto", "eager", "static", "graphs")  # auto: graphs on a CUDA device, eager elsewhere
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # padded step sizes: decode, tree verification, the draft's levels
KV_BLOCK = 256  # KV rows a captured step reads are a multiple of this: at most 255 masked rows of extra attention


def step_graphs(mode: str, device: torch.device) -> "StepGraphs | None":
    """A backend's static steps for a step mode (`STEP_MODES`): None for eager steps; "static" runs them uncaptured
    (what the CPU tests check); "graphs" captures them, which needs a CUDA device."""
    if mode not in STEP_MODES:
        raise ConfigError(f"unknown step mode {mode!r}; choose one of {', '.join(STEP_MODES)}")
    if mode == "auto":
        mode = "graphs" if device.type == "cuda" else "eager"
    if mode == "graphs" and device.type != "cuda":
        raise ConfigError("CUDA graphs need the model on a CUDA device (--device cuda)")
    return None if mode == "eager" else StepGraphs(device, capture=mode == "graphs")


def row_bucket(rows: int) -> int | None:
    """The smallest bucket that holds `rows`, or None above the largest (such a step runs uncaptured)."""
    return next((bucket for bucket in ROW_BUCKETS if bucket >= rows), None)


def kv_rows(end: int, max_len: int) -> int:
    """KV rows a static step reads when its last row lands at `end` (<= max_len): whole blocks, capped at S_max."""
    return min(max_len, -(-end // KV_BLOCK) * KV_BLOCK)


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """[1, T, ...] -> [1, rows, ...] with zeros after the T real rows (padding ids, positions 0, zero features:
    position 0 never raises a dynamic RoPE's longest position)."""
    extra = rows - tensor.shape[1]
    if extra == 0:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((1, extra, *tensor.shape[2:]))], dim=1)


def pad_tree_mask(tree_mask: torch.Tensor | None, steps: int, rows: int, device: torch.device) -> torch.Tensor:
    """A step's mask [1, T, M] (None: causal, M = T) as the mask of the step padded to `rows` rows:
    [1, rows, M + rows - T].

    The columns of a mask are the last M KV rows ending at the step's last row (`models.target.step_attention_mask`).
    Padding adds rows - T rows after the step, so the padded mask has as many more columns and starts at the same
    KV row: the real rows keep their columns and see no padding row; padding row i sees only itself.
    """
    if tree_mask is None:
        tree_mask = torch.ones(steps, steps, dtype=torch.bool, device=device).tril()[None]
    extra = rows - steps
    width = tree_mask.shape[2] + extra
    padded = torch.zeros(1, rows, width, dtype=torch.bool, device=device)
    padded[:, :steps, :tree_mask.shape[2]] = tree_mask
    padding = torch.arange(extra, device=device)
    padded[0, steps + padding, width - extra + padding] = True
    return padded


class StepGraphs:
    """One backend's static steps: input buffers per shape key, and with `capture` their CUDA graphs.

    A captured step's outputs are the graph's own tensors: the next replay of that graph overwrites them, and since
    all graphs of a backend share one memory pool (they replay one at a time, on one stream), so may the next step's.
    Callers copy out what they keep before the next step.
    """

    def __init__(self, device: torch.device, capture: bool):
        self.device, self.capture = device, capture
        self.inputs: dict[Hashable, dict[str, torch.Tensor]] = {}
        self.graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.uncaptured: set[Hashable] = set()  # keys whose capture failed: they stay eager
        self.warm: set[Hashable] = set()
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def run(self, key: Hashable, feeds: dict[str, torch.Tensor],
            compute: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Copy `feeds` (tensors of one static shape per key) into the key's buffers and run `compute` on them."""
        static = self.inputs.get(key)
        if static is None:
            static = self.inputs[key] = {name: torch.empty_like(value) for name, value in feeds.items()}
        for name, value in feeds.items():
            static[name].copy_(value)
        if not self.capture or key in self.uncaptured:
            return compute(static)
        if key not in self.graphs:
            if key not in self.warm:  # the real step, run once uncaptured: it initialises what capture cannot
                self.warm.add(key)
                return self._warm_up(static, compute)
            self._capture(key, static, compute)
            if key in self.uncaptured:
                return compute(static)
        graph, outputs = self.graphs[key]
        graph.replay()  # the captured kernels, reading the buffers just filled, writing `outputs`
        return outputs

    def _warm_up(self, static: dict[str, torch.Tensor], compute: Callable) -> dict[str, torch.Tensor]:
        # On a side stream, as torch.cuda.graphs asks: lazy initialisation (cuBLAS workspaces) happens outside capture.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            outputs = compute(static)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return outputs

    def _capture(self, key: Hashable, static: dict[str, torch.Tensor], compute: Callable) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = compute(static)  # recorded, not run: the replay that follows runs it
        except (RuntimeError, HassDeployError) as error:  # an op that synchronises, an engine that cannot be captured
            # (TensorRT's enqueue returns False): the step stays correct, only uncaptured.
            warnings.warn(f"CUDA graph capture failed for step shape {key}, running it eagerly: {error}", stacklevel=3)
            self.uncaptured.add(key)
            return
        self.graphs[key] = (graph, outputs)
