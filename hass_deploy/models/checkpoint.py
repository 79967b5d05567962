"""Draft-head directories in the EAGLE checkpoint format (algorithm.md §1.6–1.8), plus our metadata.

    config.json        a Llama config with num_hidden_layers 1 and an explicit "bias" (fc bias)
    model.safetensors  flat EAGLE keys: embed_tokens.weight, fc.weight[, fc.bias], layers.0.*, and with a reduced
                       draft vocabulary EAGLE-3's d2t / t2d (config.json then has EAGLE-3's draft_vocab_size)
    hass_deploy.json   format version, recipe, and the identity of the target it was made for
    token_map.pt       (reduced vocabulary only) its N target ids, torch-saved, as SGLang's --speculative-token-map
                       takes them for EAGLE-2 drafts
    target_probe.safetensors  (packed drafts only) a few rows of the target's embedding, to check the pairing
    conversations.txt  (packed with --data) the dataset conversations its data drew on, one id a line: prompts held
                       out from it (the quickstart's) avoid them

A packed draft (`pack_draft`, `hass-deploy pack-draft`) leaves out the frozen embedding copy, which the loader
takes from the target as vLLM's and SGLang's EAGLE loaders do, and stores its weights in bf16: SmolLM2's HASS draft
with an 8192-token vocabulary is 8 MB instead of 130.

Published EAGLE/HASS drafts (pytorch_model.bin or model.safetensors, with or without fc.bias, with a DDP
`module.` prefix) load as they are. Pairing a draft with a target checks hidden size, vocabulary and the
embedding table itself: an EAGLE draft carries a copy of its target's embedding, so a draft made for another
model is caught even when the shapes agree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hass_deploy.atomic import check_output_dir, replacing_directory
from hass_deploy.errors import DraftMismatchError, HassDeployError, ModelLoadError
from hass_deploy.models.draft import DraftHead
from hass_deploy.models.loading import (TargetHead, TargetModel, config_from_hf, load_target_head, read_json,
                                        read_state_dict, target_fingerprint)
from hass_deploy.models.target import ModelConfig

FORMAT_VERSION = 1
METADATA_FILE = "hass_deploy.json"
TOKEN_MAP_FILE = "token_map.pt"
PROBE_FILE = "target_probe.safetensors"
CONVERSATIONS_FILE = "conversations.txt"
PROBE_ROWS = 64  # embedding rows a packed draft keeps: enough that another model's table cannot agree by chance


@dataclass(frozen=True)
class DraftMetadata:
    format_version: int
    recipe: str  # "random-init", "hass", "eagle2", or "external" for a published draft without our metadata
    target: dict  # architecture, hidden_size, vocab_size, num_layers, path: what it was made for


def target_identity(target: TargetModel | TargetHead) -> dict:
    c = target.config
    return {"architecture": c.architecture, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
            "num_layers": c.num_layers, "path": str(target.path), "fingerprint": target_fingerprint(target.embedding)}


def draft_config_for(target: ModelConfig) -> ModelConfig:
    """The draft layer mirrors the target's attention shape and rope; one layer.

    Only q/k/v may carry a bias (EAGLE's `qkv_bias`); o_proj and the MLP never do (algorithm.md §1.2), and the
    saved config.json has no key that could say otherwise.
    """
    return replace(target, num_layers=1, sliding_window=None, qk_norm=False, tie_word_embeddings=False,
                   o_bias=False, mlp_bias=False)


def init_draft(target: TargetModel | TargetHead, seed: int = 0, fc_bias: bool = False,
               vocabulary: torch.Tensor | None = None) -> DraftHead:
    """A randomly initialised draft head for `target`, with the target's embedding copied in; `vocabulary` ([N]
    target ids) makes it score only those tokens (draft.py).

    fc is bias-free by default: vLLM's EAGLE loader rejects `fc.bias` (algorithm.md §1.8).
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        head = DraftHead(draft_config_for(target.config), fc_bias=fc_bias,
                         draft_vocab=None if vocabulary is None else len(vocabulary))
    finally:
        torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        head.embed_tokens.weight.copy_(target.embedding.float())
    if vocabulary is not None:
        head.set_vocabulary(vocabulary)
    return head


