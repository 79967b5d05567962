"""`run_bench`: plain decoding, any number of drafts and prompt lookup on the same prompts, in one process.

Protocol (DESIGN §4, the paper's algorithm.md §5 adapted to one CPU process):
    * the target is loaded once; plain decoding, each draft and prompt lookup are decoders over its backend (an
      ONNX Runtime draft after the first has its own export, and so its own target session; prompt lookup needs
      no draft and shares the first draft's target session);
    * `warmup` untimed generations per method on the first prompt (the paper's 3), then every prompt runs
      every method back to back, the method order rotating from one prompt to the next so that no method
      always runs first (or right after another) — slow drift on shared cores cancels in the paired ratios;
    * prompt i of the run decodes with seed `seed + i` for every method (the paper seeds per question);
    * greedy runs are compared with plain decoding token for token, on every prompt.

`run_bench` is the CLI's form (a draft and an optional baseline draft); `run_drafts` takes a list of `BenchDraft`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from hass_deploy.artifacts import Artifacts
from hass_deploy.bench.config import BenchConfig
from hass_deploy.bench.metrics import first_mismatch
from hass_deploy.bench.report import machine_info, write_report
from hass_deploy.bench.results import (HYBRID, LOOKUP, OVERALL, PLAIN, AutoOutcome, BenchReport, Method, PromptRun,
                                       summarise)
from hass_deploy.bench.tree_search import (TreeChoice, candidate_grid, grid_envelope, measured_hybrid,
                                           predict_generation_tokens_per_s, search_tree)
from hass_deploy.config import GenerationConfig, HybridConfig, LookupConfig, TreeConfig
from hass_deploy.errors import ConfigError, HassDeployError, ModelLoadError
from hass_deploy.generation import Pipeline
from hass_deploy.models.checkpoint import load_draft
from hass_deploy.prompts import Prompt, encode, read_prompt_file
from hass_deploy.runtime.backends import BackendOptions, BackendSpec, backend_spec
from hass_deploy.runtime.decoder import GenerationResult, SpeculativeDecoder

Log = Callable[[str], None]
RECIPE_NAMES = {"hass": "HASS", "eagle2": "EAGLE-2", "random-init": "random draft", "external": "draft"}


class Decoder(Protocol):
    def generate(self, prompt_ids: list[int], config: GenerationConfig) -> GenerationResult: ...


@dataclass(frozen=True)
class LookupDecoder:
    """Prompt lookup as a bench method: the same decoder with every request's `lookup` set (the bench hands all
    methods one GenerationConfig per prompt: its tree, seed and stop tokens). Over plain decoding that is prompt
    lookup alone; over the draft's decoder, hybrid drafting with these `hybrid` settings."""

    decoder: Decoder
    lookup: LookupConfig
    hybrid: HybridConfig = HybridConfig()

    def generate(self, prompt_ids: list[int], config: GenerationConfig) -> GenerationResult:
        return self.decoder.generate(prompt_ids, replace(config, lookup=self.lookup, hybrid=self.hybrid))


@dataclass(frozen=True)
class PromptSet:
    name: str  # the file's stem, made unique
    prompts: tuple[Prompt, ...]  # benchmarked
    spare: tuple[Prompt, ...]  # beyond --max-prompts: calibration prompts for --tree auto


@dataclass(frozen=True)
class EncodedSet:
    name: str
    prompts: tuple[tuple[Prompt, list[int]], ...]


def load_prompt_sets(files: Sequence[str | Path], max_prompts: int | None) -> tuple[PromptSet, ...]:
    """Read every prompt file (EAGLE questions or {"prompt"} lines) before any model is loaded."""
    if not files:
        raise HassDeployError("give at least one --prompts FILE")
    sets, names = [], set()
    for file in files:
        prompts = read_prompt_file(file)
        name, n = Path(file).stem, 2
        while name in names:
            name, n = f"{Path(file).stem}-{n}", n + 1
        names.add(name)
        keep = len(prompts) if max_prompts is None else max_prompts
        sets.append(PromptSet(name, tuple(prompts[:keep]), tuple(prompts[keep:])))
    return tuple(sets)


