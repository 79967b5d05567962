"""`run_bench` end to end on a tiny random target: the three files, the lossless check (and its failure),
tau > 1 with the oracle draft and with prompt lookup through the library API, and `--tree auto`."""

import json
from dataclasses import replace

import pytest

from conftest import OracleDraft
from hass_deploy.bench import BenchConfig, TreeSearchConfig, bench_decoders, run_bench
from hass_deploy.bench.results import OVERALL
from hass_deploy.bench.runner import BenchDraft, EncodedSet, LookupDecoder, run_drafts, summarise_runs
from hass_deploy.config import HybridConfig, LookupConfig, SamplingConfig, TreeConfig
from hass_deploy.errors import ConfigError
from hass_deploy.models.checkpoint import FORMAT_VERSION, DraftMetadata, init_draft, save_draft, target_identity
from hass_deploy.prompts import Prompt
from hass_deploy.runtime.backends.torch import TorchTarget
from hass_deploy.runtime.decoder import SpeculativeDecoder

TREE = TreeConfig(tokens=6, depth=3, top_k=2)
FAST = BenchConfig(max_new_tokens=8, max_prompts=2, warmup=1, tree=TREE)


@pytest.fixture(scope="module")
def bench_inputs(hf_dirs, targets, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    target = targets["llama"]
    drafts = {}
    for name, recipe, seed in (("hass", "hass", 1), ("eagle2", "eagle2", 2), ("shipped", "hass", 3)):
        drafts[name] = root / name
        save_draft(init_draft(target, seed=seed), drafts[name], DraftMetadata(FORMAT_VERSION, recipe, target_identity(target)))
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": 100 + i, "turns": [f"question number {i} about foxes"]}) + "\n"
                                 for i in range(4)))
    plain = root / "plain.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"write {i} lines of verse"}) + "\n" for i in range(3)))
    return {"target": hf_dirs["llama"], "drafts": drafts, "prompts": [questions, plain], "root": root}


