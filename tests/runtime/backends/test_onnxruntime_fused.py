"""What is particular to the fused ONNX Runtime graphs (export/fused.py; the step contract, greedy identity with
`transformers` and the KV rows written in place are `test_contract.py`'s, over every backend): which exports get
them, an int8 target and an int4 one (a GGUF's own Q4_0 / Q4_1 blocks) that decode speculatively exactly as they
decode plainly (lossless w.r.t. the quantised target), close to fp32; `validate` checks them."""

from __future__ import annotations

import pytest
import torch

from conftest import OracleDraft, make_decoder
from ort_artifacts import CONFIG, exported
from runtime.backends.test_contract import TREES
from runtime.test_decoder import greedy, prompt
from hass_deploy.config import TreeConfig
from hass_deploy.errors import ConfigError
from hass_deploy.export.config import ExportConfig
from hass_deploy.manifest import read_manifest
from hass_deploy.export.onnx import export_onnx
from hass_deploy.export.parity import validate_artifacts
from hass_deploy.runtime.backends import open_backends
from hass_deploy.runtime.decoder import SpeculativeDecoder

INT8 = ExportConfig(**{**CONFIG.__dict__, "target_quantization": "int8", "draft_quantization": "int8"})


def ort(target, draft, artifacts_dir, graphs="fused", max_len=256, tree=TreeConfig()):
    return open_backends("onnxruntime", target, draft, max_len, tree.draft_rows, artifacts_dir, ort_graphs=graphs)


def test_fused_graphs_are_written_where_ort_can_run_them(targets, fusable_targets, fused_artifacts, tmp_path):
    manifest = read_manifest(fused_artifacts["qwen3"])
    assert set(manifest.graphs) == {"target", "draft", "target_ort", "draft_ort", "target_ort_batch", "draft_ort_batch"}
    assert manifest.graphs["target_ort_batch"].slots == 3 and manifest.graphs["target_ort"].slots is None
    standard, fused = manifest.graphs["target"], manifest.graphs["target_ort"]
    assert fused.kv_update == "in_graph" and standard.kv_update == "runtime"
    assert "com.microsoft::GroupQueryAttention" in fused.operators and fused.quantization is None
    assert [t.name for t in fused.inputs[:5]] == [t.name for t in standard.inputs[:5]]
    # head_dim 12 cannot run GroupQueryAttention: the standard graphs only, and the runtime runs those.
    export_onnx(targets["llama"], None, tmp_path / "narrow", CONFIG)
    assert set(read_manifest(tmp_path / "narrow").graphs) == {"target"}
    with pytest.raises(ConfigError, match="multiple of 16"):
        export_onnx(targets["llama"], None, tmp_path / "asked", ExportConfig(**{**CONFIG.__dict__, "ort_graphs": True}))
    with pytest.raises(ConfigError, match="graphs are fp32"):
        ExportConfig(dtype="fp16", ort_graphs=True)
    with pytest.raises(ConfigError, match="--target-quantization"):
        ExportConfig(target_quantization="int8", ort_graphs=False)
    with pytest.raises(ConfigError, match="no fused"):
        ort(targets["llama"], None, tmp_path / "narrow", graphs="fused")
    assert ort(fusable_targets["qwen3"], None, fused_artifacts["qwen3"])[0].tree_rows_exact  # fp32: trees