def encode_prompt(prompt: Prompt, tokenizer, vocab_size: int, chat: bool | None) -> tuple[list[int], str]:
    """Token ids and how they were made. A target without a tokenizer (a random smoke-test target) gets the
    prompt's UTF-8 bytes modulo the vocabulary: fine for timing and acceptance, meaningless as text."""
    if prompt.ids is not None:
        return list(prompt.ids), "ids"
    if tokenizer is None:
        return [b % vocab_size for b in prompt.text.encode()] or [0], "bytes"
    templated = (chat is None and bool(getattr(tokenizer, "chat_template", None))) or bool(chat)
    return encode(prompt, tokenizer, chat), "chat template" if templated else "tokenizer"


def bench_decoders(sets: Sequence[EncodedSet], decoders: Mapping[str, Decoder], config: BenchConfig,
                   tree: TreeConfig, eos_token_ids: tuple[int, ...], log: Log = lambda line: None) -> tuple[PromptRun, ...]:
    """Warm up, then run every prompt with every decoder, alternating; records per prompt and method.

    Args:
        decoders: method key -> decoder, "plain" first; the others are checked against it when greedy.
    """
    keys = list(decoders)
    if keys[0] != PLAIN:
        raise ValueError("the plain decoder comes first: speculative outputs are checked against it")
    first = next((ids for s in sets for _, ids in s.prompts), None)
    if first is None:
        raise HassDeployError("no prompts to benchmark")
    for _ in range(config.warmup):
        for key in keys:
            decoders[key].generate(first, config.generation(tree, config.seed, eos_token_ids))
    runs: list[PromptRun] = []
    count = 0
    total = sum(len(s.prompts) for s in sets)
    for prompt_set in sets:
        for index, (prompt, ids) in enumerate(prompt_set.prompts):
            gen = config.generation(tree, config.seed + count, eos_token_ids)
            shift = count % len(keys)
            results = {key: decoders[key].generate(ids, gen) for key in keys[shift:] + keys[:shift]}
            reference = results[PLAIN].output_ids
            for key in keys:
                result = results[key]
                mismatch = first_mismatch(result.output_ids, reference)
                checked = config.sampling.greedy and key != PLAIN
                runs.append(PromptRun(
                    prompt_set=prompt_set.name, index=index, question_id=prompt.question_id, method=key,
                    prompt_tokens=len(ids), new_tokens=len(result.output_ids), wall_s=result.wall_s,
                    accept_lengths=tuple(result.accept_lengths), depth_attempts=tuple(result.depth_attempts),
                    depth_accepts=tuple(result.depth_accepts), stop_reason=result.stop_reason,
                    draft_rounds=result.draft_rounds,
                    matches_plain=(mismatch is None) if checked else None,
                    first_mismatch=mismatch if checked else None))
                if checked and mismatch is not None:
                    log(f"MISMATCH: {key} differs from plain decoding on {prompt_set.name}#{prompt.question_id} "
                        f"at new token {mismatch}")
            count += 1
            if count % 10 == 0 or count == total:
                log(f"bench: {count}/{total} prompts")
    return tuple(runs)


def summarise_runs(runs: Sequence[PromptRun], set_names: Sequence[str], keys: Sequence[str],
                   greedy: bool) -> dict[str, dict[str, object]]:
    """Per prompt set and overall (every prompt of every set weighing the same), per method."""
    out = {}
    for name in (*set_names, OVERALL):
        chosen = [r for r in runs if name == OVERALL or r.prompt_set == name]
        plain = [r for r in chosen if r.method == PLAIN]
        out[name] = {key: summarise([r for r in chosen if r.method == key], plain, key, greedy) for key in keys}
    return out


@dataclass(frozen=True)
class BenchDraft:
    """One draft the bench runs as a method of its own."""

    key: str  # its method key in the report: "draft" and "baseline" for `run_bench`, any other name for callers
    path: str | Path  # the draft directory
    artifacts: str | Path | None = None  # its `hass-deploy export`, for a backend that runs exports
    label: str | None = None  # what tables and plots call it; None: its recipe and directory, e.g. "HASS (hass)"

    def method(self, metadata) -> Method:
        recipe = RECIPE_NAMES.get(getattr(metadata, "recipe", None), "draft")
        return Method(self.key, self.label or f"{recipe} ({Path(self.path).name})", str(self.path))


