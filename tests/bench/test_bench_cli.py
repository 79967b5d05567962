"""`hass-deploy bench`: a run through the CLI, a failed lossless check exiting 1, and one-line usage errors."""

import json
from dataclasses import asdict

import pytest
from typer.testing import CliRunner

from hass_deploy.bench import runner as bench_runner
from hass_deploy.cli import app
from hass_deploy.config import HybridConfig
from hass_deploy.models.checkpoint import FORMAT_VERSION, DraftMetadata, init_draft, save_draft, target_identity

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # older click mixes stderr into output
        return result.output


def user_error(result, *fragments):
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in _stderr(result).splitlines() if line.startswith("error:")]
    assert len(lines) == 1, _stderr(result)
    assert "Traceback" not in _stderr(result)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def cli_inputs(hf_dirs, targets, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-cli")
    target = targets["llama"]
    draft = root / "draft"
    save_draft(init_draft(target, seed=3), draft, DraftMetadata(FORMAT_VERSION, "hass", target_identity(target)))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"prompt {i}"}) + "\n" for i in range(2)))
    base = ["bench", "--target", hf_dirs["llama"], "--draft", draft, "--prompts", prompts, "--max-new-tokens", 6,
            "--warmup", 0]
    return {"base": base, "root": root, "prompts": prompts, "draft": draft}


def test_cli_bench_runs_and_prints_the_table(cli_inputs, tmp_path):
    result = invoke(*cli_inputs["base"], "--prompts", cli_inputs["prompts"], "--tree-tokens", 4, "--tree-depth", 2,
                    "--out", tmp_path)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "| **overall** |" in result.output and "| **overall** | prompt lookup |" in result.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["tree"] == {"tokens": 4, "depth": 2, "top_k": 4}  # unspecified options keep TreeConfig's defaults
    # Prompt lookup and hybrid drafting are on by default.
    assert [m["key"] for m in data["methods"]] == ["plain", "draft", "lookup", "hybrid"]
    assert data["summaries"]["overall"]["lookup"]["identical"] is True
    assert data["summaries"]["overall"]["hybrid"]["identical"] is True
    assert data["hybrid"] == asdict(HybridConfig())  # a fixed tree: the default costs
    assert data["prompt_sets"] == ["prompts", "prompts-2"]  # the same file twice: two sets, told apart
    assert (tmp_path / "bench.png").exists() and (tmp_path / "bench.md").exists()


def test_cli_bench_prompt_lookup_options(cli_inputs, tmp_path):
    result = invoke(*cli_inputs["base"], "--no-lookup", "--out", tmp_path / "off")
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads((tmp_path / "off" / "bench.json").read_text())
    assert [m["key"] for m in data["methods"]] == ["plain", "draft"] and data["config"]["lookup"] is None
    assert "prompt lookup" not in result.output and data["hybrid"] is None
    result = invoke(*cli_inputs["base"], "--lookup-tokens", 4, "--lookup-depth", 3, "--lookup-max-ngram", 2,
                    "--lookup-branches", 2, "--hybrid-tokens", 5, "--hybrid-draft-cost", 0.25, "--hybrid-row-cost", 0.01,
                    "--hybrid-tokens-per-step", 2.5,
                    "--out", tmp_path / "small")
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads((tmp_path / "small" / "bench.json").read_text())
    assert data["config"]["lookup"] == {"tokens": 4, "depth": 3, "max_ngram": 2, "min_ngram": 1, "branches": 2}
    assert data["hybrid"] == data["config"]["hybrid"] == {"tokens": 5, "draft_cost": 0.25, "row_cost": 0.01,
                                                          "tokens_per_step": 2.5}
    assert "- prompt lookup: tokens 4, depth 3, n-grams 1..2" in result.output
    assert "- hybrid: the draft's and prompt lookup's candidates reranked into one tree of 5 nodes" in result.output
    result = invoke(*cli_inputs["base"], "--no-hybrid", "--out", tmp_path / "no-hybrid")
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads((tmp_path / "no-hybrid" / "bench.json").read_text())
    assert [m["key"] for m in data["methods"]] == ["plain", "draft", "lookup"] and data["hybrid"] is None


