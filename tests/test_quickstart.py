"""The quickstart's orchestration: stages run once, reruns reuse them, interrupted ones resume, changed or damaged
ones are redone with everything after them, and a lossless failure fails the run.

The heavy stages are replaced by fakes that record their calls (each is tested on its own elsewhere); CI runs the
real `tiny` preset end to end (`.ci/run`).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from hass_deploy import quickstart
from hass_deploy.bench.config import BenchConfig
from hass_deploy.bench.metrics import Spread
from hass_deploy.bench.results import HYBRID, LOOKUP, OVERALL, PLAIN, Method, MethodSummary
from hass_deploy.config import TreeConfig
from hass_deploy.errors import HassDeployError


def test_line_chunks_cut_at_line_ends_and_keep_everything():
    text = "".join(f"line {i}\n" for i in range(50))
    chunks = quickstart._line_chunks(text, 40)
    assert "".join(chunks) == text
    assert all(c.endswith("\n") for c in chunks)
    assert all(len(c) >= 40 for c in chunks[:-1])


def _summary(method: str, tau, tps: float, lossless: bool = True) -> MethodSummary:
    return MethodSummary(method=method, prompts=2, new_tokens=16, wall_s=1.0, tokens_per_s=Spread(tps, tps, tps, tps),
                         tau=tau, rounds=4, depth_acceptance=(0.5,), depth_attempts=(4,),
                         speedup=None if tau is None else tps / 10, speedup_median=None,
                         mismatched=None if tau is None else (() if lossless else ("p#0",)))


class Fakes:
    """Stand-ins for the stages' library calls: they write what the real ones write (enough for the checks
    between stages) and count their calls."""

    def __init__(self, tmp_path: Path, monkeypatch, real_onnx: bool = False):
        self.calls: list[str] = []
        self.devices: dict[str, str] = {}  # stage -> the device it was asked to run on
        self.lossless = True
        self.interrupt: str | None = None
        self.nondeterministic = False
        source = tmp_path / "stdlib"
        source.mkdir()
        for i in range(6):
            (source / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(200)))
        self.target = tmp_path / "target"
        self.target.mkdir(exist_ok=True)  # a real model's directory already, with `real_onnx`
        (self.target / "hass_deploy_target.json").write_text(json.dumps({
            "weights_sha256": "abc", "validation_loss": 3.0, "recipe": {},
            "draft_files": [str(source / f"m{i}.py") for i in range(4)],
            "eval_files": [str(source / f"m{i}.py") for i in range(4, 6)]}))
        import hass_deploy.bench.runner as runner
        import hass_deploy.demo as demo
        import hass_deploy.export.onnx as onnx_export
        import hass_deploy.export.parity as parity
        import hass_deploy.training.extract as extract
        import hass_deploy.training.trainer as trainer

        monkeypatch.setattr(demo, "cached_target", self.cached_target)
        monkeypatch.setattr(extract, "generate_data", self.generate_data)
        monkeypatch.setattr(trainer, "train", self.train)
        self.real_onnx = real_onnx
        if not real_onnx:  # else the real exports, validations and bench run on the tiny target's real drafts
            monkeypatch.setattr(onnx_export, "export_artifacts", self.export)
            monkeypatch.setattr(parity, "validate_artifacts", self.validate)
            monkeypatch.setattr(runner, "run_drafts", self.bench)
            monkeypatch.setattr(quickstart, "_artifacts_intact", lambda out: (out / "graph").is_file())

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.interrupt:
            raise KeyboardInterrupt

    def cached_target(self, preset, progress=True, device="cpu"):
        self.devices["target"] = device
        return self.target

    def generate_data(self, target, dataset, out, config, progress=False):
        self.devices["data"] = config.device
        self._call("data")
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text("{}")
        return SimpleNamespace(totals={"tokens": 100})

    def train(self, target, data_dir, out, config, resume=False, progress=True, device="cpu"):
        self.devices[f"train {config.recipe}"] = device
        self._call(f"train {config.recipe}")
        if self.real_onnx:
            from hass_deploy.models.checkpoint import FORMAT_VERSION, DraftMetadata, init_draft, save_draft, target_identity
            from hass_deploy.models.loading import load_target

            model = load_target(target)
            save_draft(init_draft(model, seed=len(self.calls)), out, DraftMetadata(FORMAT_VERSION, config.recipe,
                                                                                    target_identity(model)))
            return {"eval_expected_tau": 1.0, "eval_acceptance": [0.0]}
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"recipe": config.recipe}))
        # The same weights each time unless a test says training is not reproducible.
        (out / "model.safetensors").write_text(f"{config.recipe} {self.calls.count(f'train {config.recipe}')}"
                                               if self.nondeterministic else config.recipe)
        return {"eval_expected_tau": 2.0, "eval_acceptance": [0.5]}

    def export(self, target, draft, out, config, force=False, log=None, target_from=None):
        self._call(f"export {out.name}")
        # The target once, target-only; every draft's export beside it, linking its target graphs.
        assert (draft is None) == (out.name == "target") and (target_from is None) == (draft is None)
        assert target_from is None or (target_from.name == "target" and (target_from / "graph").is_file())
        out.mkdir(parents=True, exist_ok=True)
        (out / "graph").write_text("g")

    def validate(self, artifacts, target, draft, max_new_tokens):
        self._call(f"validate {artifacts.name}")
        assert max_new_tokens == quickstart.QuickstartPreset().validation_tokens
        return SimpleNamespace(passed=True, checks=[1, 2], render=lambda: "ok")

    def bench(self, target, drafts, prompts, config, out=None, log=None):
        self._call("bench")
        self.benched = drafts
        assert config.runtime.backend == "onnxruntime" and config.sampling.greedy
        assert config.lookup is not None and config.hybrid is not None  # benchmarked beside the drafts
        assert [(d.key, Path(d.artifacts).name) for d in drafts[:2]] == [("draft", "hass"), ("baseline", "eagle2")]
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench.json").write_text("{}")
        summaries = {OVERALL: {"plain": _summary("plain", None, 10.0), "draft": _summary("draft", 2.5, 15.0),
                               "baseline": _summary("baseline", 2.2, 13.0, self.lossless),
                               **{d.key: _summary(d.key, 3.5, 20.0) for d in drafts[2:]},
                               "lookup": _summary("lookup", 1.4, 11.0), "hybrid": _summary("hybrid", 3.0, 18.0)}}
        methods = (Method(PLAIN, "plain decoding", None), *(Method(d.key, d.label, str(d.path)) for d in drafts),
                   Method(LOOKUP, "prompt lookup", None), Method(HYBRID, "hybrid", None))
        return SimpleNamespace(summaries=summaries, tree=TreeConfig(), tree_choice=None, config=BenchConfig(),
                               machine={}, lossless=self.lossless, methods=methods,
                               lossless_line=lambda: "lossless check: PASSED" if self.lossless else "LOSSLESS CHECK FAILED")


STAGES = ["data", "train hass", "train eagle2", "export target", "export hass", "export eagle2", "validate hass",
          "validate eagle2", "bench"]


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    return Fakes(tmp_path, monkeypatch)


def _run(workdir: Path) -> dict:
    return quickstart.run_quickstart(workdir, "tiny", progress=False, log=lambda line: None)


def test_runs_every_stage_once_then_reuses_them(fakes, tmp_path):
    summary = _run(tmp_path / "work")
    assert fakes.calls == STAGES
    assert summary["bench"]["tau"] == {"draft": 2.5, "baseline": 2.2, "lookup": 1.4, "hybrid": 3.0}
    assert summary["bench"]["tokens_per_s"] == {"plain": 10.0, "draft": 15.0, "baseline": 13.0, "lookup": 11.0,
                                                "hybrid": 18.0}
    assert summary["bench"]["lossless"] is True
    assert json.loads((tmp_path / "work" / "summary.json").read_text())["bench"]["speedup"]["draft"] == 1.5
    assert "HASS draft | 2.50 | 15.0 | 1.50x" in quickstart.render_summary(summary)
    assert "prompt lookup (no draft) | 1.40 | 11.0 | 1.10x" in quickstart.render_summary(summary)
    assert "hybrid: HASS + prompt lookup | 3.00 | 18.0 | 1.80x" in quickstart.render_summary(summary)
    serve = quickstart.render_summary(summary).splitlines()[-1]
    assert serve.startswith("serve it: hass-deploy serve --target ") and str(tmp_path / "work" / "onnx" / "hass") in serve
    del summary["bench"]["tokens_per_s"]["lookup"]  # a summary from before prompt lookup was benchmarked
    del summary["bench"]["tokens_per_s"]["hybrid"]
    assert "prompt lookup" not in quickstart.render_summary(summary)
    records = [json.loads(line) for line in (tmp_path / "work" / "corpus" / "draft_text.jsonl").read_text().splitlines()]
    prompts = (tmp_path / "work" / "corpus" / "heldout_prompts.jsonl").read_text()
    assert records and all("def f0_" not in json.loads(p)["prompt"] for p in prompts.splitlines() if p)  # disjoint
    fakes.calls.clear()
    _run(tmp_path / "work")
    assert fakes.calls == []


def test_an_interrupted_stage_resumes_and_finished_ones_are_kept(fakes, tmp_path):
    fakes.interrupt = "export hass"
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "work")
    fakes.interrupt, fakes.calls = None, []
    _run(tmp_path / "work")
    assert fakes.calls == STAGES[4:]


def test_a_damaged_stage_is_redone_and_what_depends_on_its_new_output(fakes, tmp_path):
    _run(tmp_path / "work")
    fakes.calls.clear()
    (tmp_path / "work" / "drafts" / "eagle2" / "config.json").unlink()
    _run(tmp_path / "work")
    assert fakes.calls == ["train eagle2"]  # the same weights again: its export, validation and bench still hold
    fakes.nondeterministic, fakes.calls = True, []
    (tmp_path / "work" / "drafts" / "eagle2" / "config.json").unlink()
    _run(tmp_path / "work")
    assert fakes.calls == ["train eagle2", "export eagle2", "validate eagle2", "bench"]


def test_changed_inputs_redo_exactly_the_stages_that_depend_on_them(fakes, tmp_path):
    _run(tmp_path / "work")
    fakes.calls.clear()
    (tmp_path / "work" / "onnx" / "hass" / "graph").unlink()  # a damaged export: its validation is redone too
    _run(tmp_path / "work")
    assert fakes.calls == ["export hass", "validate hass"]


def test_extra_prompt_files_are_checked_before_any_stage(fakes, tmp_path):
    with pytest.raises(HassDeployError, match="no such prompt file"):
        quickstart.run_quickstart(tmp_path / "work", "tiny", (tmp_path / "missing.jsonl",), progress=False,
                                  log=lambda line: None)
    assert fakes.calls == []


def test_a_corrupted_state_file_is_not_trusted(fakes, tmp_path):
    _run(tmp_path / "work")
    (tmp_path / "work" / quickstart.STATE_FILE).write_text("{not json")
    fakes.calls.clear()
    _run(tmp_path / "work")
    assert fakes.calls == STAGES


def test_a_lossless_failure_fails_the_run_loudly(fakes, tmp_path):
    fakes.lossless = False
    with pytest.raises(HassDeployError, match="LOSSLESS CHECK FAILED"):
        _run(tmp_path / "work")
    assert not (tmp_path / "work" / "summary.json").exists()


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(HassDeployError, match="unknown preset"):
        quickstart.run_quickstart(tmp_path, "huge")


def test_device_reaches_the_target_data_and_training_stages(fakes, tmp_path):
    quickstart.run_quickstart(tmp_path / "work", "tiny", progress=False, log=lambda line: None, device="cuda:0")
    assert fakes.devices == {"target": "cuda:0", "data": "cuda:0", "train hass": "cuda:0", "train eagle2": "cuda:0"}
    assert fakes.calls == STAGES


def test_the_chat_corpus_keeps_held_out_conversations_and_benchmarks_out_of_training(tmp_path):
    """Conversations (ShareGPT's ID_N parts) are either held out (a prompt from their first user turn) or trained
    on, never both; benchmark questions are neither; the same settings write the same bytes."""
    records = []
    for c in range(30):
        for part in range(1 + c % 3):
            records.append({"id": f"c{c}_{part}", "conversations": [
                {"from": "human", "value": f"question {c} part {part}" + (" long" * 400 if c % 7 == 0 else "")},
                {"from": "gpt", "value": f"answer {c}"}]})
    records.append({"id": "bench_0", "conversations": [{"from": "human", "value": "Calculate the atomic mass for lithium."},
                                                       {"from": "gpt", "value": "6.94"}]})
    dataset = tmp_path / "chat.json"
    dataset.write_text(json.dumps(records)[:-1])  # cut: no closing bracket, as a partial download
    corpus = quickstart.ChatCorpus(dataset=str(dataset), records=20, prompts=5, prompt_chars=200, prompt_sets=())
    layout = quickstart.Layout(tmp_path / "qs")
    record = quickstart.write_chat_corpus(corpus, layout)
    trained = [json.loads(line) for line in layout.corpus.read_text().splitlines()]
    (prompt_file,) = corpus.prompt_files(layout)
    assert prompt_file.name == "chat_heldout.jsonl"
    prompts = [json.loads(line) for line in prompt_file.read_text().splitlines()]
    assert (record["records"], record["prompts"], len(trained), len(prompts)) == (20, 5, 20, 5)
    trained_conversations = {line["id"].rsplit("_", 1)[0] for line in trained}
    assert not trained_conversations & {p["id"] for p in prompts}
    assert all(len(p["prompt"]) <= 200 and p["prompt"].startswith("question") for p in prompts)
    assert not any("lithium" in m["content"] for line in trained for m in line["messages"])
    before = layout.corpus.read_bytes()
    quickstart.write_chat_corpus(corpus, layout)
    assert layout.corpus.read_bytes() == before
    with pytest.raises(HassDeployError, match="fewer than the preset's"):
        quickstart.write_chat_corpus(quickstart.ChatCorpus(dataset=str(dataset), records=500, prompt_sets=()), layout)
    # Conversations a shipped draft trained on give no held-out prompt: the next ones do.
    avoid = frozenset(p["id"] for p in prompts[:2])
    quickstart.write_chat_corpus(corpus, layout, avoid)
    again = [json.loads(line)["id"] for line in prompt_file.read_text().splitlines()]
    assert len(again) == 5 and not avoid & set(again) and again[:3] == [p["id"] for p in prompts[2:]]


def test_the_default_preset_is_the_real_model_on_sharegpt():
    preset = quickstart.PRESETS["default"]
    assert preset.target == "smollm2" and isinstance(preset.corpus, quickstart.ChatCorpus)
    assert preset.corpus.dataset == "sharegpt" and preset.data.format == "sharegpt"
    assert [p.stem for p in preset.corpus.prompt_files(quickstart.Layout(Path("w")))] == [
        "sharegpt_heldout", "mt_bench", "humaneval", "gsm8k", "alpaca"]
    assert quickstart.PRESETS["tiny"].target == "tiny" and quickstart.PRESETS["demo"].target == "default"


def _packed(target, directory: Path, recipe: str, seed: int) -> Path:
    """A shipped draft as the project makes one: trained (here: initialised) for `target`, then packed."""
    from hass_deploy.models.checkpoint import FORMAT_VERSION, DraftMetadata, init_draft, pack_draft, save_draft, target_identity

    full = save_draft(init_draft(target, seed=seed), directory.with_name(directory.name + "-full"),
                      DraftMetadata(FORMAT_VERSION, recipe, target_identity(target)))
    return pack_draft(full, directory, force=True)


def _shipped_preset(monkeypatch, directories: dict[str, Path], base: str = "tiny") -> str:
    shipped = tuple(quickstart.ShippedDraft(f"{recipe}-shipped", f"{label} draft (shipped)", path)
                    for (recipe, label), path in zip((("hass", "HASS"), ("eagle2", "EAGLE-2")), directories.values()))
    monkeypatch.setitem(quickstart.PRESETS, "with-drafts", replace(quickstart.PRESETS[base], shipped=shipped))
    return "with-drafts"


SHIPPED_STAGES = ["data", "train hass", "train eagle2", "export target", "export hass", "export eagle2",
                  "export hass-shipped", "export eagle2-shipped", "validate hass", "validate eagle2",
                  "validate hass-shipped", "validate eagle2-shipped", "bench"]


def test_shipped_drafts_are_exported_validated_and_benched_beside_the_own(fakes, targets, monkeypatch, tmp_path):
    packed = {name: _packed(targets["llama"], tmp_path / "drafts" / name, name, seed)
              for name, seed in (("hass", 1), ("eagle2", 2))}
    preset = _shipped_preset(monkeypatch, packed)
    lines = []
    summary = quickstart.run_quickstart(tmp_path / "work", preset, progress=False, log=lines.append)
    assert fakes.calls == SHIPPED_STAGES and not any("not in this install" in line for line in lines)
    assert [(d.key, Path(d.path), Path(d.artifacts).name) for d in fakes.benched[2:]] == [
        ("hass-shipped", packed["hass"], "hass-shipped"), ("eagle2-shipped", packed["eagle2"], "eagle2-shipped")]
    rendered = quickstart.render_summary(summary)
    for row in ("| HASS draft | 2.50 | 15.0 | 1.50x |", "| EAGLE-2 draft | 2.20 | 13.0 | 1.30x |",
                "| HASS draft (shipped) | 3.50 | 20.0 | 2.00x |", "| EAGLE-2 draft (shipped) | 3.50 | 20.0 | 2.00x |"):
        assert row in rendered
    assert "HASS draft (shipped) and EAGLE-2 draft (shipped): the project's own" in rendered
    assert summary["shipped"]["hass-shipped"]["path"] == str(packed["hass"]) and summary["shipped_missing"] == []
    assert summary["artifacts"]["onnx_eagle2-shipped"] == str(tmp_path / "work" / "onnx" / "eagle2-shipped")
    fakes.calls.clear()
    quickstart.run_quickstart(tmp_path / "work", preset, progress=False, log=lambda line: None)
    assert fakes.calls == []
    _packed(targets["llama"], packed["hass"], "hass", seed=5)  # a new shipped draft: its stages and the bench again
    quickstart.run_quickstart(tmp_path / "work", preset, progress=False, log=lambda line: None)
    assert fakes.calls == ["export hass-shipped", "validate hass-shipped", "bench"]


def test_shipped_drafts_missing_from_the_install_are_one_line_and_the_own_are_benched(fakes, monkeypatch, tmp_path):
    preset = _shipped_preset(monkeypatch, {"hass": tmp_path / "none-hass", "eagle2": tmp_path / "none-eagle2"})
    lines = []
    summary = quickstart.run_quickstart(tmp_path / "work", preset, progress=False, log=lines.append)
    notes = [line for line in lines if "not in this install" in line]
    assert len(notes) == 1 and "HASS draft (shipped), EAGLE-2 draft (shipped)" in notes[0]
    assert "benchmarking the quickstart's own drafts" in notes[0]
    assert fakes.calls == STAGES and [d.key for d in fakes.benched] == ["draft", "baseline"]
    assert summary["shipped"] == {} and summary["shipped_missing"] == ["HASS draft (shipped)", "EAGLE-2 draft (shipped)"]
    assert "(shipped)" not in quickstart.render_summary(summary)


def test_the_default_preset_ships_smollm2_drafts_in_the_package():
    preset = quickstart.PRESETS["default"]
    package = Path(quickstart.__file__).parent / "drafts"
    assert [(d.key, d.path) for d in preset.shipped] == [("hass-shipped", package / "smollm2-hass"),
                                                          ("eagle2-shipped", package / "smollm2-eagle2")]
    assert preset.corpus.records == 96 and [p.epochs for p in preset.train.phases] == [1]
    assert quickstart.PRESETS["tiny"].shipped == () and quickstart.PRESETS["demo"].shipped == ()
    with pytest.raises(HassDeployError, match="keys of their own"):
        replace(preset, shipped=(quickstart.ShippedDraft("hass", "x", Path("x")),))


@pytest.mark.slow
def test_shipped_drafts_through_the_real_export_validation_and_bench(fusable_dirs, monkeypatch, tmp_path):
    """The tiny preset on a tiny random target with real ONNX stages: the target exported once, each draft's
    export linking it, every export validated, and the bench of plain, four drafts, lookup and hybrid lossless."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import shutil

    from hass_deploy.models.loading import load_target

    shutil.copytree(fusable_dirs["llama"], tmp_path / "target")
    target = load_target(tmp_path / "target")
    packed = {name: _packed(target, tmp_path / "drafts" / name, name, seed) for name, seed in (("hass", 11), ("eagle2", 12))}
    fakes = Fakes(tmp_path, monkeypatch, real_onnx=True)
    preset = _shipped_preset(monkeypatch, packed)
    monkeypatch.setitem(quickstart.PRESETS, preset, replace(
        quickstart.PRESETS[preset], max_new_tokens=12,
        corpus=replace(quickstart.PRESETS[preset].corpus, prompts=2, prompt_chars=120),
        export=replace(quickstart.PRESETS[preset].export, max_seq_len=256)))
    summary = quickstart.run_quickstart(tmp_path / "work", preset, progress=False, log=lambda line: None)
    assert fakes.calls == ["data", "train hass", "train eagle2"]
    onnx = tmp_path / "work" / "onnx"
    for name in ("hass", "eagle2", "hass-shipped", "eagle2-shipped"):
        assert (onnx / name / "target.onnx").stat().st_ino == (onnx / "target" / "target.onnx").stat().st_ino
        assert (onnx / name / "validation.txt").is_file()
    bench = summary["bench"]
    assert bench["lossless"] is True and list(bench["labels"]) == ["draft", "baseline", "hass-shipped", "eagle2-shipped"]
    assert set(bench["tokens_per_s"]) == {"plain", "draft", "baseline", "hass-shipped", "eagle2-shipped", "lookup",
                                          "hybrid"}
    rendered = quickstart.render_summary(summary)
    assert "| HASS draft (shipped) |" in rendered and "| HASS draft |" in rendered
    assert "| HASS draft (shipped) |" in (tmp_path / "work" / "bench" / "bench.md").read_text()
