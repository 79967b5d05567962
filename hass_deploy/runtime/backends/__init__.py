"""Backend registry: a name -> a function that builds the (target, draft) pair of step backends.

Each backend module imports its engine (onnxruntime, tensorrt) inside itself, so `import hass_deploy` works
without them; a backend whose engine is missing fails with the extra to install, not an ImportError.
"""

from __future__ import annotations

from hass_deploy.errors import HassDeployError
from hass_deploy.models.draft import DraftHead
from hass_deploy.models.loading import TargetModel
from hass_deploy.runtime.backends.base import DraftBackend, TargetBackend

BACKENDS = ("torch",)


def open_backends(name: str, target: TargetModel, draft: DraftHead | None, max_len: int,
                  draft_extra_rows: int) -> tuple[TargetBackend, DraftBackend | None]:
    """Build the step backends, allocating KV buffers of `max_len` rows (plus the draft's tree rows)."""
    if name == "torch":
        from hass_deploy.runtime.backends.torch import TorchDraft, TorchTarget

        target_backend = TorchTarget(target.module, max_len)
        draft_backend = None if draft is None else TorchDraft(draft, target.module.lm_head, max_len + draft_extra_rows)
        return target_backend, draft_backend
    raise HassDeployError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
