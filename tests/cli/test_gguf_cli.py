"""`--target model.gguf` and `hass-deploy convert`, through the CLI: a GGUF target generates what its converted
directory generates, the conversion is made once, and bad files end in one line (the whole process's output)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from cli.test_cli import invoke, ok, user_error
from cli.test_error_lines import few_lines, run_cli
from models.gguf_files import tokenizer_for, write_gguf
from hass_deploy.models.random_target import random_hf_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs the gguf package")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    model = random_hf_model("llama", "tiny", seed=5)
    return write_gguf(model, tmp_path_factory.mktemp("gguf") / "tiny.gguf", tokenizer_for(model.config.vocab_size))


def _json_output(result) -> list[int]:
    return json.loads(ok(result).stdout.splitlines()[-1])["output_ids"]


def test_a_gguf_target_generates_what_its_converted_directory_generates(gguf_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HASS_DEPLOY_HOME", str(tmp_path / "home"))
    out = tmp_path / "converted"
    assert ok(invoke("convert", gguf_file, "--out", out, "--no-progress")).stdout.strip() == str(out)
    args = ("--no-draft", "--prompt", "def main():", "--max-new-tokens", "12", "--json")
    from_dir = _json_output(invoke("generate", "--target", out, *args))
    from_file = _json_output(invoke("generate", "--target", gguf_file, *args))
    assert from_file == from_dir and len(from_file) == 12
    cached = list((tmp_path / "home" / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "tokenizer.json").is_file()
    # convert refuses to overwrite what a user made, as every command does
    user_error(invoke("convert", gguf_file, "--out", out), "not empty")


def test_bad_gguf_files_end_in_one_line(gguf_file, tmp_path):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[:4096])
    few_lines(run_cli("convert", truncated, "--out", tmp_path / "a"), "truncated or corrupt GGUF")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    few_lines(run_cli("generate", "--target", text, "--no-draft", "--prompt-ids", "1"), "not a GGUF file")