def test_bench_writes_three_files_and_checks_lossless(bench_inputs, tmp_path):
    out = tmp_path / "out"
    report = run_bench(bench_inputs["target"], bench_inputs["drafts"]["hass"], bench_inputs["prompts"], FAST,
                       baseline_draft=bench_inputs["drafts"]["eagle2"], out=out)
    assert report.lossless is True
    assert report.prompt_sets == ("questions", "plain")
    assert report.prompt_encoding == "bytes"  # the tiny target has no tokenizer
    assert [m.key for m in report.methods] == ["plain", "draft", "baseline", "lookup", "hybrid"]
    assert report.label("draft").startswith("HASS") and report.label("baseline").startswith("EAGLE-2")
    assert report.label("lookup") == "prompt lookup"
    # 2 prompts per set (--max-prompts) x 5 methods, every method on every prompt.
    assert len(report.runs) == 20
    for method in ("baseline", "lookup", "hybrid"):
        assert {(r.prompt_set, r.index) for r in report.runs if r.method == method} == {
            (s, i) for s in ("questions", "plain") for i in range(2)}
    overall = report.summaries[OVERALL]
    assert overall["draft"].tau >= 1.0 and overall["draft"].identical is True
    assert overall["lookup"].tau >= 1.0 and overall["lookup"].identical is True  # in the lossless check
    assert overall["plain"].tau is None and overall["baseline"].speedup > 0 and overall["lookup"].speedup > 0
    assert overall["hybrid"].tau >= 1.0 and overall["hybrid"].identical is True
    assert 0 <= overall["hybrid"].draft_rounds <= overall["hybrid"].rounds  # 8 new tokens: rarely worth a catch-up
    assert overall["draft"].draft_rounds == overall["draft"].rounds and overall["lookup"].draft_rounds == 0
    assert all(r.matches_plain is True for r in report.runs if r.method in ("lookup", "hybrid"))
    data = json.loads((out / "bench.json").read_text())
    assert data["lossless"] is True and data["tree"] == {"tokens": 6, "depth": 3, "top_k": 2}
    assert data["config"]["lookup"] == {"tokens": 8, "depth": 10, "max_ngram": 4, "min_ngram": 1, "branches": 4}
    assert {"plain", "draft", "baseline", "lookup", "hybrid"} == set(data["summaries"]["questions"])
    assert {"cpu", "logical_cores", "torch", "onnxruntime", "date"} <= set(data["machine"])
    assert set(data["summaries"]) == {"questions", "plain", "overall"}
    assert data["summaries"]["overall"]["draft"]["tokens_per_s"]["iqr"] >= 0
    assert data["tree_auto"] is None
    markdown = (out / "bench.md").read_text()
    assert "| **overall** | HASS" in markdown and "PASSED" in markdown
    assert "| **overall** | prompt lookup |" in markdown and "- prompt lookup: tokens 8, depth 10, n-grams 1..4" in markdown
    assert "| **overall** | hybrid: the draft and prompt lookup in one tree |" in markdown
    assert "| prompt lookup | " in markdown  # its per-depth acceptance row
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_of_three_drafts_reports_each_and_checks_all(bench_inputs, tmp_path):
    """Any number of drafts side by side: each is a method with its label in the table, the JSON and the plot,
    hybrid drafting runs the first, and every one is in the lossless check."""
    drafts = bench_inputs["drafts"]
    chosen = [BenchDraft("hass", drafts["hass"]), BenchDraft("eagle2", drafts["eagle2"]),
              BenchDraft("hass_shipped", drafts["shipped"], label="HASS (shipped)")]
    out = tmp_path / "out"
    report = run_drafts(bench_inputs["target"], chosen, bench_inputs["prompts"][:1], replace(FAST, warmup=0), out)
    keys = ["plain", "hass", "eagle2", "hass_shipped", "lookup", "hybrid"]
    assert [m.key for m in report.methods] == keys and report.drafts == ("hass", "eagle2", "hass_shipped")
    assert [report.label(k) for k in report.drafts] == ["HASS (hass)", "EAGLE-2 (eagle2)", "HASS (shipped)"]
    assert len(report.runs) == 2 * len(keys) and report.lossless is True
    assert sum(r.matches_plain is True for r in report.runs) == 2 * (len(keys) - 1)  # every method but plain
    data = json.loads((out / "bench.json").read_text())
    assert set(data["summaries"]["overall"]) == set(keys)
    assert data["sources"]["drafts"]["hass_shipped"] == {"path": str(drafts["shipped"]), "artifacts": None}
    assert data["sources"]["draft"] == str(drafts["hass"]) and data["sources"]["baseline_draft"] is None
    markdown = (out / "bench.md").read_text()
    for label in ("HASS (hass)", "EAGLE-2 (eagle2)", "HASS (shipped)"):
        assert f"| **overall** | {label} |" in markdown and f"| {label} | " in markdown  # and its depth row
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="unique and none of plain"):
        run_drafts(bench_inputs["target"], [chosen[0], BenchDraft("lookup", drafts["eagle2"])],
                   bench_inputs["prompts"][:1], FAST)


def test_bench_without_prompt_lookup(bench_inputs, tmp_path):
    config = replace(FAST, lookup=None, max_prompts=1, warmup=0)
    report = run_bench(bench_inputs["target"], bench_inputs["drafts"]["hass"], bench_inputs["prompts"][:1], config,
                       out=tmp_path)
    assert [m.key for m in report.methods] == ["plain", "draft"] and len(report.runs) == 2
    assert "prompt lookup" not in (tmp_path / "bench.md").read_text()
    assert json.loads((tmp_path / "bench.json").read_text())["config"]["lookup"] is None


class _Corrupting:
    """A decoder that returns its inner decoder's output with one token changed (a broken speculative path)."""

    def __init__(self, inner, at: int = 3):
        self.inner, self.at = inner, at

    def generate(self, prompt_ids, config):
        result = self.inner.generate(prompt_ids, config)
        if len(result.output_ids) > self.at:
            result.output_ids[self.at] = (result.output_ids[self.at] + 1) % 96
        return result


