"""User-facing configuration: frozen dataclasses, each default defined once (the CLI reads them from here)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hass_deploy.errors import ConfigError


@dataclass(frozen=True)
class TreeConfig:
    """The EAGLE-2 dynamic tree's budget (DESIGN D4).

    Defaults are sized for 2 CPU cores, not for the GPU paper's 60-node trees: `cpu-notes.md` §2 measures that
    verifying 16+ tokens costs 2-2.5x a single step there, so small trees of about 8 nodes win.
    """

    tokens: int = 8  # nodes verified per round, the root included (EAGLE's total_token)
    depth: int = 4  # draft levels: the most draft tokens one round can accept (EAGLE's depth + 1)
    top_k: int = 4  # children expanded per node and beam width per level

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ConfigError(f"--tree-tokens must be >= 1, got {self.tokens}")
        if self.depth < 1:
            raise ConfigError(f"--tree-depth must be >= 1, got {self.depth}")
        if self.top_k < 1:
            raise ConfigError(f"--tree-top-k must be >= 1, got {self.top_k}")

    @property
    def draft_rows(self) -> int:
        """Draft KV rows a round needs beyond the committed context: one block of top_k per level after the first."""
        return (self.depth - 1) * self.top_k


@dataclass(frozen=True)
class SamplingConfig:
    """How the target's next token is chosen.

    Attributes:
        temperature: logits are divided by it; 0 means greedy (argmax). Greedy is the default because greedy
            output is what "lossless" is checked on, token for token.
        top_p: nucleus mass kept; 1.0 disables.
        top_k: keep the k most likely tokens; 0 disables.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax rather than a sample."""
        return self.temperature == 0


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128  # enough to see several rounds of drafting on every prompt
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    seed: int = 0  # sampling is reproducible by default
    eos_token_ids: tuple[int, ...] = ()  # filled from the target's generation_config.json by the caller

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class RuntimeConfig:
    backend: str = "torch"
    dtype: str = "fp32"  # the precision in which greedy output is checked token for token against transformers
    device: str = "cpu"
    max_seq_len: int | None = None  # KV rows; None = min(the target's max_position_embeddings, 4096)
