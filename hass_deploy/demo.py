"""The embedded default target: a small Llama-architecture LM built from scratch on this machine.

No download: a byte-level BPE tokenizer (`tokenizers`) and a causal LM trained on text every Python
installation carries — the standard library's own source, found through `sysconfig`. The result is an
ordinary Hugging Face directory (config.json, model.safetensors, tokenizer files), so every other command
treats it like a user's model. Deterministic given the preset and seed; cached under `$HASS_DEPLOY_HOME`
(default `~/.cache/hass-deploy`), built once, verified on reuse and rebuilt if corrupted.
"""

from __future__ import annotations

import json
import math
import random
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hass_deploy.atomic import replacing_directory
from hass_deploy.errors import HassDeployError
from hass_deploy.cache import file_sha256, home, json_key
from hass_deploy.models.loading import config_from_hf
from hass_deploy.models.target import Transformer
from hass_deploy.progress import progress_bar

RECIPE_VERSION = 1
RECIPE_FILE = "hass_deploy_target.json"


@dataclass(frozen=True)
class TargetRecipe:
    """Model shape and training budget.

    `default` is deeper and wider than it needs to be to model the text well in a few minutes: speculative
    decoding pays when one draft step (one layer plus the lm_head) is cheap next to one target step, and on
    2 CPU cores a 4-layer 256-wide target costs barely twice its own draft (`docs/RESULTS.md`). A 4096-token
    vocabulary keeps the lm_head, which both models pay for, small.
    """

    vocab_size: int = 4096
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    num_kv_heads: int = 2
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 400  # about 4 minutes on 2 cores in bf16 autocast
    lr: float = 2e-3
    warmup_steps: int = 20
    corpus_bytes: int = 6_000_000  # of stdlib source used for training: ~3x the tokens the steps consume
    # Of files, held out from the target: draft training text, validation and benchmark prompts come from them.
    heldout_fraction: float = 0.15
    seed: int = 0


PRESETS = {
    "default": TargetRecipe(),
    "tiny": TargetRecipe(vocab_size=2048, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4,
                         num_kv_heads=2, seq_len=128, batch_size=8, steps=150, lr=3e-3, corpus_bytes=2_000_000),
}


def stdlib_files(recipe: TargetRecipe) -> tuple[list[Path], list[Path], list[Path]]:
    """The standard library's .py files, shuffled by file, as (target training, draft training, evaluation).

    The last `heldout_fraction` of the files never train the target: three quarters of them are the draft's
    training text, one quarter is for evaluation only (the target's validation loss, benchmark prompts).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if "site-packages" not in f.parts and "dist-packages" not in f.parts)
    if len(files) < 8:
        raise HassDeployError(f"no Python standard library source under {root} to train the demo target on")
    random.Random(recipe.seed).shuffle(files)
    held = max(2, int(len(files) * recipe.heldout_fraction))
    evaluation = max(1, held // 4)
    return files[:-held], files[-held:-evaluation], files[-evaluation:]


def read_texts(files: list[Path], budget: int) -> list[str]:
    texts, total = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= budget:
            break
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def _hf_config(recipe: TargetRecipe, eos: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": recipe.vocab_size, "hidden_size": recipe.hidden_size,
        "intermediate_size": recipe.intermediate_size, "num_hidden_layers": recipe.num_layers,
        "num_attention_heads": recipe.num_heads, "num_key_value_heads": recipe.num_kv_heads,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": "float32",
    }


def _lr(step: int, recipe: TargetRecipe) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _windows(tokens: torch.Tensor, recipe: TargetRecipe, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - recipe.seq_len - 1, (recipe.batch_size,), generator=generator)
    return torch.stack([tokens[s : s + recipe.seq_len + 1] for s in starts.tolist()])  # [B, L + 1]


@torch.no_grad()
def validation_loss(model: Transformer, tokens: torch.Tensor, seq_len: int, max_windows: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over non-overlapping held-out windows."""
    losses = []
    for start in range(0, min(len(tokens) - seq_len - 1, max_windows * seq_len), seq_len):
        window = tokens[start : start + seq_len + 1][None]
        hidden = model(window[:, :-1], torch.arange(seq_len, device=tokens.device)[None])
        losses.append(F.cross_entropy(model.logits(hidden)[0].float(), window[0, 1:]).item())
    return sum(losses) / len(losses)