class _OracleDecoder:
    """Speculative decoding with the oracle draft (it proposes the target's own tokens, so tau > 1); the draft is
    rebuilt per prompt because it tracks one prompt's token paths."""

    def __init__(self, target, max_len=256, noise=0.5):
        self.target, self.backend, self.max_len, self.noise = target, TorchTarget(target.module, max_len), max_len, noise

    def generate(self, prompt_ids, config):
        draft = OracleDraft(self.target, prompt_ids[0], self.max_len + config.tree.draft_rows, noise=self.noise)
        return SpeculativeDecoder(self.backend, draft).generate(prompt_ids, config)


def _sets(n=3):
    prompts = tuple((Prompt(text=None, ids=[1 + i, 5, 9, 2 + i], question_id=i), [1 + i, 5, 9, 2 + i]) for i in range(n))
    return [EncodedSet("ids", prompts)]


def test_oracle_draft_through_the_library_api_gets_tau_above_one(targets):
    target = targets["llama"]
    decoders = {"plain": SpeculativeDecoder(TorchTarget(target.module, 256), None), "draft": _OracleDecoder(target)}
    config = replace(FAST, max_new_tokens=12, warmup=0)
    runs = bench_decoders(_sets(), decoders, config, TREE, target.eos_token_ids)
    summary = summarise_runs(runs, ["ids"], list(decoders), greedy=True)[OVERALL]["draft"]
    assert summary.tau > 1.5
    assert summary.identical is True
    assert summary.depth_acceptance[0] > 0.5
    # The order of methods rotates from prompt to prompt; every prompt still has both.
    assert len(runs) == 6


def test_prompt_lookup_through_the_library_api_gets_tau_above_one(targets):
    """Repetitive prompts: lookup proposes from them and from the target's looping output, and its tau, depth
    acceptance and lossless check are reported like a draft's."""
    target = targets["llama"]
    plain = SpeculativeDecoder(TorchTarget(target.module, 256), None)
    decoders = {"plain": plain, "lookup": LookupDecoder(plain, LookupConfig())}
    prompts = tuple((Prompt(text=None, ids=ids, question_id=i), ids)
                    for i, ids in enumerate([[3, 9, 4] * 4, [7, 1, 8, 2] * 3, [5, 6] * 6]))
    runs = bench_decoders([EncodedSet("repeats", prompts)], decoders, replace(FAST, max_new_tokens=24, warmup=0),
                          TREE, ())
    summary = summarise_runs(runs, ["repeats"], list(decoders), greedy=True)[OVERALL]["lookup"]
    assert summary.tau > 1.5 and summary.identical is True
    assert summary.depth_acceptance[0] > 0


def test_a_decoder_that_changes_tokens_is_reported(targets):
    target = targets["llama"]
    plain = SpeculativeDecoder(TorchTarget(target.module, 256), None)
    decoders = {"plain": plain, "draft": _Corrupting(_OracleDecoder(target))}
    lines = []
    runs = bench_decoders(_sets(2), decoders, replace(FAST, warmup=0), TREE, (), lines.append)
    bad = [r for r in runs if r.matches_plain is False]
    assert len(bad) == 2 and all(r.first_mismatch == 3 for r in bad)
    assert any(line.startswith("MISMATCH: draft") for line in lines)
    summary = summarise_runs(runs, ["ids"], list(decoders), greedy=True)[OVERALL]["draft"]
    assert summary.identical is False and summary.mismatched == ("ids#0", "ids#1")


def test_sampling_runs_are_not_checked_token_for_token(targets):
    target = targets["llama"]
    decoders = {"plain": SpeculativeDecoder(TorchTarget(target.module, 256), None), "draft": _OracleDecoder(target)}
    config = replace(FAST, warmup=0, sampling=SamplingConfig(temperature=1.0))
    runs = bench_decoders(_sets(2), decoders, config, TREE, ())
    assert all(r.matches_plain is None for r in runs)


