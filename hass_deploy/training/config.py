"""`hass-deploy data`'s settings: one frozen dataclass, each default and its help defined once (no torch here: the
CLI reads it for its options)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from hass_deploy.config import DTYPES, at_least, option
from hass_deploy.errors import ConfigError
from hass_deploy.prompts import PROMPT_SETS

FORMATS = ("sharegpt", "text", "prompts", "ids")  # the dataset formats `training/chat.py` reads


@dataclass(frozen=True)
class DataConfig:
    """Settings of `hass-deploy data`."""

    format: str = option("sharegpt", "sharegpt, text, ids, or prompts (+ --regenerate).")
    max_samples: int | None = option(None, "Records used after the seeded shuffle (default: all).")
    # The reference's max_len; capped at the target's max_position_embeddings.
    max_length: int = option(2048, "Tokens per sample; longer ones are truncated.")
    regenerate: bool = option(False, "The target writes the responses (self-distillation).")
    max_new_tokens: int | None = option(None, "Per regenerated turn (default: up to --max-length).")
    temperature: float = option(0.0, "Of regenerated responses; 0 = greedy.")
    # Half the bytes of fp32, the precision the trainer computes in.
    dtype: str = option("bf16", "Stored hidden states: bf16, fp16 or fp32.")
    # auto: bf16 on a GPU (half the memory and time of fp32; the reference extracts in fp16), fp32 on the CPU (exact,
    # and bf16 matmuls are seldom faster there).
    compute_dtype: str = option("auto", "The target's precision while extracting: auto (bf16 on cuda, fp32 on cpu), "
                                "bf16, fp16 or fp32.")
    device: str = option("cpu", "cpu or cuda (cuda:LOCAL_RANK under torchrun).")
    # The reference's 95/5 split.
    eval_fraction: float = option(0.05, "Held-out share (at least 1 record of >= 2).")
    # ~0.5 GB of bf16 features for a 4096-wide target at 1k tokens.
    shard_size: int = option(64, "Records per shard.")
    seed: int = option(0, "Shuffle and sampling seed.")  # record -> split and shard, and regeneration
    batch_tokens: int = option(4096, "Padded tokens per target pass (batch size x longest sample).")
    # decontaminate.py: a 13-word span in common, or a whole prompt word for word.
    exclude: str = option("benchmarks", "Drop records that share text with these prompt files (comma-separated; "
                          "`benchmarks`: the bundled MT-bench, HumanEval, GSM8K and Alpaca sets; `none`).")

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.format == "prompts" and not self.regenerate:
            raise ConfigError("--format prompts needs --regenerate: prompt files hold no responses, "
                              "so the target has to write them")
        if self.format in ("text", "ids") and self.regenerate:
            raise ConfigError(f"--regenerate applies to sharegpt and prompts data, not to --format {self.format}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.compute_dtype not in ("auto", *DTYPES):
            raise ConfigError(f"--compute-dtype must be auto or one of {', '.join(DTYPES)}, "
                              f"got {self.compute_dtype!r}")
        if self.max_length < 2:
            raise ConfigError(f"--max-length must be >= 2, got {self.max_length}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        at_least(1, shard_size=self.shard_size, batch_tokens=self.batch_tokens, max_samples=self.max_samples,
                 max_new_tokens=self.max_new_tokens)
        if not self.exclude.replace(",", "").strip():
            raise ConfigError("--exclude takes prompt files (comma-separated), `benchmarks` or `none`")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")

    def exclude_files(self) -> tuple[str, ...]:
        """The prompt files named by --exclude (bundled sets by name)."""
        if self.exclude == "none":
            return ()
        parts = [p.strip() for p in self.exclude.split(",") if p.strip()]
        return tuple(name for p in parts for name in (PROMPT_SETS if p == "benchmarks" else (p,)))

    def resolved(self) -> "DataConfig":
        """These settings with `compute_dtype` auto replaced by what it means on `device`."""
        if self.compute_dtype != "auto":
            return self
        return replace(self, compute_dtype="bf16" if self.device.startswith("cuda") else "fp32")

    def output_settings(self) -> dict[str, Any]:
        """The settings the stored bytes depend on (not the batch budget or device, but the precision the target
        ran in, resolved), compared on a rerun."""
        return {k: v for k, v in asdict(self.resolved()).items() if k not in ("batch_tokens", "device")}
