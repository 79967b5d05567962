"""An opened export: a `hass-deploy export` directory whose manifest was read and validated once.

Every route that runs, benchmarks, serves or validates an export opens it here and asks it the same questions:
which graphs it holds, which capacity it was made for, and whether a target, a draft and a request fit it. Each
check lives in one method, so each user mistake has one message (DESIGN D7: nothing is inferred from a path).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hass_deploy.config import GenerationConfig, RuntimeConfig
from hass_deploy.errors import CacheCapacityError, ConfigError, DraftMismatchError, HassDeployError
from hass_deploy.manifest import Manifest, Profile, draft_identity, profiles, read_manifest, runtime_graph

if TYPE_CHECKING:
    from hass_deploy.models.draft import DraftHead
    from hass_deploy.models.loading import TargetHead, TargetModel

# The identity fields that must agree between a manifest and the target it is used with ("path" may differ).
IDENTITY_KEYS = ("architecture", "hidden_size", "vocab_size", "num_layers", "fingerprint")


@dataclass(frozen=True)
class Artifacts:
    directory: Path
    manifest: Manifest

    @classmethod
    def open(cls, directory: str | Path) -> "Artifacts":
        """Read and validate the manifest: one line for a missing directory, manifest or graph file."""
        return cls(Path(directory), read_manifest(directory))

    # -- what the export holds ----------------------------------------------------------------------------------

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def max_seq_len(self) -> int:
        return self.manifest.max_seq_len

    @property
    def max_tree_tokens(self) -> int:
        return self.manifest.max_tree_tokens

    @property
    def max_top_k(self) -> int:
        return self.manifest.max_top_k

    @property
    def has_draft(self) -> bool:
        return self.manifest.draft is not None

    @property
    def has_fused(self) -> bool:
        """Whether the fused ONNX Runtime graphs were exported (`export/fused.py`; the draft's too when there is one)."""
        return "target_ort" in self.manifest.graphs

    def graph(self, role: str, kind: str = "auto") -> str:
        """The graph of `role` ("target", "draft") ONNX Runtime runs for `kind`: auto (fused when exported),
        standard or fused (refused when not exported)."""
        return runtime_graph(self.manifest, role, kind)

    @property
    def profiles(self) -> list[Profile]:
        """The optimisation profiles the export's engines are built for (decode, tree and prefill)."""
        return profiles(self.manifest)

    # -- what may run on it ---------------------------------------------------------------------------------------

    def check_dtype(self, dtype: str) -> None:
        """Refuse a precision other than the export's; the default precision means "as exported"."""
        if dtype not in (RuntimeConfig().dtype, self.dtype):
            raise HassDeployError(f"the artifacts are {self.dtype}: their precision is fixed at export "
                                   f"(drop --dtype {dtype}, or export again with --dtype {dtype})")

    def check_target(self, target: "TargetModel | TargetHead") -> None:
        """Refuse a target that is not the one the graphs were exported from."""
        # checkpoint imports torch; opening an export and checking requests does not need it.
        from hass_deploy.models.checkpoint import target_identity

        identity = target_identity(target)
        for key in IDENTITY_KEYS:
            if key in self.manifest.target and self.manifest.target.get(key) != identity.get(key):
                raise DraftMismatchError(
                    f"the artifacts were exported from another target than {target.path} ({key}: "
                    f"{self.manifest.target.get(key)!r} in the manifest, {identity.get(key)!r} here)")

    def check_draft(self, draft: "DraftHead | None", source: str = "the given draft") -> None:
        """Refuse a draft the graphs were not exported from, and any draft on a target-only export (None: no
        draft, nothing to check). `source` names the draft in the message."""
        if draft is None:
            return
        if not self.has_draft:
            raise ConfigError("the artifacts hold no draft graph (exported with --no-draft): use --no-draft, "
                              "or export again with --draft")
        if self.manifest.draft.get("fingerprint") != draft_identity(draft).get("fingerprint"):
            raise DraftMismatchError(f"the artifacts' draft graph was exported from another draft than {source}")

    def check_request(self, max_seq_len: int, generation: GenerationConfig | None = None,
                      with_draft: bool = False) -> None:
        """Refuse a request the export's envelope does not cover: `max_seq_len` KV rows against S_max and, given
        `generation`, its draft tree (with a draft) and prompt lookup's and hybrid trees against the tree budget
        and the draft graph's top-k, before any token is generated."""
        if max_seq_len > self.max_seq_len:
            raise CacheCapacityError(f"--max-seq-len {max_seq_len} is more than the artifacts' S_max "
                                     f"({self.max_seq_len}); export again with a larger --max-seq-len")
        if generation is None:
            return
        if with_draft and generation.tree.tokens > self.max_tree_tokens:
            raise ConfigError(f"--tree-tokens {generation.tree.tokens} is more than the artifacts' tree budget "
                              f"({self.max_tree_tokens}); export again with a larger --max-tree-tokens")
        if with_draft and generation.tree.top_k > self.max_top_k:
            raise ConfigError(f"--tree-top-k {generation.tree.top_k} is more than the draft graph's top-k "
                              f"({self.max_top_k}); export again with a larger --max-top-k")
        # lookup imports torch; its budget check is the one the decoder makes per request, so it is shared.
        from hass_deploy.runtime.lookup import check_tree_budget

        check_tree_budget(generation, with_draft, self.max_tree_tokens)