def test_tree_auto_chooses_from_the_grid_and_stores_the_cost_curve(bench_inputs, tmp_path):
    search = TreeSearchConfig(tokens=(4,), depths=(2, 3), top_ks=(2,), chain_depths=(1, 2), prompts=2,
                              max_new_tokens=6, finalists=2, repeats=2)
    config = replace(FAST, tree=None, search=search, max_prompts=1)
    lines = []
    report = run_bench(bench_inputs["target"], bench_inputs["drafts"]["hass"], bench_inputs["prompts"], config,
                       out=tmp_path, log=lines.append)
    choice = report.tree_choice
    grid = {TreeConfig(2, 1, 1), TreeConfig(3, 2, 1), TreeConfig(4, 2, 2), TreeConfig(4, 3, 2)}
    assert choice.tree in grid and report.tree == choice.tree
    assert {c.tree for c in choice.screened} == grid and len(choice.finalists) == 2
    # Spare prompts (beyond --max-prompts 1) calibrate, round-robin over the sets.
    assert choice.calibration_prompts == ("questions#101", "plain#2") and not choice.calibration_overlaps_bench
    assert any(line.startswith("tree auto: chose tokens=") for line in lines)
    assert any("predicted" in line and "measured" in line for line in lines)
    data = json.loads((tmp_path / "bench.json").read_text())
    curve = data["tree_auto"]["cost_curve"]
    assert set(curve["target_ms"]) == {"1", "2", "3", "4"} and curve["prefill_ms"] > 0
    assert data["tree_auto"]["outcome"]["measured_tokens_per_s"] > 0
    assert "## `--tree auto`" in (tmp_path / "bench.md").read_text()
    assert report.lossless is True


@pytest.mark.slow
def test_onnxruntime_backend_with_its_own_baseline_export(bench_inputs, targets, tmp_path):
    """Both drafts run from their exports (the baseline from its own), `--tree auto` stays inside the exports'
    tree budget and top-k, and greedy outputs still equal plain decoding's."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from hass_deploy.export.config import ExportConfig
    from hass_deploy.export.onnx import export_artifacts

    export = ExportConfig(max_seq_len=256, max_tree_tokens=4, max_top_k=2, prefill_chunk=64)
    exports = {name: tmp_path / name for name in ("hass", "eagle2")}
    for name, out in exports.items():
        export_artifacts(bench_inputs["target"], bench_inputs["drafts"][name], out, export)
    search = TreeSearchConfig(tokens=(4, 6), depths=(2,), top_ks=(2, 4), chain_depths=(1, 3, 5), prompts=1,
                              max_new_tokens=6, finalists=2, repeats=2)
    config = replace(FAST, tree=None, search=search, max_prompts=1, lookup=LookupConfig(tokens=4),
                     hybrid=HybridConfig(tokens=4),
                     runtime=replace(FAST.runtime, backend="onnxruntime"))
    report = run_bench(bench_inputs["target"], bench_inputs["drafts"]["hass"], bench_inputs["prompts"][:1], config,
                       baseline_draft=bench_inputs["drafts"]["eagle2"], artifacts=exports["hass"],
                       baseline_artifacts=exports["eagle2"])
    assert report.lossless is True and len(report.runs) == 5  # plain, draft, baseline, prompt lookup, hybrid
    # --tree auto measured the draft's cost for hybrid drafting, in verify steps of its tree.
    assert report.hybrid.tokens == 4 and report.hybrid.draft_cost > 0 and report.hybrid.row_cost > 0
    with pytest.raises(ConfigError, match="--lookup-tokens 8 .*tree budget \\(4\\)"):  # refused before any run
        run_bench(bench_inputs["target"], bench_inputs["drafts"]["hass"], bench_inputs["prompts"][:1],
                  replace(config, lookup=LookupConfig()), artifacts=exports["hass"])
    assert {c.tree for c in report.tree_choice.screened} == {TreeConfig(2, 1, 1), TreeConfig(4, 3, 1),
                                                             TreeConfig(4, 2, 2)}
    assert report.machine["backend"] == "onnxruntime"