def test_cli_bench_fails_loudly_when_outputs_differ(cli_inputs, tmp_path, monkeypatch):
    real = bench_runner.bench_decoders

    class Corrupting:
        def __init__(self, inner):
            self.inner = inner

        def generate(self, ids, config):
            result = self.inner.generate(ids, config)
            result.output_ids[0] = (result.output_ids[0] + 1) % 96
            return result

    def broken(sets, decoders, *args, **kwargs):
        return real(sets, {**decoders, "draft": Corrupting(decoders["draft"])}, *args, **kwargs)

    monkeypatch.setattr(bench_runner, "bench_decoders", broken)
    result = invoke(*cli_inputs["base"], "--out", tmp_path)
    line = user_error(result, "LOSSLESS CHECK FAILED", "2 of 6")  # 2 prompts x (draft, lookup, hybrid) checked
    assert "at new token 0" in line
    assert "LOSSLESS CHECK FAILED" in (tmp_path / "bench.md").read_text()  # the files are still written
    assert json.loads((tmp_path / "bench.json").read_text())["lossless"] is False


@pytest.mark.parametrize("extra, fragments", [
    (["--tree", "auto", "--tree-tokens", "8"], ["--tree auto", "--tree-tokens"]),
    (["--tree", "big"], ["--tree takes only `auto`"]),
    (["--tree-tokens", "0"], ["--tree-tokens must be >= 1"]),
    (["--max-prompts", "0"], ["--max-prompts must be >= 1"]),
    (["--warmup", "-1"], ["--warmup must be >= 0"]),
    (["--temperature", "-1"], ["temperature"]),
    (["--baseline-artifacts", "x"], ["--baseline-artifacts"]),
    (["--backend", "tensorrt"], ["--backend tensorrt needs --artifacts"]),
    (["--backend", "vllm"], ["unknown backend"]),
    (["--max-new-tokens", "400"], ["does not fit a KV cache"]),
    (["--lookup-tokens", "0"], ["--lookup-tokens must be >= 1"]),
    (["--lookup-min-ngram", "2", "--lookup-max-ngram", "1"], ["--lookup-min-ngram <= --lookup-max-ngram"]),
    (["--lookup-branches", "0"], ["--lookup-branches must be >= 1"]),
    (["--hybrid-tokens", "0"], ["--hybrid-tokens must be >= 1"]),
    (["--hybrid-draft-cost", "-1"], ["--hybrid-draft-cost must be >= 0"]),
    (["--hybrid-row-cost", "-1"], ["--hybrid-row-cost must be >= 0"]),
    (["--no-lookup", "--hybrid"], ["--hybrid merges prompt lookup's trees", "--no-lookup"]),
])
def test_cli_bench_usage_errors_are_one_line(cli_inputs, tmp_path, extra, fragments):
    user_error(invoke(*cli_inputs["base"], *extra, "--out", tmp_path / "out"), *fragments)


def test_cli_bench_missing_inputs(cli_inputs, hf_dirs, tmp_path):
    base = cli_inputs["base"]
    missing_prompts = [*base[:6], tmp_path / "nope.jsonl", *base[7:]]
    user_error(invoke(*missing_prompts, "--out", tmp_path / "o"), "nope.jsonl", "no such prompt file")
    missing_draft = [*base[:4], tmp_path / "no-draft", *base[5:]]
    user_error(invoke(*missing_draft, "--out", tmp_path / "o"), "no-draft", "no such draft directory")
    user_error(invoke(*base, "--baseline-draft", tmp_path / "nothing", "--out", tmp_path / "o"),
               "no such baseline draft directory")
    afile = tmp_path / "file"
    afile.write_text("x")
    user_error(invoke(*base, "--out", afile), "is not a directory")


def test_cli_bench_onnxruntime_needs_artifacts(cli_inputs, tmp_path):
    user_error(invoke(*cli_inputs["base"], "--backend", "onnxruntime", "--out", tmp_path), "--artifacts")
    user_error(invoke(*cli_inputs["base"], "--backend", "torch", "--artifacts", tmp_path, "--out", tmp_path / "o"),
               "--artifacts")
    # --backend auto (the default) runs ONNX Runtime when --artifacts is given, so the directory is checked.
    user_error(invoke(*cli_inputs["base"], "--artifacts", tmp_path, "--out", tmp_path / "o"), "not an export")
