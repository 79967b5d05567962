"""Backend registry: a name -> a function that builds the (target, draft) pair of step backends.

Each backend module imports its engine (onnxruntime, tensorrt) inside itself, so `import hass_deploy` works
without them; a backend whose engine is missing fails with the extra to install, not an ImportError.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hass_deploy.config import RuntimeConfig
from hass_deploy.errors import HassDeployError
from hass_deploy.models.draft import DraftHead
from hass_deploy.models.loading import TargetHead, TargetModel
from hass_deploy.runtime.backends.base import DraftBackend, TargetBackend

if TYPE_CHECKING:
    from hass_deploy.manifest import Manifest

BACKENDS = ("torch", "onnxruntime", "tensorrt")
AUTO = "auto"  # the CLI's default: ONNX Runtime when there are exported artifacts to run, torch otherwise


def choose_backend(name: str, artifacts: str | Path | None) -> str:
    """Resolve `auto` to a backend name; any other name is returned as given (checked when opened)."""
    if name != AUTO:
        return name
    return "onnxruntime" if artifacts is not None else "torch"


def backend_options(runtime: RuntimeConfig) -> dict[str, str]:
    """`open_backends`' step and provider options from a runtime configuration."""
    return {"steps": "auto" if runtime.cuda_graphs else "eager", "ort_provider": runtime.ort_provider}


def open_backends(name: str, target: TargetModel | TargetHead, draft: DraftHead | None, max_len: int,
                  draft_extra_rows: int, artifacts: str | Path | None = None,
                  device: str = "cpu", ort_graphs: str = "auto", manifest: "Manifest | None" = None,
                  steps: str = "auto", ort_provider: str = "auto") -> tuple[TargetBackend, DraftBackend | None]:
    """Build the step backends, allocating KV buffers of `max_len` rows (plus the draft's tree rows).

    Args:
        name: one of BACKENDS.
        target, draft: the loaded models (torch runs them; onnxruntime checks the artifacts were made from them,
            for which the target's head is enough: `load_target_head`).
        max_len: target KV rows; the draft gets `draft_extra_rows` more for its tree levels.
        artifacts: the `hass-deploy export` directory (onnxruntime only).
        device: where the onnxruntime backend runs ("cpu", "cuda[:N]"); torch runs where the models are.
        ort_graphs: which exported graphs onnxruntime runs: auto (fused when exported), standard or fused.
        manifest: the artifacts' manifest when the caller has read it already (it is read once).
        steps: how the torch and tensorrt backends run decode and tree steps (`backends/graphs.py`): auto (CUDA
            graphs on a GPU), eager, static (padded, uncaptured: what the CPU tests check), graphs.
        ort_provider: onnxruntime on a GPU: auto (its CUDA provider) or tensorrt (its TensorRT provider).
    """
    if name == "torch":
        if artifacts is not None:
            raise HassDeployError("--artifacts is for --backend onnxruntime; the torch backend runs the models directly")
        if not isinstance(target, TargetModel):
            raise HassDeployError("the torch backend runs the target's layers: load it with load_target, not its head")
        from hass_deploy.runtime.backends.torch import TorchDraft, TorchTarget

        target_backend = TorchTarget(target.module, max_len, steps)
        draft_backend = None if draft is None else TorchDraft(draft, target.module.lm_head, max_len + draft_extra_rows,
                                                              steps)
        return target_backend, draft_backend
    if name in ("onnxruntime", "tensorrt"):
        from hass_deploy.manifest import check_capacity, check_draft, check_target, draft_identity, read_manifest
        from hass_deploy.models.checkpoint import target_identity

        if artifacts is None:
            raise HassDeployError(f"the {name} backend needs --artifacts DIR (made by `hass-deploy export`)")
        manifest = manifest or read_manifest(artifacts)
        check_target(manifest, target_identity(target), str(target.path))
        check_draft(manifest, None if draft is None else draft_identity(draft), "the given draft")
        check_capacity(manifest, max_len, None, None)
        if name == "tensorrt":
            from hass_deploy.runtime.backends.tensorrt import open_trt_backends

            return open_trt_backends(Path(artifacts), manifest, draft is not None, max_len, draft_extra_rows, device,
                                     steps)
        from hass_deploy.runtime.backends.onnxruntime import OrtConfig, open_ort_backends

        return open_ort_backends(Path(artifacts), manifest, draft is not None, max_len, draft_extra_rows,
                                 OrtConfig(device=device, graphs=ort_graphs, provider=ort_provider))
    raise HassDeployError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
