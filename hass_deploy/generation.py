"""The Python API: load a target (and a draft), then generate from prompts, losslessly.

    from hass_deploy import Pipeline
    pipe = Pipeline.load("path/to/target", "path/to/draft")
    result = pipe.generate(pipe.encode("Hello"))
    print(pipe.decode(result.output_ids), result.tau)

Prompt lookup needs no draft: `Pipeline.load("path/to/target").generate(ids, GenerationConfig(lookup=LookupConfig()))`;
with a draft, the same request drafts with both, merged into one tree per round (hybrid).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hass_deploy.config import GenerationConfig, RuntimeConfig
from hass_deploy.errors import HassDeployError
from hass_deploy.models.checkpoint import DraftMetadata, load_draft
from hass_deploy.models.loading import TargetHead, TargetModel, load_target, load_target_head
from hass_deploy.prompts import Prompt, encode
from hass_deploy.runtime.backends import backend_options, open_backends
from hass_deploy.runtime.decoder import GenerationResult, SpeculativeDecoder
from hass_deploy.runtime.lookup import NgramCache, check_tree_budget

if TYPE_CHECKING:
    from hass_deploy.manifest import Manifest


def default_max_seq_len(target: TargetModel) -> int:
    return min(target.config.max_position_embeddings, 4096)


def _load_for_artifacts(target_dir, draft_dir, runtime: RuntimeConfig, generation: GenerationConfig,
                        artifacts) -> tuple[TargetHead, int, "Manifest"]:
    """What an exported pipeline needs of the target (its config, embedding and lm_head for the identity check and
    the draft, its tokenizer and stop tokens: not its layers, which the graphs hold), the KV rows, and the manifest,
    read once, after checking that the request fits it."""
    from hass_deploy.manifest import check_capacity, read_manifest

    if artifacts is None:
        raise HassDeployError(f"--backend {runtime.backend} needs --artifacts DIR (made by `hass-deploy export`)")
    manifest = read_manifest(artifacts)
    if runtime.dtype not in (RuntimeConfig().dtype, manifest.dtype):
        raise HassDeployError(f"the artifacts are {manifest.dtype}: their precision is fixed at export "
                              f"(drop --dtype {runtime.dtype}, or export again with --dtype {runtime.dtype})")
    max_seq_len = runtime.max_seq_len or manifest.max_seq_len
    with_draft = draft_dir is not None
    check_capacity(manifest, max_seq_len, generation.tree.tokens if with_draft else None,
                   generation.tree.top_k if with_draft else None)
    check_tree_budget(generation, with_draft, manifest.max_tree_tokens)
    return load_target_head(target_dir, tokenizer=True), max_seq_len, manifest


@dataclass
class Pipeline:
    target: TargetModel | TargetHead  # the head alone when the layers run in exported graphs
    decoder: SpeculativeDecoder
    draft_metadata: DraftMetadata | None
    runtime: RuntimeConfig
    max_seq_len: int

    @classmethod
    def load(cls, target_dir: str | Path, draft_dir: str | Path | None = None,
             runtime: RuntimeConfig = RuntimeConfig(), generation: GenerationConfig = GenerationConfig(),
             artifacts: str | Path | None = None, corpus: NgramCache | None = None) -> "Pipeline":
        """Load the models and allocate KV buffers once; `generation.tree` sizes the draft's tree rows, and an
        export's tree budget is checked against it and `generation.lookup`.

        With `runtime.backend == "onnxruntime"`, `artifacts` is the `hass-deploy export` directory: the graphs
        run there, and the models given are loaded in fp32 on the CPU only to check that the graphs were
        exported from them (and for the tokenizer and stop tokens).

        `corpus`: prompt lookup's static n-gram statistics (`NgramCache.from_file`), shared by every request.
        """
        if runtime.device.startswith("cuda") and not torch.cuda.is_available():
            raise HassDeployError(f"--device {runtime.device}: this torch ({torch.__version__}) sees no CUDA device")
        manifest = None
        if runtime.backend in ("onnxruntime", "tensorrt"):  # the layers are exported graphs or plans
            target, max_seq_len, manifest = _load_for_artifacts(target_dir, draft_dir, runtime, generation, artifacts)
        else:
            target = load_target(target_dir, runtime.dtype, runtime.device)
            max_seq_len = runtime.max_seq_len or default_max_seq_len(target)
        if corpus is not None:
            corpus.check_vocabulary(target.config.vocab_size)
        head, metadata = (None, None) if draft_dir is None else load_draft(draft_dir, target)
        target_backend, draft_backend = open_backends(runtime.backend, target, head, max_seq_len,
                                                      generation.tree.draft_rows, artifacts, runtime.device,
                                                      manifest=manifest, **backend_options(runtime))
        return cls(target, SpeculativeDecoder(target_backend, draft_backend, corpus), metadata, runtime, max_seq_len)

    def encode(self, prompt: str | Prompt, chat: bool | None = None) -> list[int]:
        return encode(prompt if isinstance(prompt, Prompt) else Prompt(text=prompt), self.target.tokenizer, chat)

    def decode(self, ids: list[int]) -> str | None:
        tokenizer = self.target.tokenizer
        return None if tokenizer is None else tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompt_ids: list[int], config: GenerationConfig = GenerationConfig(),
                 on_tokens=None) -> GenerationResult:
        if not config.eos_token_ids:
            config = replace(config, eos_token_ids=self.target.eos_token_ids)
        return self.decoder.generate(prompt_ids, config, on_tokens)
