"""The quickstart's orchestration: stages run once, reruns reuse them, interrupted ones resume, changed or damaged
ones are redone with everything after them, and a lossless failure fails the run.

The heavy stages are replaced by fakes that record their calls (each is tested on its own elsewhere); CI runs the
real `tiny` preset end to end (`.ci/run`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from hass_deploy import quickstart
from hass_deploy.bench.config import BenchConfig
from hass_deploy.bench.metrics import Spread
from hass_deploy.bench.results import OVERALL, MethodSummary
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

    def __init__(self, tmp_path: Path, monkeypatch):
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
        self.target.mkdir()
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
        monkeypatch.setattr(onnx_export, "export_artifacts", self.export)
        monkeypatch.setattr(parity, "validate_artifacts", self.validate)
        monkeypatch.setattr(runner, "run_bench", self.bench)
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
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({"recipe": config.recipe}))
        # The same weights each time unless a test says training is not reproducible.
        (out / "model.safetensors").write_text(f"{config.recipe} {self.calls.count(f'train {config.recipe}')}"
                                               if self.nondeterministic else config.recipe)
        return {"eval_expected_tau": 2.0, "eval_acceptance": [0.5]}

    def export(self, target, draft, out, config, force=False, log=None):
        self._call(f"export {draft.name}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "graph").write_text("g")

    def validate(self, artifacts, target, draft):
        self._call(f"validate {draft.name}")
        return SimpleNamespace(passed=True, checks=[1, 2], render=lambda: "ok")

    def bench(self, target, draft, prompts, config, baseline_draft=None, artifacts=None, baseline_artifacts=None,
              out=None, log=None):
        self._call("bench")
        assert config.runtime.backend == "onnxruntime" and config.sampling.greedy
        assert config.lookup is not None and config.hybrid is not None  # benchmarked beside the drafts
        assert Path(artifacts).name == "hass" and Path(baseline_artifacts).name == "eagle2"
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench.json").write_text("{}")
        summaries = {OVERALL: {"plain": _summary("plain", None, 10.0), "draft": _summary("draft", 2.5, 15.0),
                               "baseline": _summary("baseline", 2.2, 13.0, self.lossless),
                               "lookup": _summary("lookup", 1.4, 11.0), "hybrid": _summary("hybrid", 3.0, 18.0)}}
        return SimpleNamespace(summaries=summaries, tree=TreeConfig(), tree_choice=None, config=BenchConfig(),
                               machine={}, lossless=self.lossless,
                               lossless_line=lambda: "lossless check: PASSED" if self.lossless else "LOSSLESS CHECK FAILED")


STAGES = ["data", "train hass", "train eagle2", "export hass", "export eagle2", "validate hass", "validate eagle2",
          "bench"]


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
    assert fakes.calls == STAGES[3:]


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


def test_the_default_preset_is_the_real_model_on_sharegpt():
    preset = quickstart.PRESETS["default"]
    assert preset.target == "smollm2" and isinstance(preset.corpus, quickstart.ChatCorpus)
    assert preset.corpus.dataset == "sharegpt" and preset.data.format == "sharegpt"
    assert [p.stem for p in preset.corpus.prompt_files(quickstart.Layout(Path("w")))] == [
        "sharegpt_heldout", "mt_bench", "humaneval", "gsm8k", "alpaca"]
    assert quickstart.PRESETS["tiny"].target == "tiny" and quickstart.PRESETS["demo"].target == "default"
