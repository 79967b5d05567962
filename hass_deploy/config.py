"""User-facing configuration: frozen dataclasses, each default and its help defined once.

The CLI turns fields declared with `option(default, help)` into its options (`hass_deploy/options.py`): the
default and the help text live here and nowhere else. Nothing here imports torch, so `hass-deploy --help` is fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hass_deploy.errors import ConfigError

# Rows of one piece of a long prompt's prefill, on every backend (`TargetBackend.prefill_chunk`): an export's
# default, and the PyTorch backend's.
PREFILL_CHUNK = 128

DTYPES = ("fp32", "bf16", "fp16")  # the precisions a user names; torch's types for them: `models.loading.parse_dtype`


def option(default: Any, help: str, flag: str | None = None) -> Any:
    """A dataclass field that is also a command-line option: its default (`...`: required), its help, and its flag
    when that is not the field's name (`options.py` derives `--tree-tokens` from group `tree` and field `tokens`)."""
    metadata = {"help": help, "flag": flag}
    return field(metadata=metadata) if default is ... else field(default=default, metadata=metadata)


def at_least(low: float, **values: float | None) -> None:
    """Refuse a value below `low` (or NaN), in one line that names its option: each keyword is the option's flag
    written as a name (`tree_tokens` for --tree-tokens); None means not set, and passes."""
    for name, value in values.items():
        if value is not None and not value >= low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


@dataclass(frozen=True)
class TreeConfig:
    """The EAGLE-2 dynamic tree's budget (DESIGN D4).

    Defaults are sized for 2 CPU cores, not for the GPU paper's 60-node trees: `cpu-notes.md` §2 measures that
    verifying 16+ tokens costs 2-2.5x a single step there, so small trees of about 8 nodes win.
    """

    tokens: int = option(8, "Tree nodes verified per round, root included.")  # EAGLE's total_token
    depth: int = option(4, "Draft levels per round.")  # the most draft tokens a round can accept: EAGLE's depth + 1
    top_k: int = option(4, "Children per node and beam width.")

    def __post_init__(self) -> None:
        at_least(1, tree_tokens=self.tokens, tree_depth=self.depth, tree_top_k=self.top_k)

    @property
    def draft_rows(self) -> int:
        """Draft KV rows a round needs beyond the committed context: one block of top_k per level after the first."""
        return (self.depth - 1) * self.top_k

    def chain(self) -> "TreeConfig":
        """This tree's depth as a chain (top-k 1, one node per level): what a target whose tree rows are not plain
        decoding's verifies (`TargetBackend.tree_rows_exact`)."""
        depth = max(1, min(self.depth, self.tokens - 1))
        return TreeConfig(tokens=min(self.tokens, depth + 1), depth=depth, top_k=1)


@dataclass(frozen=True)
class LookupConfig:
    """Prompt-lookup drafting (`runtime/lookup.py`): a training-free draft tree grown best-first from n-gram counts
    of the prompt and the output so far.

    Sized for a few CPU cores like TreeConfig: verifying T rows costs more than one row there (`cpu-notes.md` §2),
    so the tree stays at the scale of llama.cpp's prompt lookup (8 drafted tokens or fewer). Chosen by replaying
    the quickstart target's greedy outputs (docs/RESULTS.md, "Prompt lookup and hybrid drafting"): tau rose with the
    depth up to the budget (a confident match is worth a long chain), n-grams up to 4 were within 0.06 tau of 3 and
    5 (4 is llama.cpp's), and 2 branches per node gave the same tau as 4 within 8 nodes (4 leaves room for larger
    budgets).
    """

    tokens: int = option(8, "Prompt lookup: tree nodes verified per round, root included.")  # TreeConfig's too
    # Deeper than the default budget, so that the budget is what limits chains.
    depth: int = option(10, "Prompt lookup: deepest path of its tree.")
    max_ngram: int = option(4, "Prompt lookup: longest n-gram matched (first).")
    # Down to the root token alone, so something is proposed whenever it occurred before.
    min_ngram: int = option(1, "Prompt lookup: shortest n-gram matched (last).")
    branches: int = option(4, "Prompt lookup: most continuations expanded per node.")

    def __post_init__(self) -> None:
        at_least(1, lookup_tokens=self.tokens, lookup_depth=self.depth, lookup_branches=self.branches)
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ConfigError(f"lookup n-gram sizes need 1 <= --lookup-min-ngram <= --lookup-max-ngram, got "
                              f"{self.min_ngram} and {self.max_ngram}")