def assert_lossless_against_plain(target, draft, out, seed: int):
    """Speculative decoding of an export's (quantised) fused target, with its draft and with an oracle, equals plain
    decoding of the same graph, for three tree shapes and a short and a chunked prompt; returns the last target."""
    for tree in (TREES["chain"], TREES["wide"], TREES["deep"]):
        quantized_target, quantized_draft = ort(target, draft, out, tree=tree)
        oracle = OracleDraft(target, 0, 256 + tree.draft_rows, noise=0.3)
        for length in (3, 21):
            ids = prompt(length, seed=seed + length)
            config = greedy(tree, max_new_tokens=40, eos=())
            plain = SpeculativeDecoder(quantized_target, None).generate(ids, config).output_ids
            oracle.first_token = ids[0]
            assert SpeculativeDecoder(quantized_target, quantized_draft).generate(ids, config).output_ids == plain
            assert SpeculativeDecoder(quantized_target, oracle).generate(ids, config).output_ids == plain
    return quantized_target


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_int8_target_is_lossless_against_its_own_plain_decoding(arch, fusable_targets, fusable_drafts, tmp_path):
    """Speculative decoding of the int8 target equals plain decoding of the int8 target, token for token, with
    trees of several shapes; its logits stay close to fp32's (it is a different, quantised model)."""
    target, draft = fusable_targets[arch], fusable_drafts[arch]
    out = exported(tmp_path, arch, target, draft, INT8)
    manifest = read_manifest(out)
    assert manifest.target_quantization == "int8" and manifest.graphs["target_ort"].quantization == "int8"
    assert "com.microsoft::MatMulNBits" in manifest.graphs["target_ort"].operators
    assert manifest.graphs["target"].quantization is None  # the standard graphs stay the fp32 reference
    int8_target = assert_lossless_against_plain(target, draft, out, seed=400)
    assert not int8_target.tree_rows_exact  # it verifies chains (test_decoder.py), whose rows are exact (below)
    ids = torch.tensor([prompt(12, seed=1)])
    quantized = int8_target.step(ids, torch.arange(12)[None], 0, None).logits
    reference = make_decoder(target).target.step(ids, torch.arange(12)[None], 0, None).logits
    assert not torch.equal(quantized, reference)
    assert float((quantized - reference).abs().max()) < 0.05 * float(reference.abs().max())


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_int4_target_is_lossless_against_its_own_plain_decoding(variant, int4_exports):
    """The GGUF's own blocks (Q4_0 and Q4_1 layers, a Q8_0 or Q4_1 lm_head, an F16 weight left fp32): speculative
    decoding equals plain decoding of the int4 graph, token for token, with trees of several shapes. Its weights are
    the converted target's exactly; only the products' int8 activation rounding differs, so its logits stay close."""
    target, draft, out = int4_exports[variant]
    manifest = read_manifest(out)
    assert manifest.target_quantization == "int4" and manifest.graphs["target_ort"].quantization == "int4"
    assert manifest.graphs["target"].quantization is None  # the standard graphs stay the fp32 reference
    int4_target = assert_lossless_against_plain(target, draft, out, seed=500)
    assert not int4_target.tree_rows_exact
    ids = torch.tensor([prompt(12, seed=1)])
    quantized = int4_target.step(ids, torch.arange(12)[None], 0, None).logits
    reference = make_decoder(target).target.step(ids, torch.arange(12)[None], 0, None).logits
    assert float((quantized - reference).abs().max()) < 0.05 * float(reference.abs().max())


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_rows_do_not_depend_on_the_step_size(quantization, fusable_targets, fusable_drafts, int4_exports,
                                                       tmp_path):
    """What a quantised target's lossless decoding rests on (OrtTarget pads one-row steps to two): a row's logits in
    a plain step are bit for bit those of the same row in a chain of any length, so a token accepted from a tree is
    the token plain decoding would have produced, even at a near-tie that int8 activation rounding could tip. int4:
    the Q4_1 layers' min products too."""
    if quantization == "int8":
        target = fusable_targets["qwen2"]
        out = exported(tmp_path, "qwen2", target, fusable_drafts["qwen2"], INT8)
    else:
        target, _, out = int4_exports["untied"]
    prefix, chain = torch.tensor([prompt(30, seed=9)]), torch.tensor([prompt(16, seed=10)])

    def fresh():
        backend, _ = ort(target, None, out)
        backend.step(prefix, torch.arange(30)[None], 0, None, last_only=True)
        return backend

    plain, rows = fresh(), []
    for i in range(16):
        rows.append(plain.step(chain[:, i:i + 1], torch.tensor([[30 + i]]), 30 + i, None).logits[0, 0])
    for length in (2, 5, 11, 16):
        logits = fresh().step(chain[:, :length], torch.arange(30, 30 + length)[None], 30,
                              torch.ones(1, length, length, dtype=torch.bool).tril()).logits[0]
        assert all(torch.equal(logits[i], rows[i]) for i in range(length)), length


def test_validate_checks_the_fused_graphs(fusable_dirs, fusable_targets, fusable_drafts, fused_artifacts, tmp_path):
    draft_dir = tmp_path / "draft"
    from hass_deploy.models.checkpoint import DraftMetadata, save_draft, target_identity

    save_draft(fusable_drafts["qwen3"], draft_dir, DraftMetadata(format_version=1, recipe="random-init",
                                                                 target=target_identity(fusable_targets["qwen3"])))
    # The first prompt's prefill (70 rows) is longer than the tree budget (64) and the prefill chunk (8): replayed
    # as a causal step, chunked, not refused as a tree.
    prompts = [prompt(70, seed=21), prompt(5, seed=22)]
    report = validate_artifacts(fused_artifacts["qwen3"], fusable_dirs["qwen3"], draft_dir, prompts=prompts,
                                max_new_tokens=16)
    names = [check.name for check in report.checks]
    assert report.passed, report.render()
    assert any(n.startswith("target_ort values") for n in names) and any(n.startswith("draft_ort") for n in names)
    assert "ORT fused speculative == ORT fused plain" in names and "ORT fused speculative == PyTorch plain" in names