def build_target(out: Path, recipe: TargetRecipe, progress: bool = True, device: str = "cpu") -> dict:
    """Train the target from scratch on `device` and write it as a Hugging Face directory at `out` (atomically)."""
    from safetensors.torch import save_file

    torch.manual_seed(recipe.seed)
    train_files, draft_files, eval_files = stdlib_files(recipe)
    train_texts = read_texts(train_files, recipe.corpus_bytes)
    tokenizer = train_tokenizer(train_texts, recipe.vocab_size)
    eos = tokenizer.eos_token_id
    encode = lambda texts: torch.tensor([t for text in texts for t in tokenizer(text)["input_ids"] + [eos]])  # noqa: E731
    train_tokens = encode(train_texts)
    held_tokens = encode(read_texts(eval_files, 400_000))
    config = config_from_hf(_hf_config(recipe, eos))
    device = torch.device(device)
    model = Transformer(config).to(device).train()  # initialised on the CPU first: the same weights on any device
    train_tokens, held_tokens = train_tokens.to(device), held_tokens.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(recipe.seed)
    with progress_bar("training demo target", "{task.fields[rate]:.0f} tok/s  loss {task.fields[loss]:.3f}",
                      enabled=progress) as bar:
        task = bar.add_task("", total=recipe.steps, rate=0.0, loss=math.nan)
        for step in range(recipe.steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, recipe)
            batch = _windows(train_tokens, recipe, generator)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                positions = torch.arange(recipe.seq_len, device=device).expand(recipe.batch_size, -1)
                hidden = model(batch[:, :-1], positions)
                loss = F.cross_entropy(model.logits(hidden).float().flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = bar.tasks[0].elapsed or 1e-9
            bar.update(task, advance=1, loss=loss.item(), rate=(step + 1) * recipe.batch_size * recipe.seq_len / elapsed)
    model.eval()
    report = {"recipe_version": RECIPE_VERSION, "recipe": asdict(recipe), "train_tokens": len(train_tokens),
              "draft_files": [str(f) for f in draft_files], "eval_files": [str(f) for f in eval_files],
              "validation_loss": validation_loss(model, held_tokens, recipe.seq_len)}
    with replacing_directory(out) as tmp:
        state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v.contiguous().cpu()
                 for k, v in model.state_dict().items()}
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_hf_config(recipe, eos), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "bos_token_id": eos}) + "\n")
        tokenizer.save_pretrained(tmp)
        report["weights_sha256"] = file_sha256(tmp / "model.safetensors")
        (tmp / RECIPE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report




def cached_target(preset: str = "default", seed: int = 0, progress: bool = True, device: str = "cpu") -> Path:
    """The demo target for `preset`, built on first use (on `device`); a corrupted cache entry is rebuilt, not
    trusted. A target trained on another kind of device has other weights, so it is cached apart."""
    if preset not in PRESETS:
        raise HassDeployError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    recipe = PRESETS[preset] if seed == PRESETS[preset].seed else TargetRecipe(**{**asdict(PRESETS[preset]), "seed": seed})
    kind = torch.device(device).type
    key = json_key([RECIPE_VERSION, asdict(recipe)] + ([kind] if kind != "cpu" else []), length=12)
    path = home() / "targets" / f"{preset}-{key}"
    if _intact(path):
        return path
    build_target(path, recipe, progress, device)
    return path


def _intact(path: Path) -> bool:
    try:
        report = json.loads((path / RECIPE_FILE).read_text())
        return report.get("weights_sha256") == file_sha256(path / "model.safetensors")
    except (OSError, ValueError):
        return False
