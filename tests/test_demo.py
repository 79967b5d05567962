"""The embedded demo target: the held-out split, the Hugging Face directory it writes, and its cache."""

from __future__ import annotations

import json

import pytest

from hass_deploy import demo
from hass_deploy.cache import file_sha256
from hass_deploy.errors import HassDeployError
from hass_deploy.models.loading import load_target

# Seconds to build: a few optimizer steps of a one-layer model on a slice of the standard library.
MICRO = demo.TargetRecipe(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                          num_kv_heads=1, seq_len=32, batch_size=2, steps=3, warmup_steps=1, corpus_bytes=60_000)


@pytest.fixture
def micro(monkeypatch, tmp_path):
    monkeypatch.setenv("HASS_DEPLOY_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(demo.PRESETS, "micro", MICRO)
    return tmp_path / "home"


def test_held_out_files_never_train_the_target_and_the_split_is_seeded():
    train, draft, evaluation = demo.stdlib_files(demo.PRESETS["default"])
    assert draft and evaluation
    assert not (set(train) & set(draft)) and not (set(train) & set(evaluation)) and not (set(draft) & set(evaluation))
    assert demo.stdlib_files(demo.PRESETS["default"]) == (train, draft, evaluation)
    other = demo.stdlib_files(demo.TargetRecipe(seed=1))
    assert other[2] != evaluation


def test_builds_a_hugging_face_directory_once_and_reuses_it(micro):
    path = demo.cached_target("micro", progress=False)
    report = json.loads((path / demo.RECIPE_FILE).read_text())
    assert path.parent == micro / "targets"
    assert report["validation_loss"] > 0 and report["draft_files"] and report["eval_files"]
    target = load_target(path, "fp32")  # an ordinary HF directory: config, safetensors, tokenizer
    assert target.config.vocab_size == MICRO.vocab_size and target.tokenizer is not None
    assert target.tokenizer.decode(target.tokenizer("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert demo.cached_target("micro", progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_a_corrupted_cache_entry_is_rebuilt_identically(micro):
    path = demo.cached_target("micro", progress=False)
    original = json.loads((path / demo.RECIPE_FILE).read_text())["weights_sha256"]
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert demo.cached_target("micro", progress=False) == path
    assert file_sha256(weights) == original  # deterministic given the seed: the same weights again


def test_unknown_preset_is_refused(micro):
    with pytest.raises(HassDeployError, match="unknown preset"):
        demo.cached_target("huge")
