"""Speculative sampling is lossless: on a tiny vocabulary, the joint distribution of the first three generated
tokens matches the target's own warped distribution, computed exactly by enumeration.

Each case draws N samples with fixed seeds (so the test is deterministic) and applies a chi-square test at
p > 1e-3, i.e. a 1-in-1000 false-failure rate for a fresh choice of seeds. The same test on plain sampling
guards the reference path, and a deliberately biased sampler is shown to fail it (the test has power). Trees
come from draft heads (random, oracle, adversarial), from prompt lookup over a repetitive prompt, and from both
at once (hybrid: mixed trees, and rounds in which the draft head does not run).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from conftest import OracleDraft, make_decoder
from hass_deploy.config import GenerationConfig, HybridConfig, LookupConfig, SamplingConfig, TreeConfig
from hass_deploy.models.checkpoint import init_draft
from hass_deploy.models.loading import load_target
from hass_deploy.models.random_target import random_hf_model
from hass_deploy.runtime import tree as trees
from hass_deploy.runtime.sampling import target_probs

VOCAB, NEW_TOKENS, SAMPLES, PROMPT = 6, 3, 2500, [1, 4, 2]
TREE = TreeConfig(tokens=6, depth=3, top_k=3)
# Prompt lookup needs repetition to propose: 1 4 and 4 2 recur with different continuations, so its trees branch,
# and about half the rounds accept two drafted tokens on the peaked target below.
LOOKUP_PROMPT, LOOKUP = [1, 4, 2, 1, 4, 3, 1, 5, 2, 1, 4, 2], LookupConfig(tokens=6, depth=3)


@pytest.fixture(scope="module")
def peaked_target(tmp_path_factory):
    """A 6-token target whose next-token distributions are far from uniform (so errors are visible)."""
    model = random_hf_model("llama", "tiny", seed=11, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=None)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)
    path = tmp_path_factory.mktemp("peaked")
    model.save_pretrained(path)
    return load_target(path)


def exact_joint(target, sampling: SamplingConfig, prompt: list[int] = PROMPT) -> dict[tuple[int, ...], float]:
    """P(x1, x2, x3 | prompt) under the warped target, by enumerating every prefix."""
    def next_probs(prefix):
        ids = torch.tensor([prompt + list(prefix)])
        with torch.no_grad():
            logits = target.module.logits(target.module(ids, torch.arange(ids.shape[1])[None]))[0, -1]
        return target_probs(logits, sampling)

    joint = {}
    for prefix in itertools.product(range(VOCAB), repeat=NEW_TOKENS - 1):
        p = 1.0
        for i in range(NEW_TOKENS):
            if i == NEW_TOKENS - 1:
                last = next_probs(prefix)
                for token in range(VOCAB):
                    joint[prefix + (token,)] = p * float(last[token])
            else:
                p *= float(next_probs(prefix[:i])[prefix[i]])
    return joint


def chi_square_pvalue(samples: list[tuple[int, ...]], joint: dict) -> float:
    """Chi-square goodness of fit; outcomes with expected count < 5 are pooled into one bin."""
    counts = {key: 0 for key in joint}
    for s in samples:
        counts[s] += 1
    n = len(samples)
    common = [key for key, p in joint.items() if p * n >= 5]
    rare = [key for key, p in joint.items() if p * n < 5]
    observed = [counts[key] for key in common]
    expected = [joint[key] * n for key in common]
    rare_observed, rare_expected = sum(counts[k] for k in rare), sum(joint[k] for k in rare) * n
    if rare_expected > 0:
        observed.append(rare_observed)
        expected.append(rare_expected)
    elif rare_observed:
        return 0.0  # an outcome of probability zero was drawn
    return float(chisquare(observed, expected, sum_check=False).pvalue)


def draws(decoder, sampling: SamplingConfig, prompt: list[int] = PROMPT, lookup: LookupConfig | None = None,
          accepted: list[int] | None = None, hybrid: HybridConfig = HybridConfig()) -> list[tuple[int, ...]]:
    """SAMPLES generations of NEW_TOKENS tokens (seeds 0..); every round's accept length goes to `accepted`."""
    out = []
    for seed in range(SAMPLES):
        config = GenerationConfig(max_new_tokens=NEW_TOKENS, sampling=sampling, tree=TREE, lookup=lookup, seed=seed,
                                  hybrid=hybrid)
        result = decoder.generate(prompt, config)
        out.append(tuple(result.output_ids))
        if accepted is not None:
            accepted.extend(result.accept_lengths)
    return out


