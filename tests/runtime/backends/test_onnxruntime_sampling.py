"""Speculative sampling through ONNX Runtime is lossless: the same chi-square test as the torch backend
(`tests/runtime/test_decoder_sampling.py`, whose target, exact distribution and test are reused), on the
exported 6-token target with its exported draft head and with an oracle draft over the exported target."""

from __future__ import annotations

import pytest

from conftest import OracleDraft
from ort_artifacts import exported
from runtime.test_decoder_sampling import PROMPT, TREE, chi_square_pvalue, exact_joint, peaked_target  # noqa: F401
from hass_deploy.config import GenerationConfig, SamplingConfig
from hass_deploy.export.config import ExportConfig
from hass_deploy.models.checkpoint import init_draft
from hass_deploy.runtime.backends import open_backends
from hass_deploy.runtime.decoder import SpeculativeDecoder

SAMPLES = 1500  # fewer than the torch test's 2500: each draw runs a dozen ORT steps; still p > 1e-3 to pass


@pytest.fixture(scope="module")
def ort_pair(peaked_target, tmp_path_factory):
    draft = init_draft(peaked_target, seed=3)
    config = ExportConfig(max_seq_len=64, max_tree_tokens=16, max_top_k=4, prefill_chunk=8)
    artifacts = exported(tmp_path_factory.getbasetemp() / "onnx", "peaked-fp32", peaked_target, draft, config)
    return open_backends("onnxruntime", peaked_target, draft, 64, TREE.draft_rows, artifacts)


def draws(decoder, sampling: SamplingConfig) -> list[tuple[int, ...]]:
    return [tuple(decoder.generate(PROMPT, GenerationConfig(max_new_tokens=3, sampling=sampling, tree=TREE,
                                                            seed=seed)).output_ids) for seed in range(SAMPLES)]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["t1-exported-draft", "t0.7-topk4-oracle-draft"])
def test_speculative_sampling_through_onnxruntime_matches_exact_distribution(case, peaked_target, ort_pair):
    ort_target, ort_draft = ort_pair
    if case == "t1-exported-draft":
        sampling, draft = SamplingConfig(temperature=1.0), ort_draft
    else:
        sampling = SamplingConfig(temperature=0.7, top_k=4)
        draft = OracleDraft(peaked_target, PROMPT[0], 64 + TREE.draft_rows, noise=0.3)
    samples = draws(SpeculativeDecoder(ort_target, draft), sampling)
    assert chi_square_pvalue(samples, exact_joint(peaked_target, sampling)) > 1e-3