def copy_target_layer(head: DraftHead, target_dir: str | Path, layer: int = -1) -> DraftHead:
    """Start the draft's layer from one of the target's (default its last, the one whose output the draft
    predicts the next of): attention, MLP and post-attention norm weights; the draft has no input norm, and keeps
    its own fc and (absent) q/k norms."""
    from hass_deploy.models.gguf import resolve_target

    directory = resolve_target(target_dir)
    config = config_from_hf(read_json(directory / "config.json"), str(directory / "config.json"))
    index = layer % config.num_layers
    prefix = f"model.layers.{index}."
    mine = {k for k in head.state_dict() if k.startswith("layers.0.")}
    wanted = {prefix + k.removeprefix("layers.0.") for k in mine}
    state = read_state_dict(directory, wanted)
    missing = sorted(wanted - set(state))
    if missing:
        raise ModelLoadError(f"{directory}: layer {index} lacks {missing[0]} (cannot start the draft from it)")
    with torch.no_grad():
        for key in mine:
            head.state_dict()[key].copy_(state[prefix + key.removeprefix("layers.0.")])
    return head


def write_random_draft(target_dir: str | Path, out: str | Path, seed: int = 0, force: bool = False) -> Path:
    """`init_draft` for the target in `target_dir`, saved to `out` (random weights: smoke tests before training)."""
    out = check_output_dir(out, force)
    target = load_target_head(target_dir)  # the embedding and config are all a fresh draft takes from its target
    return save_draft(init_draft(target, seed=seed), out, DraftMetadata(FORMAT_VERSION, "random-init",
                                                                        target_identity(target)))


