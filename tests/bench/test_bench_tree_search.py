"""`--tree auto`'s pure parts: the effective tree, the candidate grid, the overhead fit, the cost model and
the chooser, on synthetic cost curves and acceptance."""

import pytest

from hass_deploy.bench.config import TreeSearchConfig
from hass_deploy.bench.costs import CostCurve, _interpolate
from hass_deploy.bench.tree_search import (RoundOverhead, candidate_grid, choose_tree, effective_tree, fit_overhead,
                                           grid_envelope, predict_generation_tokens_per_s, predict_tokens_per_s,
                                           rank_candidates, round_ms)
from hass_deploy.config import TreeConfig
from hass_deploy.errors import ConfigError

CURVE = CostCurve(context=100, target_ms=((1, 10.0), (2, 11.0), (4, 12.0), (8, 16.0)),
                  draft_ms=((1, 1.0), (2, 1.5), (4, 2.0)), prefill_ms=20.0, draft_prefill_ms=4.0, repeats=5)
OVERHEAD = RoundOverhead(base_ms=1.0, per_level_ms=0.5, plain_ms=0.5)
CHAIN_1 = TreeConfig(tokens=2, depth=1, top_k=1)
CHAIN_3 = TreeConfig(tokens=4, depth=3, top_k=1)
TREE_8 = TreeConfig(tokens=8, depth=4, top_k=2)


def test_interpolation_is_piecewise_linear_and_extrapolates():
    points = ((1, 10.0), (2, 11.0), (4, 12.0))
    assert _interpolate(points, 3) == pytest.approx(11.5)
    assert _interpolate(points, 8) == pytest.approx(14.0)  # slope 0.5 / row past the last point
    assert _interpolate(points, 0) == pytest.approx(9.0)
    assert _interpolate(((4, 3.0),), 10) == 3.0


def test_effective_tree_caps_depth_by_budget_and_budget_by_pool():
    assert effective_tree(TreeConfig(tokens=16, depth=2, top_k=2)) == TreeConfig(tokens=7, depth=2, top_k=2)
    assert effective_tree(TreeConfig(tokens=3, depth=5, top_k=2)) == TreeConfig(tokens=3, depth=2, top_k=2)
    assert effective_tree(TreeConfig(tokens=9, depth=4, top_k=1)) == TreeConfig(tokens=5, depth=4, top_k=1)
    assert effective_tree(TREE_8) == TREE_8


def test_candidate_grid_is_distinct_effective_and_within_limits():
    search = TreeSearchConfig()
    grid = candidate_grid(search)
    assert len(grid) == len(set(grid)) > 10
    assert all(effective_tree(t) == t and t.top_k <= t.tokens - 1 for t in grid)
    assert {TreeConfig(d + 1, d, 1) for d in search.chain_depths} <= set(grid)
    chains = candidate_grid(search, chains_only=True)
    assert set(chains) == {t for t in grid if t.top_k == 1} and {t.depth for t in chains} >= set(search.chain_depths)
    limited = candidate_grid(search, max_tokens=6, max_top_k=2, max_draft_rows=6)
    assert limited and all(t.tokens <= 6 and t.top_k <= 2 and t.draft_rows <= 6 for t in limited)
    envelope = grid_envelope(limited)
    assert all(t.draft_rows <= envelope.draft_rows for t in limited)
    assert candidate_grid(search, max_tokens=1) == ()


def test_overhead_fit_is_a_line_through_group_medians():
    samples = [(0, 1.0), (1, 1.5), (2, 2.0), (2, 100.0), (2, 2.0)]  # one wild sample at 2 levels
    fit = fit_overhead(samples, [0.3, 0.5, 0.4])
    assert (fit.base_ms, fit.per_level_ms, fit.plain_ms) == pytest.approx((1.0, 0.5, 0.4))
    flat = fit_overhead([(1, 2.0), (1, 4.0)], [])
    assert (flat.base_ms, flat.per_level_ms, flat.plain_ms) == pytest.approx((3.0, 0.0, 0.0))
    # A correction may fall with depth (isolated draft steps timing slower than in the loop).
    decreasing = fit_overhead([(0, 3.0), (2, 1.0)], [-1.0])
    assert (decreasing.base_ms, decreasing.per_level_ms, decreasing.plain_ms) == pytest.approx((3.0, -1.0, -1.0))
    # The prediction never lets a negative correction eat the steps.
    assert round_ms(CHAIN_3, 2.0, CURVE, RoundOverhead(-1e3, 0.0, -1e3)) == pytest.approx(0.1 * (12 + 1.5 + 2))
    assert predict_tokens_per_s(None, 1.0, CURVE, RoundOverhead(0.0, 0.0, -1e3)) == pytest.approx(1e3 / 1.0)


