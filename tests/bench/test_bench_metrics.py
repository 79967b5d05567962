"""The benchmark's metric definitions against hand-computed values (metrics.py's docstring states them)."""

import numpy as np
import pytest

from hass_deploy.bench.metrics import (Spread, depth_acceptance, first_mismatch, macro_tau, median_speedup,
                                       prompt_tau, quantile, speedup_of_means)
from hass_deploy.bench.results import PromptRun, summarise


def test_tau_is_the_macro_average_over_prompts():
    # Prompt 1: rounds accept 0, 1, 2 -> (1 + 2 + 3) / 3 = 2; prompt 2: one round of 3 -> 4; prompt 3 no round.
    assert prompt_tau([0, 1, 2]) == 2.0
    assert prompt_tau([]) is None
    assert macro_tau([[0, 1, 2], [3], []]) == pytest.approx(3.0)  # (2 + 4) / 2
    # Not tokens / rounds over all prompts, which would be (1 + 2 + 3 + 4) / 4 = 2.5.
    assert macro_tau([[0, 1, 2], [3]]) != pytest.approx(2.5)
    assert macro_tau([[], []]) is None


def test_depth_acceptance_is_conditional_and_pooled_over_rounds():
    # Tried at depth 1/2/3: 3+2 / 2 / 1 rounds; accepted there: 2+1 / 1 / 0.
    attempts = [[3, 2, 1], [2]]
    accepts = [[2, 1, 0], [1]]
    assert depth_acceptance(attempts, accepts) == pytest.approx((3 / 5, 1 / 2, 0.0))
    assert depth_acceptance([], []) == ()


def test_quantiles_iqr_and_spread_match_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert quantile(values, 0.25) == pytest.approx(1.75)
    assert quantile(values, 0.75) == pytest.approx(3.25)
    spread = Spread.of(values)
    assert (spread.median, spread.q1, spread.q3, spread.iqr, spread.mean) == pytest.approx((2.5, 1.75, 3.25, 1.5, 2.5))
    rng = np.random.default_rng(0)
    sample = list(rng.normal(size=17))
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert quantile(sample, q) == pytest.approx(np.percentile(sample, 100 * q))
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_speedup_definitions():
    spec, plain = [30.0, 10.0, 12.0], [10.0, 10.0, 4.0]
    # The paper's: mean(spec) / mean(plain) = (52 / 3) / 8.
    assert speedup_of_means(spec, plain) == pytest.approx(52 / 24)
    # The median of paired ratios 3, 1, 3.
    assert median_speedup(spec, plain) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        median_speedup([1.0], [1.0, 2.0])


def test_first_mismatch():
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2, 4], [1, 2, 3]) == 2
    assert first_mismatch([1, 2], [1, 2, 3]) == 2  # a shorter output differs where it stops
    assert first_mismatch([], []) is None


def _run(method, new_tokens, wall_s, accepts=(), attempts=(), accepted=(), matches=None, index=0):
    return PromptRun(prompt_set="s", index=index, question_id=index, method=method, prompt_tokens=5,
                     new_tokens=new_tokens, wall_s=wall_s, accept_lengths=tuple(accepts),
                     depth_attempts=tuple(attempts), depth_accepts=tuple(accepted), stop_reason="max_new_tokens",
                     matches_plain=matches, first_mismatch=None if matches in (None, True) else 0)


def test_summary_pairs_prompts_with_plain_decoding():
    plain = [_run("plain", 10, 1.0, index=0), _run("plain", 10, 0.5, index=1)]  # 10 and 20 tok/s
    draft = [_run("draft", 10, 0.5, accepts=[1, 1], attempts=[2, 2], accepted=[2, 0], matches=True, index=0),
             _run("draft", 10, 0.5, accepts=[0, 2], attempts=[2, 1], accepted=[1, 1], matches=False, index=1)]
    s = summarise(draft, plain, "draft", checked=True)
    assert s.tau == pytest.approx((2.0 + 2.0) / 2)
    assert s.depth_acceptance == pytest.approx((3 / 4, 1 / 3))
    assert s.tokens_per_s.median == pytest.approx(20.0)
    assert s.speedup == pytest.approx(20.0 / 15.0)
    assert s.speedup_median == pytest.approx(1.5)  # ratios 2 and 1
    assert s.mismatched == ("s#1",) and s.identical is False
    p = summarise(plain, plain, "plain", checked=True)
    assert p.tau is None and p.speedup is None and p.identical is None
    sampled = summarise(draft, plain, "draft", checked=False)
    assert sampled.identical is None
