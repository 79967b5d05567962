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

import torch

from hass_deploy.artifacts import Artifacts
from hass_deploy.config import GenerationConfig, RuntimeConfig
from hass_deploy.errors import HassDeployError
from hass_deploy.models.checkpoint import DraftMetadata, load_draft
from hass_deploy.models.loading import TargetHead, TargetModel, load_target, load_target_head
from hass_deploy.prompts import Prompt, encode
from hass_deploy.runtime.backends import BackendOptions, backend_spec
from hass_deploy.runtime.decoder import GenerationResult, SpeculativeDecoder
from hass_deploy.runtime.lookup import NgramCache


def default_max_seq_len(target: TargetModel) -> int:
    return min(target.config.max_position_embeddings, 4096)


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
             artifacts: str | Path | Artifacts | None = None, corpus: NgramCache | None = None) -> "Pipeline":
        """Load the models and allocate KV buffers once; `generation.tree` sizes the draft's tree rows, and an
        export's tree budget is checked against it and `generation.lookup`.

        With an exported backend (`runtime.backend` "onnxruntime" or "tensorrt"), `artifacts` is the `hass-deploy
        export` directory (or that export, opened already): the graphs run there, and the models given are loaded
        in fp32 on the CPU only to check that the graphs were exported from them (and for the tokenizer and stop
        tokens).

        `corpus`: prompt lookup's static n-gram statistics (`NgramCache.from_file`), shared by every request.
        """
        if runtime.device.startswith("cuda") and not torch.cuda.is_available():
            raise HassDeployError(f"--device {runtime.device}: this torch ({torch.__version__}) sees no CUDA device")
        spec = backend_spec(runtime.backend)
        exported = spec.artifacts(artifacts)
        if exported is not None:  # the layers are exported graphs or plans: the request must fit them
            exported.check_dtype(runtime.dtype)
            max_seq_len = runtime.max_seq_len or exported.max_seq_len
            exported.check_request(max_seq_len, generation, with_draft=draft_dir is not None)
            # The target's config, embedding and lm_head (the identity check and the draft), tokenizer and stop
            # tokens: not its layers, which the graphs hold.
            target = load_target_head(target_dir, tokenizer=True)
        else:
            target = load_target(target_dir, runtime.dtype, runtime.device)
            max_seq_len = runtime.max_seq_len or default_max_seq_len(target)
        if corpus is not None:
            corpus.check_vocabulary(target.config.vocab_size)
        head, metadata = (None, None) if draft_dir is None else load_draft(draft_dir, target)
        if exported is not None:
            exported.check_target(target)
            exported.check_draft(head)
        target_backend, draft_backend = spec.open(target, head, BackendOptions.of(runtime), exported, max_seq_len,
                                                  generation.tree.draft_rows)
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