def test_round_cost_model_by_hand():
    # chain depth 1: target(2) 11 + draft(tau 1.6) 1.3 + no level + base 1 = 13.3 ms
    assert round_ms(CHAIN_1, 1.6, CURVE, OVERHEAD) == pytest.approx(13.3)
    # chain depth 3: target(4) 12 + draft(2.2) 1.55 + 2 levels x draft(1) 1 + 1 + 2 x 0.5 = 17.55 ms
    assert round_ms(CHAIN_3, 2.2, CURVE, OVERHEAD) == pytest.approx(17.55)
    # tree 8/4/2: target(8) 16 + draft(2.5) 1.625 + 3 x draft(2) 1.5 + 1 + 3 x 0.5 = 24.625 ms
    assert round_ms(TREE_8, 2.5, CURVE, OVERHEAD) == pytest.approx(24.625)
    assert predict_tokens_per_s(CHAIN_3, 2.2, CURVE, OVERHEAD) == pytest.approx(1e3 * 2.2 / 17.55)
    assert predict_tokens_per_s(None, 1.0, CURVE, OVERHEAD) == pytest.approx(1e3 / 10.5)


def test_generation_prediction_adds_prefill():
    # Plain: prefill 20 ms x 50/100 = 10 ms, then 10 steps of 10.5 ms -> 11 tokens in 115 ms.
    assert predict_generation_tokens_per_s(None, 1.0, CURVE, OVERHEAD, 50, 11) == pytest.approx(11 / 0.115)
    # Chain 3, tau 2.2: 10 ms + draft prefill 2 ms + (10 / 2.2) rounds x 17.55 ms.
    expected = 11 / ((10 + 2 + 10 / 2.2 * 17.55) / 1e3)
    assert predict_generation_tokens_per_s(CHAIN_3, 2.2, CURVE, OVERHEAD, 50, 11) == pytest.approx(expected)


def test_chooser_maximises_predicted_tokens_per_s():
    taus = {CHAIN_1: 1.6, CHAIN_3: 2.2, TREE_8: 2.5}  # 120.3, 125.4 and 101.5 tok/s
    best = choose_tree(taus, CURVE, OVERHEAD)
    assert best.tree == CHAIN_3
    assert best.predicted_tokens_per_s == pytest.approx(1e3 * 2.2 / 17.55)
    ranked = rank_candidates(taus, CURVE, OVERHEAD)
    assert [c.tree for c in ranked] == [CHAIN_3, CHAIN_1, TREE_8]
    # Better acceptance for the wide tree flips the choice: round 24.875 ms at tau 3.5 -> 140.7 tok/s.
    assert choose_tree({**taus, TREE_8: 3.5}, CURVE, OVERHEAD).tree == TREE_8
    # A target whose big steps cost much more makes the chain win even then.
    steep = CostCurve(context=100, target_ms=((1, 10.0), (2, 11.0), (4, 12.0), (8, 40.0)), draft_ms=CURVE.draft_ms,
                      prefill_ms=20.0, draft_prefill_ms=4.0, repeats=5)
    assert choose_tree({**taus, TREE_8: 3.5}, steep, OVERHEAD).tree == CHAIN_3


def test_chooser_breaks_ties_toward_the_cheaper_tree_and_refuses_nothing():
    cheap, dear = TreeConfig(tokens=3, depth=2, top_k=1), TreeConfig(tokens=3, depth=2, top_k=2)
    flat = CostCurve(context=10, target_ms=((1, 1.0),), draft_ms=((1, 1.0),), prefill_ms=1.0, draft_prefill_ms=1.0,
                     repeats=1)
    assert choose_tree({dear: 2.0, cheap: 2.0}, flat, RoundOverhead(0.0, 0.0, 0.0)).tree == cheap
    with pytest.raises(ConfigError):
        choose_tree({}, CURVE, OVERHEAD)
