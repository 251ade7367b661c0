"""Certificate kinds: one interface, each kind's flags, the best-constant baseline, the inductive details."""
import pandas as pd
import pytest

from ssmooth.certify import kinds

RADII = [0.0, 0.5, 1.0]


def rows(radius, correct, predict=None, **extra):
    predict = predict if predict is not None else [1] * len(radius)
    return pd.DataFrame({"idx": range(len(radius)), "radius": radius, "correct": correct, "predict": predict, **extra})


def test_every_kind_says_whether_and_where_it_holds():
    assert (kinds.CONSTANT.sound, kinds.CONSTANT.setting) == (True, kinds.ANY_INPUT)
    assert (kinds.INDUCTIVE.sound, kinds.INDUCTIVE.setting) == (True, kinds.ANY_INPUT)
    assert (kinds.SAMPLEWISE_RAW.sound, kinds.SAMPLEWISE_RAW.setting) == (False, kinds.NOT_A_CERTIFICATE)
    for rule in ("fill", "halving", "lp"):
        k = kinds.kind(f"samplewise_{rule}")
        assert (k.sound, k.setting) == (True, kinds.THIS_TEST_SET) and "radius_raw" in k.columns
    assert "radius_selector" in kinds.INDUCTIVE.columns
    with pytest.raises(ValueError, match="unknown certificate kind 'samplewise_greedy'"):
        kinds.kind("samplewise_greedy")


def test_entry_counts_abstains_as_wrong_and_carries_the_flags():
    entry = kinds.INDUCTIVE.entry(rows([0.8, 0.3, 0.0, 1.2], [1, 1, 1, 0], predict=[1, 1, -1, 1]), RADII, x=3)
    assert entry["acr"] == pytest.approx((0.8 + 0.3) / 4)
    assert entry["kind"] == "inductive" and entry["sound"] and entry["setting"] == kinds.ANY_INPUT and entry["x"] == 3
    with pytest.raises(ValueError, match="predict"):
        kinds.CONSTANT.entry(pd.DataFrame({"radius": [0.1], "correct": [1]}), RADII)


def test_best_constant_picks_the_level_with_the_highest_acr_and_ties_go_to_the_smaller_level():
    by_sigma = {0.25: rows([0.2, 0.2], [1, 1]), 0.5: rows([0.6, 0.0], [1, 0]), 1.0: rows([0.1, 0.3], [1, 1])}
    entry = kinds.best_constant(by_sigma, RADII)
    assert entry["sigma"] == 0.5 and entry["acr"] == pytest.approx(0.3) and entry["kind"] == "constant_best"
    assert entry["acr_by_sigma"] == {"0.25": pytest.approx(0.2), "0.5": pytest.approx(0.3), "1": pytest.approx(0.2)}
    by_sigma[0.5] = rows([0.1, 0.3], [1, 1])  # now all three levels have ACR 0.2
    assert kinds.best_constant(by_sigma, RADII)["sigma"] == 0.25


def test_best_constant_refuses_levels_certified_on_different_points():
    other = rows([0.2], [1])
    other["idx"] = [7]
    with pytest.raises(ValueError, match="different points"):
        kinds.best_constant({0.25: rows([0.2], [1]), 0.5: other}, RADII)


def test_inductive_details_count_where_the_selector_limits_the_radius():
    r = rows([0.1, 0.4, 0.0, 0.0], [1, 1, 0, 0], predict=[2, 3, -1, -1],
             level=[1, 0, -1, 1], radius_selector=[0.1, 0.9, 0.0, 0.5], radius_classifier=[0.7, 0.4, 0.0, 0.0])
    d = kinds.inductive_details(r, [0.25, 0.5])
    assert d["selector_limits_share"] == 0.25 and d["selector_limits_share_of_certified"] == 0.5
    assert d["selector_abstain_rate"] == 0.25 and d["level_histogram"] == {"0.25": 1, "0.5": 2}
    assert d["mean_radius_selector"] == pytest.approx(0.5) and d["mean_radius_classifier"] == pytest.approx(0.55)