@dataclass(frozen=True)
class HybridConfig:
    """Hybrid drafting (`runtime/hybrid.py`): the draft head's and prompt lookup's candidates reranked into one tree,
    used whenever a request has both a draft head and `lookup` settings.

    `draft_cost` is what growing the draft head's tree costs, in verify steps of this tree, and `row_cost` what
    each row of its context pass costs: the draft runs in a round only when the tokens it is expected to add pay
    for that. `--tree auto` measures both (bench); the defaults are what it measured for the quickstart's draft on
    2 CPU cores (docs/RESULTS.md, History, 2026-11-29: 0.71 for its 6-node chain, in the loop, and 0.0101 a row,
    in verify steps of 8 nodes).
    """

    tokens: int = option(8, "Hybrid (draft + lookup): tree nodes verified per round, root included.")
    draft_cost: float = option(0.7, "Hybrid: the draft head's tree growth in verify steps; it runs only when its "
                               "expected extra tokens pay for that (bench --tree auto measures it).")
    row_cost: float = option(0.01, "Hybrid: a row of the draft's context pass (catching up on rounds it skipped) in "
                             "verify steps (bench --tree auto measures it).")
    # Before a request's own rounds say otherwise: the bar the draft's extra tokens per step of its cost must clear.
    tokens_per_step: float = option(3.0, "Hybrid: the tokens a request is expected to make per verify step; the "
                                    "draft runs when its extra tokens per step of its cost beat this, blended with "
                                    "the request's own rate.")

    def __post_init__(self) -> None:
        at_least(1, hybrid_tokens=self.tokens)
        at_least(0, hybrid_draft_cost=self.draft_cost, hybrid_row_cost=self.row_cost)
        if not self.tokens_per_step > 0:
            raise ConfigError(f"--hybrid-tokens-per-step must be > 0, got {self.tokens_per_step}")


@dataclass(frozen=True)
class SamplingConfig:
    """How the target's next token is chosen.

    Attributes:
        temperature: logits are divided by it; 0 means greedy (argmax). Greedy is the default because greedy
            output is what "lossless" is checked on, token for token.
        top_p: nucleus mass kept; 1.0 disables.
        top_k: keep the k most likely tokens; 0 disables.
    """

    temperature: float = option(0.0, "0 = greedy.")
    top_p: float = option(1.0, "Nucleus mass kept (1 = off).")
    top_k: int = option(0, "Keep the k most likely tokens (0 = off).")

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
    max_new_tokens: int = option(128, "Tokens generated per prompt at most.")  # several rounds of drafting
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    lookup: LookupConfig | None = None  # prompt lookup's settings: alone without a draft head, else hybrid
    hybrid: HybridConfig = field(default_factory=HybridConfig)  # when both a draft head and lookup propose
    seed: int = option(0, "Sampling seed.")  # sampling is reproducible by default
    eos_token_ids: tuple[int, ...] = ()  # filled from the target's generation_config.json by the caller

    def __post_init__(self) -> None:
        at_least(1, max_new_tokens=self.max_new_tokens)


AUTO_BACKEND = "auto"  # --backend's default: ONNX Runtime when there is an export to run, torch otherwise


def choose_backend(name: str, artifacts: object | None) -> str:
    """Resolve `auto` to a backend name (`artifacts`: the export, as a path or opened, or None); any other name is
    returned as given (checked when opened: `runtime.backends.backend_spec`)."""
    if name != AUTO_BACKEND:
        return name
    return "onnxruntime" if artifacts is not None else "torch"


@dataclass(frozen=True)
class RuntimeConfig:
    backend: str = "torch"  # the CLI's --backend also takes auto: onnxruntime with --artifacts, else torch
    # The precision in which greedy output is checked token for token against transformers.
    dtype: str = option("fp32", "fp32, bf16 or fp16.")
    device: str = option("cpu", "cpu, cuda or cuda:N.")
    max_seq_len: int | None = option(None, "KV cache rows: prompt + completion (default: the export's, or "
                                     "min(max_position_embeddings, 4096)).")
    # backends/graphs.py
    cuda_graphs: bool = option(True, "On a GPU, run decode and tree steps as captured CUDA graphs (torch and "
                               "tensorrt backends).")
    ort_provider: str = option("auto", "ONNX Runtime on a GPU: auto (its CUDA provider) or tensorrt (its TensorRT "
                               "provider; engines cached in the artifacts).")

    def __post_init__(self) -> None:
        at_least(1, max_seq_len=self.max_seq_len)
        if self.ort_provider not in ("auto", "tensorrt"):
            raise ConfigError(f"--ort-provider must be auto or tensorrt, got {self.ort_provider!r}")
        if self.ort_provider == "tensorrt" and not self.device.startswith("cuda"):
            raise ConfigError("--ort-provider tensorrt runs on an NVIDIA GPU: add --device cuda")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        kind, _, index = self.device.partition(":")
        if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class Phase:
    """A stretch of training with its own optimizer and schedule (the reference restarts both per phase)."""

    epochs: int
    lr: float
    topk_weight: float  # weight of the Top-K distillation loss in this phase


# The HASS reference schedule (algorithm.md §3.7): 40(+1) epochs of alignment only, then 10(+1) with Top-K
# distillation, at GPU-cluster learning rates. Meant for ShareGPT-scale data, not for a CPU.
REFERENCE_SCHEDULE = (Phase(epochs=41, lr=3e-5, topk_weight=0.0), Phase(epochs=11, lr=1e-5, topk_weight=1.0))


INIT_LAYERS = ("random", "last")