def _calibration_prompts(sets: Sequence[PromptSet], encoded: Sequence[EncodedSet], count: int, encode_one
                         ) -> tuple[list[list[int]], list[str], bool]:
    """Prompts for --tree auto: spare ones (beyond --max-prompts) round-robin over the sets, else benchmarked."""
    spare = [(s.name, s.spare[i]) for i in range(max((len(s.spare) for s in sets), default=0))
             for s in sets if i < len(s.spare)]
    chosen = [(name, p, encode_one(p)) for name, p in spare[:count]]
    overlaps = len(chosen) < count
    if overlaps:
        bench = [(s.name, p, ids) for i in range(max(len(s.prompts) for s in encoded))
                 for s in encoded for p, ids in s.prompts[i:i + 1]]
        chosen += bench[: count - len(chosen)]
    return [ids for _, _, ids in chosen], [f"{name}#{p.question_id}" for name, p, _ in chosen], overlaps


def _check_inputs(draft, baseline_draft, spec: BackendSpec, baseline_artifacts) -> None:
    """`run_bench`'s arguments, in the CLI's words."""
    for path, what in ((draft, "draft"), (baseline_draft, "baseline draft")):
        if path is not None and not Path(path).is_dir():
            raise ModelLoadError(f"{path}: no such {what} directory")
    if baseline_artifacts is not None and (baseline_draft is None or not spec.needs_export):
        raise ConfigError("--baseline-artifacts is the baseline draft's export, for --backend onnxruntime or "
                          "tensorrt with --baseline-draft")
    if spec.needs_export and baseline_draft is not None and baseline_artifacts is None:
        raise ConfigError(f"with --backend {spec.name} the baseline draft needs its own export: "
                          "--baseline-artifacts DIR")


def _check_drafts(drafts: Sequence[BenchDraft], spec: BackendSpec) -> None:
    """`run_drafts`'s: unique keys beside the other methods', directories that exist, an export each where the
    backend runs exports (the first draft's is checked by the backend, which names --artifacts)."""
    keys = [d.key for d in drafts]
    if not drafts or len(set(keys)) != len(keys) or set(keys) & {PLAIN, LOOKUP, HYBRID}:
        raise ConfigError(f"the drafts' method keys must be unique and none of {PLAIN}, {LOOKUP}, {HYBRID}; got "
                          f"{keys or 'none'}")
    for draft in drafts:
        if not Path(draft.path).is_dir():
            raise ModelLoadError(f"{draft.path}: no such draft directory ({draft.key})")
    for draft in drafts[1:]:
        if (draft.artifacts is None) == spec.needs_export:
            raise ConfigError(f"the {draft.key} draft: with --backend {spec.name} a draft "
                              + ("needs its own export" if spec.needs_export else "runs without an export"))


def _envelope(config: BenchConfig, artifacts: Artifacts | None) -> TreeConfig:
    """The tree the KV buffers are sized for: the fixed tree, or one covering every --tree auto candidate (inside
    the export's tree budget and top-k when there is one)."""
    if not config.auto_tree:
        return config.tree
    limits = (None, None) if artifacts is None else (artifacts.max_tree_tokens, artifacts.max_top_k)
    grid = candidate_grid(config.search, *limits)
    if not grid:
        raise ConfigError("--tree auto: no candidate tree fits the export's tree budget and top-k")
    return grid_envelope(grid)


