"""What a benchmark run measures and how `--tree auto` searches: frozen dataclasses, each default defined once
(the CLI reads them from here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hass_deploy.config import (GenerationConfig, HybridConfig, LookupConfig, RuntimeConfig, SamplingConfig, TreeConfig,
                                at_least, option)
from hass_deploy.errors import ConfigError


@dataclass(frozen=True)
class TreeSearchConfig:
    """The candidate grid and calibration budget of `--tree auto` (DESIGN D4; method in `tree_search.py`).

    The grid covers the regime `cpu-notes.md` §2 says pays on a few CPU cores (4-16 verified tokens, shallow or
    narrow drafting) plus chains; GPU-sized trees (60 tokens) are slower than plain decoding there.
    """

    tokens: tuple[int, ...] = (3, 4, 6, 8, 12, 16)  # verified nodes per round, root included
    depths: tuple[int, ...] = (2, 3, 4, 5, 6)  # draft levels
    top_ks: tuple[int, ...] = (2, 4)  # beam widths of the trees (chains are top-k 1, below)
    chain_depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6)  # chains (top-k 1, tokens = depth + 1) also tried
    prompts: int = 4  # calibration prompts; the one-prompt screen uses the first of them
    max_new_tokens: int = 48  # per calibration generation: ~20-50 rounds, enough for a stable tau per prompt
    finalists: int = 6  # best screened candidates re-measured on every calibration prompt
    repeats: int = 15  # interleaved timing repeats per step size of the cost curve (medians are reported)

    def __post_init__(self) -> None:
        sizes = (*self.tokens, *self.depths, *self.top_ks, *self.chain_depths)
        if not (self.tokens and self.depths) or any(not isinstance(v, int) or v < 1 for v in sizes):
            raise ConfigError("the --tree auto grid needs positive integers for tokens, depths and top-k")
        if self.prompts < 1 or self.max_new_tokens < 2 or self.finalists < 1 or self.repeats < 1:
            raise ConfigError("--tree auto needs >= 1 calibration prompt, >= 2 new tokens, >= 1 finalist and repeat")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: plain vs speculative decoding (vs a baseline draft, vs prompt lookup) on the same prompts,
    same process.

    Attributes:
        tree: the draft tree used by the draft and the baseline (equal decoding settings, as the paper compares);
            None chooses it from measured costs and acceptance (`--tree auto`).
        lookup: prompt lookup's tree, run as one more method beside the drafts (the training-free one a trained
            draft has to beat); None leaves it out.
        hybrid: the draft and prompt lookup merged into one tree per round (`runtime/hybrid.py`), one more method
            when `lookup` is set; None leaves it out. With `--tree auto` its draft cost is the measured one.
    """

    max_new_tokens: int = option(GenerationConfig().max_new_tokens, "Tokens generated per prompt at most.")
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # greedy: the lossless check applies
    tree: TreeConfig | None = field(default_factory=TreeConfig)
    lookup: LookupConfig | None = field(default_factory=LookupConfig)
    hybrid: HybridConfig | None = field(default_factory=HybridConfig)
    # The paper uses all 80 MT-bench questions.
    max_prompts: int | None = option(None, "First N prompts of each file (default: all).")
    warmup: int = option(3, "Untimed runs per method on the first prompt.")  # the paper's 3 warm-up runs
    # The same for every method (the paper seeds per question).
    seed: int = option(0, "Prompt i samples with seed + i.")
    chat: bool | None = option(None, "Apply the chat template (default: if the tokenizer has one).")
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    search: TreeSearchConfig = field(default_factory=TreeSearchConfig)

    def __post_init__(self) -> None:
        at_least(1, max_new_tokens=self.max_new_tokens, max_prompts=self.max_prompts)
        at_least(0, warmup=self.warmup)

    @property
    def auto_tree(self) -> bool:
        return self.tree is None

    def generation(self, tree: TreeConfig, seed: int, eos_token_ids: tuple[int, ...]) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=self.max_new_tokens, sampling=self.sampling, tree=tree, seed=seed,
                                eos_token_ids=eos_token_ids)
