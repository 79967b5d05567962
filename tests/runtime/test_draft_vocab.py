"""A reduced draft vocabulary (models/draft.py): the draft scores N of the target's V tokens. Its token map is
EAGLE-3's and survives a save and load; every backend proposes only those N tokens, with the log-probabilities of
the restricted head, and decodes exactly as plain decoding does, greedy (here) and sampled
(test_decoder_sampling.py), though the target's own choice is often outside the N."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import make_decoder
from ort_artifacts import CONFIG, OrtEngine, exported
from runtime.test_decoder import greedy, prompt
from hass_deploy.config import Phase, TrainConfig, TreeConfig
from hass_deploy.errors import ConfigError, ModelLoadError
from hass_deploy.export.onnx import export_onnx
from hass_deploy.export.parity import validate_artifacts
from hass_deploy.manifest import read_manifest
from hass_deploy.models.checkpoint import DraftMetadata, FORMAT_VERSION, init_draft, load_draft, save_draft
from hass_deploy.models.draft import DraftHead
from hass_deploy.models.loading import load_target
from hass_deploy.models.random_target import random_hf_model
from hass_deploy.runtime.backends import open_backends
from hass_deploy.runtime.backends.tensorrt import TrtDraft, TrtTarget
from hass_deploy.runtime.decoder import SpeculativeDecoder
from hass_deploy.training.data import HiddenStateDataset, frequent_tokens
from hass_deploy.training.extract import DataConfig, generate_data
from hass_deploy.training.trainer import train

N = 12
BACKENDS = ("torch", "torch-static", "onnxruntime-standard", "onnxruntime-fused", "tensorrt-ort")
TREES = (TreeConfig(tokens=5, depth=4, top_k=1), TreeConfig(tokens=12, depth=3, top_k=4))
EXPORT = replace(CONFIG, max_top_k=8)
VOCAB = 64


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """arch -> (target, a draft trained with --draft-vocab N on the target's own greedy text, its export), for
    llama and qwen2 (hidden 64 for the fused graphs; untied heads: a tiny tied one only repeats its input). Its N tokens are the most frequent of
    that text: most of the target's choices, not all."""
    made = {}
    for seed, arch in enumerate(("llama", "qwen2")):
        root = tmp_path_factory.mktemp(f"reduced-{arch}")
        model = random_hf_model(arch, "tiny", seed=seed, vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=None)
        with torch.no_grad():
            model.lm_head.weight.mul_(20.0)  # opinions, so a draft can learn them
        model.save_pretrained(root / "target")
        target = load_target(root / "target")
        lines = []
        for i in range(32):
            start = prompt(4, seed=1000 + i, vocab=VOCAB)
            output = make_decoder(target).generate(start, greedy(max_new_tokens=28, eos=())).output_ids
            lines.append(json.dumps({"ids": start + output}))
        (root / "data.jsonl").write_text("\n".join(lines) + "\n")
        generate_data(root / "target", root / "data.jsonl", root / "data",
                      DataConfig(format="ids", dtype="fp32", eval_fraction=0.1, shard_size=8))
        train(root / "target", root / "data", root / "draft",
              TrainConfig(phases=(Phase(epochs=4, lr=3e-3, topk_weight=1.0),), batch_size=4, precision="fp32",
                          topk=4, draft_vocab=N, eval_depth=2), progress=False)
        draft, _ = load_draft(root / "draft", target)
        made[arch] = (target, draft, exported(root, "export", target, draft, EXPORT), root)
    return made


def test_the_token_map_is_eagle3s_and_survives_save_and_load(fusable_targets, tmp_path):
    target = fusable_targets["llama"]
    ids = torch.tensor([3, 5, 6, 40, 90, 7, 1, 60, 61, 62, 63, 2])
    draft = init_draft(target, seed=1, vocabulary=ids)
    assert draft.draft_vocab == 12 and draft.d2t.dtype == torch.int64 and draft.t2d.dtype == torch.bool
    # EAGLE-3: draft index i is target token i + d2t[i]; t2d marks the N target tokens.
    assert (torch.arange(12) + draft.d2t).tolist() == sorted(ids.tolist())
    assert draft.t2d.nonzero().flatten().tolist() == sorted(ids.tolist())
    assert draft.target_ids(torch.tensor([[0, 11]])).tolist() == [[1, 90]]
    lm_head = target.module.lm_head
    assert torch.equal(draft.scoring_head(lm_head).weight, lm_head.weight[sorted(ids.tolist())])
    assert draft.scoring_head(lm_head) is not lm_head  # a copy of N rows

    out = save_draft(draft, tmp_path / "d", DraftMetadata(FORMAT_VERSION, "random-init", {}))
    assert json.loads((out / "config.json").read_text())["draft_vocab_size"] == 12
    assert torch.load(out / "token_map.pt", weights_only=True).tolist() == sorted(ids.tolist())
    loaded, _ = load_draft(out, target, dtype=torch.bfloat16)
    assert torch.equal(loaded.d2t, draft.d2t) and torch.equal(loaded.t2d, draft.t2d)
    assert loaded.fc.weight.dtype == torch.bfloat16 and loaded.d2t.dtype == torch.int64
    full, _ = load_draft(save_draft(init_draft(target), tmp_path / "full", DraftMetadata(1, "random-init", {})), target)
    assert full.draft_vocab is None and full.scoring_head(lm_head) is lm_head

    from safetensors.torch import load_file, save_file

    state = load_file(out / "model.safetensors")
    state["t2d"][0] = not state["t2d"][0]  # disagrees with d2t
    save_file(state, out / "model.safetensors")
    with pytest.raises(ModelLoadError, match="token map .* is inconsistent"):
        load_draft(out, target)
    with pytest.raises(ValueError, match="does not fit"):
        DraftHead(draft.config, draft_vocab=target.config.vocab_size + 1)
    with pytest.raises(ValueError, match="distinct"):
        draft.set_vocabulary(torch.tensor([1] * 12))


def _open(backend: str, target, draft, artifacts, tree: TreeConfig):
    if backend in ("torch", "torch-static"):
        return open_backends("torch", target, draft, 256, tree.draft_rows,
                             steps="static" if backend == "torch-static" else "eager")
    if backend == "tensorrt-ort":
        manifest = read_manifest(artifacts)
        return (TrtTarget(OrtEngine(artifacts, "target"), manifest, 256, "static"),
                TrtDraft(OrtEngine(artifacts, "draft"), manifest, 256 + tree.draft_rows, "static"))
    return open_backends("onnxruntime", target, draft, 256, tree.draft_rows, artifacts,
                         ort_graphs=backend.split("-")[1])


class Recording:
    """A draft backend that keeps every token it proposes."""

    def __init__(self, inner):
        self.inner, self.proposed = inner, set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, *args, **kwargs):
        out = self.inner.step(*args, **kwargs)
        self.proposed.update(out.tokens.flatten().tolist())
        return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reduced_draft_proposes_only_its_tokens_and_decodes_losslessly(backend, arch, reduced):
    target, draft, artifacts, root = reduced[arch]
    subset = set(draft.vocabulary().tolist())
    assert draft.vocabulary().tolist() == frequent_tokens(HiddenStateDataset(root / "data").token_counts(), N).tolist()
    plain = make_decoder(target)
    outside = accepted = 0
    for tree in TREES:
        target_backend, draft_backend = _open(backend, target, draft, artifacts, tree)
        recording = Recording(draft_backend)
        for length in (4, 19):
            ids = prompt(length, seed=70 + length, vocab=VOCAB)
            config = greedy(tree, max_new_tokens=32, eos=())
            expected = plain.generate(ids, config).output_ids
            result = SpeculativeDecoder(target_backend, recording).generate(ids, config)
            assert result.output_ids == expected
            outside += sum(token not in subset for token in expected)
            accepted += sum(result.accept_lengths)
        assert recording.proposed <= subset
    assert outside > 0 and accepted > 0  # the test exercises both kinds of round


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_reduced_draft_step_scores_the_restricted_head(backend, reduced):
    """Top tokens are target ids, and their log-probabilities are the log-softmax over the N rows alone."""
    target, draft, artifacts, _ = reduced["llama"]
    _, draft_backend = _open(backend, target, draft, artifacts, TreeConfig())
    steps = 6
    features = torch.randn(1, steps, target.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([prompt(steps, seed=3, vocab=VOCAB)])
    out = draft_backend.step(features, ids, torch.arange(steps)[None], 0, None, 8)
    with torch.no_grad():
        hidden = draft(features, ids, torch.arange(steps)[None])
        logits = target.module.lm_head(hidden)[..., draft.vocabulary()]  # [1, T, N]
        expected = torch.topk(torch.log_softmax(logits, dim=-1), 8, dim=-1)
    assert torch.equal(out.tokens.cpu(), draft.vocabulary()[expected.indices])
    torch.testing.assert_close(out.logprobs.cpu(), expected.values, atol=1e-4, rtol=1e-4)


def test_the_reduced_draft_graph_holds_n_rows_and_validates(reduced, tmp_path):
    import onnx

    target, draft, artifacts, root = reduced["llama"]
    manifest = read_manifest(artifacts)
    assert manifest.draft["draft_vocab"] == N
    for name in ("draft", "draft_ort"):
        model = onnx.load(artifacts / manifest.graphs[name].file, load_external_data=False)
        shapes = [tuple(init.dims) for init in model.graph.initializer]
        assert (N, target.config.hidden_size) in shapes or (target.config.hidden_size, N) in shapes
        assert (target.config.vocab_size, target.config.hidden_size) in shapes  # the embedding, not the head
    report = validate_artifacts(artifacts, root / "target", root / "draft", max_new_tokens=16)
    assert report.passed, report.render()
    with pytest.raises(ConfigError, match="fewer than --max-top-k"):
        export_onnx(target, init_draft(target, vocabulary=torch.arange(4)), tmp_path / "x", EXPORT)