def _open_decoders(target, drafts: Sequence[BenchDraft], runtime, envelope: TreeConfig, artifacts: Artifacts | None,
                   lookup: LookupConfig | None = None, hybrid: HybridConfig | None = None):
    """The target loaded once (with the first draft); plain decoding, every draft and prompt lookup as decoders
    over it (hybrid drafting is added once its draft cost is known: `run_drafts`)."""
    # `lookup` and `hybrid` in the load config: an export's tree budget is checked against their trees too, up
    # front (without hybrid, its check is lookup's own).
    if hybrid is None and lookup is not None:
        hybrid = HybridConfig(tokens=lookup.tokens)
    first, *others = drafts
    pipe = Pipeline.load(target, first.path, runtime, GenerationConfig(tree=envelope, lookup=lookup,
                                                                       hybrid=hybrid or HybridConfig()), artifacts)
    plain = SpeculativeDecoder(pipe.decoder.target, None)
    decoders: dict[str, Decoder] = {PLAIN: plain, first.key: pipe.decoder}
    methods = [Method(PLAIN, "plain decoding", None), first.method(pipe.draft_metadata)]
    spec, options, rows = backend_spec(runtime.backend), BackendOptions.of(runtime), envelope.draft_rows
    for other in others:
        head, metadata = load_draft(other.path, pipe.target)
        if spec.needs_export:  # its own export, so its own sessions or engines
            exported = spec.artifacts(other.artifacts)
            exported.check_target(pipe.target)
            exported.check_draft(head, f"the {other.key} draft")
            exported.check_request(pipe.max_seq_len)
            decoders[other.key] = SpeculativeDecoder(*spec.open(pipe.target, head, options, exported,
                                                                pipe.max_seq_len, rows))
        else:  # share the target backend: one KV cache, the same weights
            _, backend = spec.open(pipe.target, head, options, None, pipe.max_seq_len, rows)
            decoders[other.key] = SpeculativeDecoder(pipe.decoder.target, backend)
        methods.append(other.method(metadata))
    if lookup is not None:
        decoders[LOOKUP] = LookupDecoder(plain, lookup)
        methods.append(Method(LOOKUP, "prompt lookup", None))
    return pipe, decoders, tuple(methods)


class _Encoder:
    """Prompt text -> ids, cut from the left to leave the KV cache room for max_new_tokens (P + M - 1 rows)."""

    def __init__(self, target_model, max_seq_len: int, config: BenchConfig):
        self.model, self.chat = target_model, config.chat
        self.limit = max_seq_len - config.max_new_tokens
        if self.limit < 1:
            raise ConfigError(f"--max-new-tokens {config.max_new_tokens} does not fit a KV cache of {max_seq_len} "
                              "rows; raise --max-seq-len")
        self.encodings: set[str] = set()
        self.truncated = 0

    def __call__(self, prompt: Prompt) -> list[int]:
        ids, how = encode_prompt(prompt, self.model.tokenizer, self.model.config.vocab_size, self.chat)
        self.encodings.add(how)
        if len(ids) > self.limit:
            self.truncated += 1
            ids = ids[-self.limit:]
        return ids


def run_bench(target: str | Path, draft: str | Path, prompts: Sequence[str | Path],
              config: BenchConfig = BenchConfig(), baseline_draft: str | Path | None = None,
              artifacts: str | Path | None = None, baseline_artifacts: str | Path | None = None,
              out: str | Path | None = None, log: Log = lambda line: None) -> BenchReport:
    """Benchmark a draft (and a baseline draft, and prompt lookup unless `config.lookup` is None) against plain
    decoding of the same target: `hass-deploy bench`, the methods keyed "draft" and "baseline" (`run_drafts`).

    Args:
        target, draft, baseline_draft: model directories (Hugging Face target; EAGLE/HASS drafts).
        prompts: JSONL prompt files, one prompt set each.
        artifacts, baseline_artifacts: `hass-deploy export` directories for `--backend onnxruntime` (the
            baseline draft has its own export).
        out: when given, bench.json, bench.md and bench.png are written there.
        log: progress and the tree-auto choice, one line at a time.
    """
    _check_inputs(draft, baseline_draft, backend_spec(config.runtime.backend), baseline_artifacts)
    drafts = [BenchDraft("draft", draft, artifacts)]
    if baseline_draft is not None:
        drafts.append(BenchDraft("baseline", baseline_draft, baseline_artifacts))
    return run_drafts(target, drafts, prompts, config, out, log)


