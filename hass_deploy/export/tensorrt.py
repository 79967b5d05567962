"""TensorRT engines from the exported standard step graphs: `hass-deploy export --engine trt` (trt-notes §1).

Every call into TensorRT's builder is in `build_plan`, kept thin and written against the documented TensorRT 10
Python API; everything around it (the optimisation profiles, the rebuild key, the manifest record) is plain code
tested on machines without TensorRT. Not yet run on a GPU in this project's own testing: see docs/RESULTS.md.

Two optimisation profiles per graph, as TensorRT-LLM and Edge-LLM build them: 0 = decode (T = 1 row), 1 = tree
verification and prefill chunks (2 .. max(tree budget, prefill chunk) rows). The KV inputs' row axis S is dynamic
up to S_max, so a step reads the rows the runtime binds (its context-sized view), not all of S_max. Networks are
strongly typed: the graph's own dtypes (bf16/fp16 weights and activations, the norms' reductions in fp32) decide
the precision, not builder flags (weak typing is deprecated since 10.12, gone in 11).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from hass_deploy.errors import HassDeployError
from hass_deploy.cache import json_key
from hass_deploy.manifest import Manifest, Profile, profile_shapes, profiles

TIMING_CACHE = "timing.cache"
INSTALL = ("building TensorRT engines needs TensorRT 10 and an NVIDIA GPU: pip install 'hass-deploy[trt]' on such "
           "a machine and run the same command again")


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise HassDeployError(INSTALL) from None
    return tensorrt


def engine_key(onnx_path: Path, trt_version: str, gpu: str, capability: str, profile_list: list[Profile],
               dtype: str) -> str:
    """What a plan depends on: the graph file, TensorRT's version, the GPU, the profiles and the precision."""
    stat = onnx_path.stat()
    parts = [onnx_path.name, stat.st_size, stat.st_mtime_ns, trt_version, gpu, capability, dtype,
             [asdict(p) for p in profile_list]]
    return json_key(parts)


def build_engines(out: Path, manifest: Manifest, log=lambda _: None) -> Manifest:
    """Build (or keep, when nothing they depend on changed) a plan per standard graph in `out`, and record them in
    the manifest. Raises HassDeployError naming what to install when TensorRT or a GPU is missing."""
    trt = import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise HassDeployError(INSTALL)
    gpu = torch.cuda.get_device_name()
    capability = ".".join(map(str, torch.cuda.get_device_capability()))
    previous = manifest.tensorrt or {}
    plans = {}
    for name in ("target", "draft"):
        spec = manifest.graphs.get(name)
        if spec is None:
            continue
        chosen = profiles(manifest)
        key = engine_key(out / spec.file, trt.__version__, gpu, capability, chosen, manifest.dtype)
        plan = out / f"{name}.plan"
        if previous.get("plans", {}).get(name, {}).get("key") == key and plan.exists():
            log(f"TensorRT {name} engine unchanged, kept")
        else:
            log(f"building the TensorRT {name} engine ({manifest.dtype}, {len(chosen)} profiles)")
            build_plan(trt, out / spec.file, plan, out / TIMING_CACHE, [profile_shapes(spec, p) for p in chosen])
        plans[name] = {"file": plan.name, "key": key, "profiles": json.loads(json.dumps([asdict(p) for p in chosen]))}
    record = {"version": trt.__version__, "gpu": gpu, "compute_capability": capability,
              "precision": manifest.dtype, "strongly_typed": True, "timing_cache": TIMING_CACHE, "plans": plans}
    return Manifest(**{**manifest.__dict__, "tensorrt": record})


def build_plan(trt, onnx_path: Path, plan_path: Path, cache_path: Path,
               shapes: list[dict[str, tuple[tuple[int, ...], ...]]]) -> None:
    """Parse the ONNX graph into a strongly typed network, add one optimisation profile per entry of `shapes`,
    reuse and update the timing cache, and write the serialised plan atomically (trt-notes §1)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # external weights are read from beside the file
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        raise HassDeployError(f"{onnx_path}: TensorRT cannot parse it: " + "; ".join(
            f"{e.node_name()} [{e.node_operator()}] {e.desc()}" for e in errors[:3]))
    config = builder.create_builder_config()
    for shape_set in shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shape_set.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise HassDeployError(f"{onnx_path}: TensorRT could not build an engine (see its log above); try "
                              "`--attention decomposed`")
    _write_atomically(plan_path, bytes(plan))
    _write_atomically(cache_path, bytes(config.get_timing_cache().serialize()))


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
