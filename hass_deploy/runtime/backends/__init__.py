"""Backend registry: a name -> a spec that says whether the backend runs an export and opens its step backends.

Each backend module imports its engine (onnxruntime, tensorrt) inside itself, so `import hass_deploy` works
without them; a backend whose engine is missing fails with the extra to install, not an ImportError.

Opening does not check anything against the export: the caller has opened it once (`Artifacts`) and checked the
models and the request against it, once, where it knows what the request is (`Pipeline.load`, the bench's
baseline, `open_backends`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from hass_deploy.artifacts import Artifacts
from hass_deploy.config import RuntimeConfig
from hass_deploy.errors import HassDeployError
from hass_deploy.models.draft import DraftHead
from hass_deploy.models.loading import TargetHead, TargetModel
from hass_deploy.runtime.backends.base import DraftBackend, TargetBackend



@dataclass(frozen=True)
class BackendOptions:
    """How a backend runs, from a `RuntimeConfig` (`of`), plus what tests and benchmarks also choose.

    Attributes:
        device: where the onnxruntime and tensorrt backends run ("cpu", "cuda[:N]"); torch runs where the models are.
        steps: how the torch and tensorrt backends run decode and tree steps (`backends/graphs.py`): auto (CUDA
            graphs on a GPU), eager, static (padded, uncaptured: what the CPU tests check), graphs.
        ort_provider: onnxruntime on a GPU: auto (its CUDA provider) or tensorrt (its TensorRT provider).
        ort_graphs: which exported graphs onnxruntime runs: auto (fused when exported), standard or fused.
    """

    device: str = "cpu"
    steps: str = "auto"
    ort_provider: str = "auto"
    ort_graphs: str = "auto"

    @classmethod
    def of(cls, runtime: RuntimeConfig) -> "BackendOptions":
        return cls(device=runtime.device, steps="auto" if runtime.cuda_graphs else "eager",
                   ort_provider=runtime.ort_provider)


Pair = tuple[TargetBackend, DraftBackend | None]
# (target, draft, options, the export or None, target KV rows, the draft's extra tree rows) -> the step backends
Opener = Callable[[TargetModel | TargetHead, DraftHead | None, BackendOptions, Artifacts | None, int, int], Pair]


@dataclass(frozen=True)
class BackendSpec:
    name: str
    needs_export: bool  # runs an export's graphs or plans (--artifacts), not the target's own layers
    open: Opener

    def artifacts(self, given: str | Path | Artifacts | None) -> Artifacts | None:
        """The export this backend runs, opened once (kept as given when open already), or None for a backend that
        runs the models; one line for a missing --artifacts or one given to such a backend."""
        if not self.needs_export:
            if given is not None:
                exported = " or ".join(name for name, spec in BACKENDS.items() if spec.needs_export)
                raise HassDeployError(f"--artifacts is for --backend {exported}; the {self.name} backend runs the "
                                      "models directly")
            return None
        if given is None:
            raise HassDeployError(f"--backend {self.name} needs --artifacts DIR (made by `hass-deploy export`)")
        return given if isinstance(given, Artifacts) else Artifacts.open(given)


def _open_torch(target, draft, options: BackendOptions, artifacts: Artifacts | None, max_len: int,
                draft_extra_rows: int) -> Pair:
    if not isinstance(target, TargetModel):
        raise HassDeployError("the torch backend runs the target's layers: load it with load_target, not its head")
    # backends.torch imports this package (graphs): imported once the registry exists.
    from hass_deploy.runtime.backends.torch import TorchDraft, TorchTarget

    target_backend = TorchTarget(target.module, max_len, options.steps)
    draft_backend = None if draft is None else TorchDraft(draft, target.module.lm_head, max_len + draft_extra_rows,
                                                          options.steps)
    return target_backend, draft_backend


def _open_onnxruntime(target, draft, options: BackendOptions, artifacts: Artifacts, max_len: int,
                      draft_extra_rows: int) -> Pair:
    # onnxruntime is an optional extra: its backend module is imported only when it opens.
    from hass_deploy.runtime.backends.onnxruntime import OrtConfig, open_ort_backends

    return open_ort_backends(artifacts.directory, artifacts.manifest, draft is not None, max_len, draft_extra_rows,
                             OrtConfig(device=options.device, graphs=options.ort_graphs, provider=options.ort_provider))


def _open_tensorrt(target, draft, options: BackendOptions, artifacts: Artifacts, max_len: int,
                   draft_extra_rows: int) -> Pair:
    # tensorrt is an optional extra: its backend module is imported only when it opens.
    from hass_deploy.runtime.backends.tensorrt import open_trt_backends

    return open_trt_backends(artifacts.directory, artifacts.manifest, draft is not None, max_len, draft_extra_rows,
                             options.device, options.steps)


BACKENDS: Mapping[str, BackendSpec] = MappingProxyType({spec.name: spec for spec in (
    BackendSpec("torch", needs_export=False, open=_open_torch),
    BackendSpec("onnxruntime", needs_export=True, open=_open_onnxruntime),
    BackendSpec("tensorrt", needs_export=True, open=_open_tensorrt),
)})


def backend_spec(name: str) -> BackendSpec:
    """The registered backend called `name` (one line for an unknown one)."""
    if name not in BACKENDS:
        raise HassDeployError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]


def open_backends(name: str, target: TargetModel | TargetHead, draft: DraftHead | None, max_len: int,
                  draft_extra_rows: int, artifacts: str | Path | Artifacts | None = None, device: str = "cpu",
                  ort_graphs: str = "auto", steps: str = "auto", ort_provider: str = "auto") -> Pair:
    """Open `name`'s step backends with KV buffers of `max_len` rows (the draft's `draft_extra_rows` more for its
    tree levels), after checking the export (`artifacts`, for the backends that need one) against the target, the
    draft and `max_len`: the loose-argument form tests and benchmarks call (`BackendOptions` says what the
    options do)."""
    spec = backend_spec(name)
    exported = spec.artifacts(artifacts)
    if exported is not None:
        exported.check_target(target)
        exported.check_draft(draft)
        exported.check_request(max_len)
    return spec.open(target, draft, BackendOptions(device, steps, ort_provider, ort_graphs), exported, max_len,
                     draft_extra_rows)