@dataclass(frozen=True)
class TrainConfig:
    # eagle2: one step and no Top-K loss, everything else shared.
    recipe: str = option("hass", "hass, or eagle2 (the baseline: one step, no Top-K loss).")
    align_steps: int = option(3, "HASS harmonized forward passes per batch.")  # the paper's 3 (EAGLE-2 uses 1)
    topk: int = option(10, "K of the Top-K distillation loss.")  # the paper's value
    # CPU-scale default: a few epochs at a learning rate small datasets need; REFERENCE_SCHEDULE for GPU scale
    phases: tuple[Phase, ...] = (Phase(epochs=4, lr=1e-3, topk_weight=1.0),)
    feature_weight: float = 1.0  # SmoothL1 on the next feature (reference v_w)
    ce_weight: float = 0.1  # soft cross-entropy against the target distribution (reference p_w)
    step_weights: tuple[float, ...] = ()  # per-step loss weights; () = 1.0 for every step, the reference's sum
    batch_size: int = option(8, "Global batch in samples (split across torchrun ranks).")
    max_length: int = option(512, "Samples are truncated to this many tokens.")
    loss_chunk: int = 1024  # positions projected onto the vocabulary at once: losses hold O(chunk * V), not O(B * N * V)
    warmup_fraction: float = 0.05  # linear warm-up, then linear decay to 0 (reference: 1%, over far more steps)
    weight_decay: float = 0.01  # AdamW's torch default, as in the reference
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 0.5  # element-wise value clipping, as the reference
    feature_noise: float = 0.1  # uniform noise amplitude on input features (train split only): reference at N=512
    precision: str = option("bf16", "bf16 (autocast, on CPU and GPU) or fp32.")
    eval_depth: int = 5  # draft depths measured on the held-out split each epoch (the reference's getkacc: 5)
    seed: int = option(0, "Initialisation and shuffle seed.")
    # FR-Spec / EAGLE-3's reduced vocabulary: the draft's V x H projection is its dominant cost.
    draft_vocab: int | None = option(None, "Score only the N most frequent target tokens of the training data in the "
                                     "draft's head (stored with the draft as EAGLE-3's d2t/t2d). Default: all.")
    init_layer: str = option("random", "The draft layer's start: random, or last (the target's last decoder layer).")

    def __post_init__(self) -> None:
        if self.recipe not in ("hass", "eagle2"):
            raise ConfigError(f"--recipe must be hass or eagle2, got {self.recipe!r}")
        at_least(1, align_steps=self.align_steps, topk=self.topk)
        if not self.phases or any(p.epochs < 1 or not p.lr > 0 or p.topk_weight < 0 for p in self.phases):
            raise ConfigError("every training phase needs epochs >= 1, lr > 0 and a Top-K weight >= 0")
        if self.batch_size < 1 or self.max_length < 2:
            raise ConfigError("--batch-size must be >= 1 and --max-length >= 2")
        if self.step_weights and len(self.step_weights) != self.steps:
            raise ConfigError(f"{len(self.step_weights)} step weights given for {self.steps} alignment steps")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        at_least(max(self.topk, 2), draft_vocab=self.draft_vocab)  # the Top-K loss needs K of them
        if self.init_layer not in INIT_LAYERS:
            raise ConfigError(f"--init-layer must be one of {', '.join(INIT_LAYERS)}, got {self.init_layer!r}")

    @property
    def steps(self) -> int:
        """Forward passes per batch: the recipe decides (EAGLE-2 trains the plain one-step draft)."""
        return 1 if self.recipe == "eagle2" else self.align_steps

    def topk_weight(self, phase: Phase) -> float:
        return 0.0 if self.recipe == "eagle2" else phase.topk_weight

    def step_weight(self, step: int) -> float:
        return self.step_weights[step] if self.step_weights else 1.0


@dataclass(frozen=True)
class Widening:
    """The larger shape and how its new weights are drawn. No size may be below the original's."""

    hidden_size: int = option(..., "New hidden size (>= the target's; head_dim and GQA group are kept).")
    intermediate_size: int = option(..., "New MLP width (>= the target's).")
    num_layers: int = option(..., "New number of layers (>= the target's; new ones are appended).")
    # Each tensor draws from its own generator, seeded by (seed, its name).
    seed: int = option(0, "Seed of the new (random) weights.")
    init_std: float = 0.02  # small: new units' activations stay O(1), so nothing overflows (0 * inf would be NaN)
    # How the widened target is stored. fp32 keeps every logit equal to the source's (to ~2e-7); bf16 halves what a
    # 7 B-class model writes and loads (a GPU benchmark runs it in bf16 anyway), and rounds the weights.
    dtype: str = option("fp32", "Storage of the widened target: fp32 (logits equal the source's) or bf16/fp16 "
                        "(half the bytes; weights rounded).")

    def __post_init__(self) -> None:
        for flag, value in (("--hidden-size", self.hidden_size), ("--intermediate-size", self.intermediate_size),
                            ("--num-layers", self.num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
        if not (math.isfinite(self.init_std) and self.init_std > 0):
            raise ConfigError(f"init_std must be a positive number, got {self.init_std}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