def run_drafts(target: str | Path, drafts: Sequence[BenchDraft], prompts: Sequence[str | Path],
               config: BenchConfig = BenchConfig(), out: str | Path | None = None,
               log: Log = lambda line: None) -> BenchReport:
    """Benchmark every draft (and prompt lookup unless `config.lookup` is None, and hybrid drafting with the first
    draft unless `config.hybrid` is None) against plain decoding of the same target; see the module doc.

    The first draft is the one the target is loaded with: `--tree auto` searches the tree for it, hybrid drafting
    runs it, and `drafts[0].artifacts` is the export prompt lookup and plain decoding run on. Every draft's
    greedy output is checked against plain decoding's.
    """
    started = time.perf_counter()
    sets = load_prompt_sets(prompts, config.max_prompts)  # bad files fail before any model loads
    spec = backend_spec(config.runtime.backend)
    _check_drafts(drafts, spec)
    main = drafts[0]
    exported = spec.artifacts(main.artifacts)  # opened once: the tree grid's limits, then the pipeline's checks
    envelope = _envelope(config, exported)
    pipe, decoders, methods = _open_decoders(target, drafts, config.runtime, envelope, exported, config.lookup,
                                             config.hybrid)
    encode_one = _Encoder(pipe.target, pipe.max_seq_len, config)
    encoded = [EncodedSet(s.name, tuple((p, encode_one(p)) for p in s.prompts)) for s in sets]
    truncated = encode_one.truncated
    eos = pipe.target.eos_token_ids
    choice, tree = None, config.tree
    if not pipe.decoder.target.tree_rows_exact and not config.auto_tree and tree != tree.chain():
        tree = tree.chain()  # what the decoder verifies on this target, reported as such
        log(f"bench: this target's tree rows are not plain decoding's (a quantised graph): it verifies chains, "
            f"depth {tree.depth}")
    if config.auto_tree:
        lengths = [len(ids) for s in encoded for _, ids in s.prompts]
        context = min(int(statistics.median(lengths)) + config.max_new_tokens // 2,
                      pipe.decoder.target.max_len - envelope.tokens - 1)
        ids, labels, overlaps = _calibration_prompts(sets, encoded, config.search.prompts, encode_one)
        choice = search_tree(pipe.decoder.target, pipe.decoder.draft, ids, labels, config, eos, max(context, 1),
                             overlaps, log)
        tree = choice.tree
        log(f"tree auto: chose tokens={tree.tokens} depth={tree.depth} top_k={tree.top_k} (calibration tau "
            f"{choice.tau:.2f}): predicted {choice.predicted_tokens_per_s:.1f} tok/s against plain "
            f"{choice.plain_predicted_tokens_per_s:.1f} (x{choice.predicted_speedup:.2f}), steady state")
        if choice.predicted_speedup < 1:
            log(f"tree auto: no candidate tree is predicted to beat plain decoding with this draft (best "
                f"x{choice.predicted_speedup:.2f}); the benchmark still runs the best one")
        if choice.at_grid_edge:
            log(f"tree auto: the choice is the grid's largest {' and '.join(choice.at_grid_edge)}; a larger tree "
                "might be faster still (TreeSearchConfig sets the grid)")
    lookup, hybrid = config.lookup, config.hybrid
    if lookup is not None and hybrid is not None:
        if choice is not None:  # the draft's measured costs, in steps verifying the hybrid tree
            hybrid = measured_hybrid(hybrid, tree, choice.tau, choice.curve, choice.overhead)
        decoders[HYBRID] = LookupDecoder(pipe.decoder, lookup, hybrid)
        methods += (Method(HYBRID, "hybrid: the draft and prompt lookup in one tree", None),)
        log(f"bench: hybrid tokens={hybrid.tokens}, draft cost {hybrid.draft_cost:g} and {hybrid.row_cost:g} a "
            "context row, in verify steps" + (" (measured)" if choice is not None else ""))
    log(f"bench: {sum(len(s.prompts) for s in encoded)} prompts x {len(decoders)} methods, "
        f"tree tokens={tree.tokens} depth={tree.depth} top_k={tree.top_k}"
        + ("" if lookup is None else f", lookup tokens={lookup.tokens} depth={lookup.depth} "
                                     f"n-grams {lookup.min_ngram}..{lookup.max_ngram}")
        + f", {config.warmup} warm-up runs each")
    runs = bench_decoders(encoded, decoders, config, tree, eos, log)
    summaries = summarise_runs(runs, [s.name for s in encoded], list(decoders), config.sampling.greedy)
    outcome = None if choice is None else _auto_outcome(choice, runs, summaries, main.key)
    if outcome is not None:
        # Two separate errors: the calibration prompts' tau against the benchmark's (acceptance varies by prompt),
        # and the cost model's at the benchmark's own tau (the runtime's efficiency, measured / predicted).
        log(f"tree auto: predicted {outcome.predicted_tokens_per_s:.1f} tok/s with the calibration tau, "
            f"{outcome.predicted_with_bench_tau:.1f} with the benchmark's; measured "
            f"{outcome.measured_tokens_per_s:.1f} (mean over prompts): runtime efficiency "
            f"{outcome.efficiency:.2f}; plain predicted {outcome.predicted_plain_tokens_per_s:.1f}, measured "
            f"{outcome.measured_plain_tokens_per_s:.1f}")
    report = BenchReport(
        config=config, sources=_sources(target, drafts, prompts), methods=methods, tree=tree,
        hybrid=hybrid if HYBRID in decoders else None, tree_choice=choice, auto_outcome=outcome,
        prompt_sets=tuple(s.name for s in encoded), prompt_encoding=", ".join(sorted(encode_one.encodings)),
        truncated_prompts=truncated, runs=runs, summaries=summaries,
        machine=machine_info(config.runtime.backend), seconds=time.perf_counter() - started)
    log(report.lossless_line())
    if out is not None:
        write_report(report, out)
    return report