CASES = {
    "t1-random-draft": (SamplingConfig(temperature=1.0), "random"),
    "t0.7-topk4-good-draft": (SamplingConfig(temperature=0.7, top_k=4), "good"),
    "t1.3-topp0.8-adversarial-draft": (SamplingConfig(temperature=1.3, top_p=0.8), "adversarial"),
    "t1-topk3-topp0.9-good-draft": (SamplingConfig(temperature=1.0, top_k=3, top_p=0.9), "good"),
    # A reduced draft vocabulary (models/draft.py): tokens 1, 3 and 4 have draft probability 0, never proposed,
    # yet must come out as often as the target samples them (from the residuals).
    "t1-reduced-vocab-draft": (SamplingConfig(temperature=1.0), "reduced"),
    "t0.7-topk4-reduced-vocab-draft": (SamplingConfig(temperature=0.7, top_k=4), "reduced"),
}


@pytest.mark.parametrize("case", CASES)
def test_speculative_sampling_matches_exact_distribution(case, peaked_target):
    sampling, kind = CASES[case]
    if kind == "random":
        draft = init_draft(peaked_target, seed=3)
    elif kind == "reduced":
        draft = init_draft(peaked_target, seed=3, vocabulary=torch.tensor([0, 2, 5]))
    else:
        draft = OracleDraft(peaked_target, PROMPT[0], 64 + TREE.draft_rows, noise=0.3,
                            adversarial=kind == "adversarial")
    decoder = make_decoder(peaked_target, draft, max_len=64)
    samples = draws(decoder, sampling)
    assert chi_square_pvalue(samples, exact_joint(peaked_target, sampling)) > 1e-3


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=4)],
                         ids=["t1", "t0.7-topk4"])
def test_prompt_lookup_sampling_matches_exact_distribution(sampling, peaked_target):
    """Lookup trees through the same loop and acceptance: no draft at all, trees copied from the history."""
    accepted: list[int] = []
    samples = draws(make_decoder(peaked_target, max_len=64), sampling, LOOKUP_PROMPT, LOOKUP, accepted)
    assert sum(a >= 2 for a in accepted) > SAMPLES // 4, "lookup should often get two drafted tokens accepted"
    assert chi_square_pvalue(samples, exact_joint(peaked_target, sampling, LOOKUP_PROMPT)) > 1e-3


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_k=4)],
                         ids=["t1", "t0.7-topk4"])
def test_hybrid_sampling_matches_exact_distribution(sampling, peaked_target, monkeypatch):
    """Mixed trees: the draft head's top-k candidates and lookup's copied ones, reranked into one tree by scores
    calibrated on earlier rounds' outcomes; acceptance reads only p, so the law is exact all the same."""
    merged_trees = []
    merge = trees.merge_candidates

    def recording_merge(*args):
        merged_trees.append(merge(*args))
        return merged_trees[-1]

    monkeypatch.setattr(trees, "merge_candidates", recording_merge)
    decoder = make_decoder(peaked_target, init_draft(peaked_target, seed=3), max_len=64)
    # A bar of 1 token a step, so that the draft runs on these 3-token generations (the default keeps it off where
    # lookup's chains are long).
    samples = draws(decoder, sampling, LOOKUP_PROMPT, LOOKUP, hybrid=HybridConfig(tokens_per_step=1.0))
    mixed = sum(any(m & 1 for m in t.sources) and any(m & 2 for m in t.sources) for t in merged_trees)
    assert mixed > SAMPLES // 4, "many trees should hold candidates of both drafters"
    assert chi_square_pvalue(samples, exact_joint(peaked_target, sampling, LOOKUP_PROMPT)) > 1e-3


def test_plain_sampling_matches_exact_distribution_and_the_test_has_power(peaked_target):
    sampling = SamplingConfig(temperature=0.8, top_p=0.95)
    joint = exact_joint(peaked_target, sampling)
    samples = draws(make_decoder(peaked_target), sampling)
    assert chi_square_pvalue(samples, joint) > 1e-3
    # The same samples judged against the unwarped distribution must fail: the test can tell them apart.
    assert chi_square_pvalue(samples, exact_joint(peaked_target, SamplingConfig(temperature=1.0))) < 1e-3
