"""Function-preserving widening (DESIGN D11): a target and its drafts grown to a larger shape, every logit kept.

Nothing large can be trained here, yet what speculative decoding gains on a 0.5-1 B target depends on what one
step of that size costs and on how often its drafts are accepted. A widened target computes exactly the logits
of the trained small one (so its drafts keep their acceptance) while every step does the work of the larger
shape. It is a way to measure speed, not a better model.

The construction (exact in real arithmetic; fp32 rounding moves logits by ~1e-7):

- The residual stream grows from H to H' dims and the new dims stay exactly 0: the embedding's new columns and
  the new rows of every matrix that writes the stream (o_proj, down_proj, their biases; the draft's fc) are 0.
- The whole stream is multiplied by c = sqrt(H'/H) (the embedding and the original rows of every writer). An
  RMSNorm over H' dims, H of them c x and the rest 0, then sees mean((c x)^2) H / H' = mean(x^2): the mean
  square it saw before, so its eps stays and weight' = weight / c gives back its output. Scaling eps instead
  (eps H / H', stream unscaled) would be exact for these norms too, but config.json has ONE rms_norm_eps and
  Qwen3's per-head q/k norms share it: their input (head_dim wide) does not grow, so they need the old eps, and
  no weight can make up for a changed eps (the error depends on the input's mean square). Scaling the stream
  leaves every eps of the target alone.
- New attention heads have the same head_dim and keep the GQA group: query head h reads kv head h // groups,
  so new query heads are appended after the old ones and read only the new kv heads. Their o_proj columns are 0,
  as are the down_proj columns of new MLP units. New layers are appended with o_proj and down_proj all 0.
- Every other new weight is random, N(0, init_std), so no kernel can skip work on zeros. Columns that read a
  padded (always 0) dim may be random too.
- The final norm's output (the lm_head input, EAGLE's feature) is t times the original: t = 1 with an untied
  lm_head (its new columns random); with tied embeddings the lm_head IS the embedding, already c times the
  original, so t = 1/c (t c = 1 keeps the logits).

A draft (e = Embed(x); h = fc([e, f]); one layer without input norm; logits = the target's lm_head) reads
e' = c e and f' = t f and must give g' = t g (its output is a feature: it is fed back and goes through the
target's lm_head), so its own stream is t times the original. fc's original block becomes [t/c A | B] with the
feature block at input columns H'..H'+H; q/k/v read the raw stream (x 1/t); the writers are x t; its one RMSNorm
sees the mean square (H/H') t^2 mean(x^2), which needs eps' = eps (H/H') t^2 and weight / c. That is free: a
draft's config.json is its own and a draft has no q/k norm.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from hass_deploy.atomic import check_output_dir, replacing_directory
from hass_deploy.config import Widening
from hass_deploy.errors import ConfigError, HassDeployError
from hass_deploy.models.checkpoint import FORMAT_VERSION, DraftMetadata, load_draft, save_draft, target_identity
from hass_deploy.models.draft import DraftHead
from hass_deploy.models.loading import load_target, load_target_head, parse_dtype, read_json, target_fingerprint
from hass_deploy.models.target import ModelConfig, Rotary, Transformer
from hass_deploy.progress import progress_bar

WIDEN_FILE = "hass_deploy_widen.json"  # in OUT/target: where it came from and the scales used
# Beside the weights, a target directory's other files that still describe the widened model.
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                "chat_template.json")


@dataclass(frozen=True)
class Scales:
    """How the widened model's activations relate to the original's on the original dims (see the module doc)."""

    hidden: float  # c = sqrt(H'/H): the target's residual stream, so every RMSNorm sees its old mean square
    feature: float  # t: the final norm's output (the feature, and the draft's stream): 1, or 1/c when tied


def widened_config(config: ModelConfig, widening: Widening, whose: str = "the target's") -> ModelConfig:
    """`config` at the new shape: head_dim and the GQA group kept, head counts grown with the hidden size.

    Raises:
        ConfigError: a size below the original's, a hidden size that is not a multiple of head_dim, or one for
            which the kv head count (num_kv_heads H'/H) would not be whole.
    """
    for flag, new, old in (("--hidden-size", widening.hidden_size, config.hidden_size),
                           ("--intermediate-size", widening.intermediate_size, config.intermediate_size),
                           ("--num-layers", widening.num_layers, config.num_layers)):
        if new < old:
            raise ConfigError(f"{flag} {new} is smaller than {whose} {old}: widening only grows a model")
    hidden, wide = config.hidden_size, widening.hidden_size
    # Llama-style configs derive head_dim as hidden / heads, so the multiple must stay; a Qwen3 whose hidden size
    # never was a multiple (decoupled head_dim) needs only whole head counts, checked next.
    keeps_multiple = hidden % config.head_dim == 0
    if keeps_multiple and wide % config.head_dim:
        raise ConfigError(f"--hidden-size {wide} is not a multiple of head_dim {config.head_dim} (head_dim is kept)")
    groups = config.num_heads // config.num_kv_heads
    if config.num_kv_heads * wide % hidden:
        step = hidden // math.gcd(hidden, config.num_kv_heads)  # the smallest H' with whole kv heads
        step = math.lcm(step, config.head_dim) if keeps_multiple else step
        raise ConfigError(
            f"--hidden-size {wide} cannot keep the GQA group of {groups}: {config.num_kv_heads} kv heads x "
            f"{wide}/{hidden} is not whole; use a multiple of {step}")
    kv_heads = config.num_kv_heads * wide // hidden
    return replace(config, hidden_size=wide, intermediate_size=widening.intermediate_size,
                   num_layers=widening.num_layers, num_heads=kv_heads * groups, num_kv_heads=kv_heads)


def scales_for(config: ModelConfig, widening: Widening) -> Scales:
    hidden = math.sqrt(widening.hidden_size / config.hidden_size)
    return Scales(hidden=hidden, feature=1 / hidden if config.tie_word_embeddings else 1.0)


def _generator(widening: Widening, name: str) -> torch.Generator:
    # Seeded by name, not by draw order: a tensor's values do not depend on which tensors were built before it.
    digest = hashlib.sha256(f"{widening.seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _place(shape: torch.Size, original: torch.Tensor | None, scale: float, fill: str, widening: Widening,
           name: str, column_blocks: Sequence[tuple[int, int, int]] | None = None) -> torch.Tensor:
    """A new fp32 tensor of `shape`: `original * scale` in its leading corner, the rest random or zero.

    `column_blocks` (source start, destination start, width) places a weight's input columns elsewhere than at
    the front (the draft's fc: [embed | feature] inputs move from [0, H) and [H, 2H) to [0, H) and [H', H'+H)).
    """
    if fill == "random":
        out = torch.empty(shape).normal_(0.0, widening.init_std, generator=_generator(widening, name))
    else:
        out = torch.zeros(shape)
    if original is None:  # a tensor of an appended layer
        return out
    original = original.detach().float() * scale
    if original.dim() == 1:
        out[: original.shape[0]] = original
    elif column_blocks is None:
        out[: original.shape[0], : original.shape[1]] = original
    else:
        for source, destination, width in column_blocks:
            out[: original.shape[0], destination : destination + width] = original[:, source : source + width]
    return out


def _writes_stream(name: str) -> bool:
    """Tensors whose output rows are residual dims: their new entries must be 0 so padded dims stay 0."""
    return name == "embed_tokens.weight" or ".o_proj." in name or ".down_proj." in name


def _target_rule(name: str, scales: Scales) -> tuple[str, float]:
    """(fill, scale of the original block) for a target tensor (our names, without HF's `model.`)."""
    if _writes_stream(name):
        return "zero", scales.hidden  # the stream is c x the original
    if name.endswith("layernorm.weight"):
        return "random", 1 / scales.hidden  # its input is c x, its output must not be
    if name == "norm.weight":
        return "random", scales.feature / scales.hidden  # output t x the original feature
    if name == "lm_head.weight":
        return "random", 1 / scales.feature  # reads the t-scaled feature
    return "random", 1.0  # q/k/v, q/k norms, gate/up and their biases: their input is a norm's, unchanged


def _target_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Every tensor a target checkpoint of `config` holds, in module order (the tied lm_head is not stored)."""
    with torch.device("meta"):
        module = Transformer(config)
    shapes = {name: tensor.shape for name, tensor in module.state_dict().items()}
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
    return shapes


def _target_maker(state: Mapping[str, torch.Tensor], config: ModelConfig,
                  widening: Widening) -> tuple[ModelConfig, dict[str, torch.Size], Callable[[str], torch.Tensor]]:
    """The widened config, its tensors' shapes, and a function that builds one widened tensor by name."""
    wide = widened_config(config, widening)
    scales = scales_for(config, widening)
    shapes = _target_shapes(wide)

    def make(name: str) -> torch.Tensor:
        fill, scale = _target_rule(name, scales)
        return _place(shapes[name], state.get(name), scale, fill, widening, name)

    return wide, shapes, make


def widen_target_state(state: Mapping[str, torch.Tensor], config: ModelConfig,
                       widening: Widening) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Widen a target's weights in memory (small models, tests); `widen_directory` streams large ones.

    Args:
        state: the target's tensors by our names (`Transformer.state_dict()`), any float dtype.
        config: its config.
        widening: the new shape.

    Returns:
        (the widened config, its fp32 tensors; with tied embeddings no lm_head.weight, as HF checkpoints store it).
    """
    wide, shapes, make = _target_maker(state, config, widening)
    return wide, {name: make(name) for name in shapes}


def widened_draft_config(draft: ModelConfig, target: ModelConfig, widening: Widening,
                         whose: str = "the draft's") -> ModelConfig:
    """The draft layer at the new shape; its RMSNorm eps follows its stream's scale t (see the module doc)."""
    scales = scales_for(target, widening)
    wide = widened_config(draft, replace(widening, num_layers=1), whose)
    ratio = draft.hidden_size / widening.hidden_size
    return replace(wide, rms_norm_eps=draft.rms_norm_eps * ratio * scales.feature**2)


def _draft_rule(name: str, scales: Scales) -> tuple[str, float]:
    """(fill, scale of the original block) for a draft tensor; its stream is t = scales.feature x the original."""
    t = scales.feature
    if name == "fc.bias" or _writes_stream(name):
        return "zero", t
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return "random", 1 / t  # no input norm: they read the raw, t-scaled stream
    if name.endswith("layernorm.weight"):
        return "random", 1 / scales.hidden  # with eps' = eps (H/H') t^2, as `widened_draft_config` sets
    return "random", 1.0  # q/k/v biases, gate/up (after the norm)


def widen_draft_state(state: Mapping[str, torch.Tensor], draft: ModelConfig, target: ModelConfig,
                      widening: Widening, embedding: torch.Tensor) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Widen a draft head's weights for the target widened by `widening`.

    Args:
        state: the draft's tensors by `DraftHead` names (`fc.weight`, `layers.0.*`; embed_tokens is ignored).
        draft: the draft's config (hidden size = the target's).
        target: the ORIGINAL target's config (its tied embeddings decide the feature scale).
        widening: the target's new shape (num_layers is the target's; a draft keeps its one layer).
        embedding: [V, H'] the widened target's embedding, which becomes the draft's frozen copy.

    Returns:
        (the widened draft config, its fp32 tensors by `DraftHead` names).
    """
    wide = widened_draft_config(draft, target, widening)
    scales = scales_for(target, widening)
    hidden, wide_hidden = draft.hidden_size, wide.hidden_size
    with torch.device("meta"):
        module = DraftHead(wide, fc_bias="fc.bias" in state)
    tensors = {}
    for name, meta in module.state_dict().items():
        if name == "embed_tokens.weight":
            tensors[name] = embedding.detach().float()
        elif name == "fc.weight":
            # [H', 2H']: h' = t h from e' = c e and f' = t f, so the embed block is x t/c and the feature block x 1;
            # padded output rows 0 (the stream's padded dims), columns reading padded inputs random.
            weight = state[name].detach().float()  # [H, 2H] over [embed | feature]
            weight = torch.cat([weight[:, :hidden] * (scales.feature / scales.hidden), weight[:, hidden:]], dim=1)
            out = _place(meta.shape, weight, 1.0, "random", widening, "draft/" + name,
                         column_blocks=((0, 0, hidden), (hidden, wide_hidden, hidden)))
            out[hidden:] = 0
            tensors[name] = out
        else:
            fill, scale = _draft_rule(name, scales)
            tensors[name] = _place(meta.shape, state.get(name), scale, fill, widening, "draft/" + name)
    return wide, tensors


def widen_draft(head: DraftHead, target: ModelConfig, widening: Widening, embedding: torch.Tensor) -> DraftHead:
    """`widen_draft_state` as a module (fp32, eval mode); arguments as there."""
    config, tensors = widen_draft_state(head.state_dict(), head.config, target, widening, embedding)
    with torch.device("meta"):
        widened = DraftHead(config, fc_bias=head.fc_bias)
    widened.load_state_dict(tensors, strict=True, assign=True)
    widened.embed_tokens.weight.requires_grad_(False)  # a frozen copy of the target's, as `load_draft` leaves it
    widened.rotary = Rotary(config)  # built on meta, its frequencies hold no values
    return widened.eval()


def _widened_hf_config(raw: dict, wide: ModelConfig, dtype: str = "fp32") -> dict:
    """The source config.json at the new shape and storage dtype; head_dim (when present) and every eps are kept."""
    out = {**raw, "hidden_size": wide.hidden_size, "intermediate_size": wide.intermediate_size,
           "num_hidden_layers": wide.num_layers, "num_attention_heads": wide.num_heads,
           "num_key_value_heads": wide.num_kv_heads}
    if isinstance(raw.get("layer_types"), list) and raw["layer_types"]:
        # Qwen2/Qwen3 list one attention type per layer and transformers checks the length: appended layers
        # repeat the last one (their output is 0 either way).
        types = raw["layer_types"]
        out["layer_types"] = types + [types[-1]] * (wide.num_layers - len(types))
    for key in ("dtype", "torch_dtype"):
        if key in raw:
            out[key] = str(parse_dtype(dtype)).removeprefix("torch.")  # HF's name: "bfloat16"
    return out


def _hf_name(name: str) -> str:
    """Our target names are HF's without the `model.` prefix that everything but lm_head carries."""
    return name if name == "lm_head.weight" else "model." + name


SHARD_BYTES = 1 << 30  # tensors per safetensors file: a shard is what is held in memory while it is written


def _write_shards(directory: Path, shapes: Mapping[str, torch.Size], make: Callable[[str], torch.Tensor],
                  advance: Callable[[int], None], dtype: torch.dtype = torch.float32) -> None:
    """Write the target's tensors in `dtype` with safetensors, in shards of about SHARD_BYTES (a 1 B model is 4 GB
    in fp32: never all of it in memory), and the HF index that maps each tensor to its shard (what `loading`
    reads)."""
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * math.prod(shape)
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for file, group in zip(names, groups):
        tensors = {}
        for name in group:
            tensors[_hf_name(name)] = make(name).to(dtype).contiguous()
            advance(1)
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update({key: file for key in tensors})
        del tensors
    if len(groups) > 1:
        total = sum(itemsize * math.prod(shape) for shape in shapes.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A bar over tensors on stderr when it is a terminal (a 1 B model, 4 GB, takes tens of seconds to write)."""
    with progress_bar("widening", "tensors", enabled=enabled) as bar:
        task = bar.add_task("", total=total)
        yield lambda n: bar.update(task, advance=n)


def _check_paths(target: Path, out: Path, drafts: Sequence[Path], force: bool) -> list[str]:
    """Refuse an OUT that is a file, non-empty without force, or holds an input; two drafts of one name."""
    check_output_dir(out, force)
    for source in (target, *drafts):
        if source.resolve() == out.resolve() or out.resolve() in source.resolve().parents:
            raise HassDeployError(f"{source} is inside {out}, which would be replaced; choose another --out")
    names = [draft.resolve().name for draft in drafts]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise HassDeployError(f"two drafts would both be written to {out / 'drafts' / duplicates[0]}; "
                              "give drafts with distinct directory names")
    return names


def widen_directory(target: str | Path, out: str | Path, widening: Widening, drafts: Sequence[str | Path] = (),
                    force: bool = False, progress: bool = False) -> Path:
    """Write OUT/target (an HF directory at the new shape, fp32) and OUT/drafts/<name> for each draft, atomically.

    The target is built and written one tensor at a time; each draft is checked against the target before
    anything is written, then saved with the widened target's identity and its own recipe.

    Raises:
        HassDeployError: a missing or malformed directory, a draft of another target, a shape that cannot be
            widened to (see `widened_config`), or an OUT that exists and is not empty (without `force`).
    """
    target, out = Path(target), Path(out)
    draft_dirs = [Path(d) for d in drafts]
    names = _check_paths(target, out, draft_dirs, force)
    source = load_target(target, tokenizer=False)
    raw = read_json(target / "config.json")
    state = source.module.state_dict()
    wide, shapes, make = _target_maker(state, source.config, widening)
    loaded = [load_draft(d, source, torch.float32) for d in draft_dirs]  # DraftMismatchError before any write
    for draft_dir, (head, _) in zip(draft_dirs, loaded):
        widened_draft_config(head.config, source.config, widening, f"draft {draft_dir}'s")
    scales = scales_for(source.config, widening)
    draft_tensors = sum(len(head.state_dict()) for head, _ in loaded)
    with replacing_directory(out) as tmp, _progress(len(shapes) + draft_tensors, progress) as advance:
        (tmp / "target").mkdir()
        (tmp / "target" / "config.json").write_text(json.dumps(_widened_hf_config(raw, wide, widening.dtype),
                                                               indent=2) + "\n")
        for name in COPIED_FILES:
            if (target / name).is_file():
                shutil.copy2(target / name, tmp / "target" / name)
        _write_shards(tmp / "target", shapes, make, advance, parse_dtype(widening.dtype))
        provenance = {"source": str(target), "source_fingerprint": target_fingerprint(source.module),
                      "widening": asdict(widening), "scales": asdict(scales),
                      "note": "every logit equals the source's (fp32; other dtypes round the weights); a model for "
                              "measuring speed, not a better one"}
        (tmp / "target" / WIDEN_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        # Read back from the file just written: the drafts' embedding copy and identity are the widened target's.
        head_of_wide = replace(load_target_head(tmp / "target"), path=out / "target")
        for name, (head, metadata) in zip(names, loaded):
            widened = widen_draft(head, source.config, widening, head_of_wide.embedding)
            save_draft(widened, tmp / "drafts" / name,
                       DraftMetadata(FORMAT_VERSION, metadata.recipe, target_identity(head_of_wide)))
            advance(len(head.state_dict()))
    return out