def _sources(target, drafts: Sequence[BenchDraft], prompts) -> dict:
    """What was benchmarked, for bench.json: every draft by its key, and (as before there were more than two) the
    first draft and the one keyed "baseline" under their own names."""
    paths = {d.key: {"path": str(d.path), "artifacts": None if d.artifacts is None else str(d.artifacts)}
             for d in drafts}
    baseline = paths.get("baseline", {"path": None, "artifacts": None})
    return {"target": str(target), "draft": paths[drafts[0].key]["path"], "baseline_draft": baseline["path"],
            "prompts": [str(p) for p in prompts], "artifacts": paths[drafts[0].key]["artifacts"],
            "baseline_artifacts": baseline["artifacts"], "drafts": paths}


def _auto_outcome(choice: TreeChoice, runs: Sequence[PromptRun], summaries, key: str) -> AutoOutcome:
    """Predictions at the benchmark's own mean prompt and output lengths, next to the measured speeds of the draft
    the tree was chosen for (`key`)."""
    draft_runs = [r for r in runs if r.method == key]
    plain_runs = [r for r in runs if r.method == PLAIN]
    prompt_tokens = statistics.fmean(r.prompt_tokens for r in draft_runs)
    new_tokens = statistics.fmean(r.new_tokens for r in draft_runs)
    overall = summaries[OVERALL]
    bench_tau = overall[key].tau or 1.0

    def predict(tree, tau):
        return predict_generation_tokens_per_s(tree, tau, choice.curve, choice.overhead, prompt_tokens, new_tokens)

    return AutoOutcome(
        predicted_tokens_per_s=predict(choice.tree, choice.tau),
        predicted_with_bench_tau=predict(choice.tree, bench_tau),
        measured_tokens_per_s=overall[key].tokens_per_s.mean,
        predicted_plain_tokens_per_s=predict_generation_tokens_per_s(
            None, 1.0, choice.curve, choice.overhead, statistics.fmean(r.prompt_tokens for r in plain_runs),
            statistics.fmean(r.new_tokens for r in plain_runs)),
        measured_plain_tokens_per_s=overall[PLAIN].tokens_per_s.mean)