def _hf_draft_config(head: DraftHead) -> dict:
    c = head.config
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": 1,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_parameters.get("rope_theta", 10000.0),
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": False,
        "bias": head.fc_bias,
        **({"draft_vocab_size": head.draft_vocab} if head.draft_vocab is not None else {}),  # EAGLE-3's key
        "torch_dtype": str(head.fc.weight.dtype).removeprefix("torch."),
    }
    scaling = {k: v for k, v in c.rope_parameters.items() if k != "rope_theta"}
    config["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    if c.qkv_bias:
        config["qkv_bias"] = True  # EAGLE's loader checks this key by presence
    return config


def save_draft(head: DraftHead, out: str | Path, metadata: DraftMetadata,
               extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a draft directory atomically: a crash leaves the previous directory (if any) untouched.

    `extra_files` (name -> bytes) travel in the same atomic replacement, e.g. a trainer's resumable state.
    """
    out = Path(out)
    with replacing_directory(out) as tmp:
        state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_hf_draft_config(head), indent=2) + "\n")
        (tmp / METADATA_FILE).write_text(json.dumps(asdict(metadata), indent=2) + "\n")
        if head.draft_vocab is not None:  # SGLang's --speculative-token-map (FR-Spec's format): the N target ids
            torch.save(head.vocabulary().cpu(), tmp / TOKEN_MAP_FILE)
        for name, content in (extra_files or {}).items():
            (tmp / name).write_bytes(content)
    return out


def pack_draft(draft: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16, force: bool = False,
               conversations: list[str] | None = None) -> Path:
    """Write `draft` as a packed draft: no embedding copy (the target's is the same table), floating-point weights in
    `dtype`, the token map as it was, and PROBE_ROWS rows of the embedding so that loading still refuses a draft
    made for another target; `conversations` (`data.trained_conversations` of its data) go in CONVERSATIONS_FILE.
    Returns `out`."""
    source = Path(draft)
    if not (source / "config.json").is_file():
        raise ModelLoadError(f"{source}: not a draft directory (no config.json)")
    state = _draft_state(source)
    embedding = state.pop("embed_tokens.weight", None)
    if embedding is None:
        raise ModelLoadError(f"{source}: the draft has no embedding copy to pack from (is it packed already?)")
    out = check_output_dir(out, force)
    ids = torch.linspace(0, embedding.shape[0] - 1, PROBE_ROWS).round().long().unique()
    with replacing_directory(out) as tmp:
        state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = read_json(source / "config.json")
        (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": str(dtype).removeprefix("torch.")},
                                                    indent=2) + "\n")
        save_file({"ids": ids, "rows": embedding[ids].to(dtype).contiguous()}, tmp / PROBE_FILE)
        if conversations is not None:
            (tmp / CONVERSATIONS_FILE).write_text("".join(c + "\n" for c in conversations))
        for name in (METADATA_FILE, TOKEN_MAP_FILE, "metrics.jsonl"):  # metrics: what its training measured
            if (source / name).is_file():
                (tmp / name).write_bytes((source / name).read_bytes())
    return out


def _draft_state(directory: Path) -> dict[str, torch.Tensor]:
    # EAGLE's from_pretrained tries pytorch_model.bin first, then model.safetensors; read_state_dict prefers
    # safetensors, and a directory holding both with different contents is not a format anyone writes.
    state = read_state_dict(directory)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_draft(path: str | Path, target: TargetModel | TargetHead, dtype: torch.dtype | None = None) -> tuple[DraftHead, DraftMetadata]:
    """Load a draft directory for `target`, refusing one made for another model."""
    directory = Path(path)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: no such draft directory")
    raw = read_json(directory / "config.json")
    if raw.get("num_hidden_layers", 1) != 1:
        raise ModelLoadError(f"{directory}: not an EAGLE/HASS draft head (num_hidden_layers = {raw['num_hidden_layers']})")
    state = _draft_state(directory)
    raw = {**raw, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    # Biases follow the weights, as EAGLE's `qkv_bias` presence check does: a draft whose config.json was copied
    # from a target with attention_bias/mlp_bias must not make the strict load expect biases it never had.
    config = replace(config_from_hf(raw, str(directory / "config.json")),
                     qkv_bias="layers.0.self_attn.q_proj.bias" in state,
                     o_bias="layers.0.self_attn.o_proj.bias" in state,
                     mlp_bias="layers.0.mlp.down_proj.bias" in state, tie_word_embeddings=False)
    _check_pair(directory, config, state, target)
    if "embed_tokens.weight" not in state:  # packed drafts and some exports drop the frozen copy: the same table
        state["embed_tokens.weight"] = target.embedding.detach()
    dtype = dtype or target.embedding.dtype
    try:
        with torch.device("meta"):
            head = DraftHead(config, fc_bias="fc.bias" in state,
                             draft_vocab=state["d2t"].numel() if "d2t" in state else None)
    except ValueError as err:  # e.g. a rope_type that Rotary does not implement
        raise ModelLoadError(f"{directory}: {err}") from None
    try:
        # The token map (d2t int64, t2d bool) keeps its own dtype.
        head.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=True,
                             assign=True)
    except RuntimeError as err:
        detail = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise ModelLoadError(f"{directory}: draft weights do not match its config.json ({detail})") from None
    head.embed_tokens.weight.requires_grad_(False)
    try:
        head.check_vocabulary()
    except ValueError as err:
        raise ModelLoadError(f"{directory}: {err}") from None
    head.rotary = type(head.rotary)(config)
    head.to(target.embedding.device)  # where the target runs: a CUDA target must not meet a CPU draft
    meta_path = directory / METADATA_FILE
    try:
        metadata = DraftMetadata(**read_json(meta_path)) if meta_path.exists() else DraftMetadata(
            format_version=FORMAT_VERSION, recipe="external", target={})
    except TypeError as err:  # missing or unknown fields
        raise ModelLoadError(f"{meta_path}: malformed draft metadata ({err})") from None
    if not isinstance(metadata.format_version, int):
        raise ModelLoadError(f"{meta_path}: malformed draft metadata (format_version {metadata.format_version!r})")
    if metadata.format_version > FORMAT_VERSION:
        raise HassDeployError(f"{directory}: draft format {metadata.format_version} is newer than this hass-deploy")
    return head.eval(), metadata


def _check_pair(directory: Path, config: ModelConfig, state: dict, target: TargetModel) -> None:
    t = target.config
    if config.hidden_size != t.hidden_size:
        raise DraftMismatchError(
            f"draft {directory} has hidden size {config.hidden_size}, target {target.path} has {t.hidden_size}")
    if config.vocab_size != t.vocab_size:
        raise DraftMismatchError(
            f"draft {directory} has vocabulary {config.vocab_size}, target {target.path} has {t.vocab_size}")
    embed = state.get("embed_tokens.weight")
    reference = target.embedding.detach().float()
    if embed is None and (directory / PROBE_FILE).is_file():  # a packed draft: compare the rows it kept
        probe = load_file(directory / PROBE_FILE)
        ids, embed = probe["ids"], probe["rows"]
        if not (ids.dtype == torch.int64 and ids.ndim == 1 and embed.shape == (len(ids), t.hidden_size)
                and 0 <= ids.min() and ids.max() < t.vocab_size):
            raise ModelLoadError(f"{directory / PROBE_FILE}: malformed target probe")
        reference = reference[ids]
    if embed is None:
        return
    # Tolerance covers a copy stored in fp16/bf16; a different model's table differs by O(its own scale).
    if embed.shape != reference.shape or not torch.allclose(embed.float(), reference, rtol=1e-2, atol=1e-2 * reference.abs().max().item()):
        raise DraftMismatchError(
            f"draft {directory} was made for a different target: its embedding table differs from {target.path}'s")
