"""Soundness of the transductive radius allocation (SPEC section 4), checked against brute force."""
import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmooth.certify.allocation import (
    RULES,
    AllocationError,
    allocate,
    allocate_radii,
    conflicting_pairs,
    verify_allocation,
)

LEVELS = (0.25, 0.5, 1.0)


def dense_distances(points):
    x = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    diff = x[:, None, :] - x[None, :, :]
    # Scaled, so that points 1e-308 apart are not at distance 0 (the square would underflow).
    scale = np.abs(diff).max(-1, initial=0.0)
    return scale * np.sqrt(((diff / np.where(scale > 0, scale, 1.0)[..., None]) ** 2).sum(-1))


def assert_sound(points, sigma, r, radius, answered=None):
    """Brute-force check, written without the module: box constraints, and for every different-level pair of
    answering points (radius cut to 0 included) disjoint balls and distinct centres."""
    sigma, radius = np.asarray(sigma), np.asarray(radius)
    answered = radius > 0 if answered is None else answered
    assert r.shape == radius.shape and r.dtype == np.float64
    assert np.all(np.isfinite(r)) and np.all(r >= 0) and np.all(r <= radius)
    assert not np.any(answered & (radius == 0)) and not np.any((r > 0) & ~answered)
    d = dense_distances(points)
    differ = sigma[:, None] != sigma[None, :]
    live = answered[:, None] & answered[None, :]
    ok = ((r[:, None] + r[None, :]) <= d) & (d > 0)
    assert np.all(ok | ~differ | ~live | np.eye(len(r), dtype=bool))


@st.composite
def problems(draw, max_points=10):
    t = draw(st.integers(2, max_points))
    dim = draw(st.integers(1, 3))
    # Coordinates on a coarse grid make duplicates and exact ties (d_ij == R_i + R_j) likely.
    coord = st.one_of(st.integers(-3, 3).map(float), st.floats(-3, 3, allow_nan=False, allow_subnormal=False))
    points = np.array(draw(st.lists(st.lists(coord, min_size=dim, max_size=dim), min_size=t, max_size=t)))
    sigma = np.array(draw(st.lists(st.sampled_from(LEVELS), min_size=t, max_size=t)))
    radius_value = st.one_of(st.just(0.0), st.sampled_from([0.5, 1.0, 2.0]), st.floats(0, 4, allow_subnormal=False))
    radius = np.array(draw(st.lists(radius_value, min_size=t, max_size=t)))
    return points, sigma, radius


@settings(max_examples=150, deadline=None)
@given(problems())
def test_every_rule_is_sound_and_ordered(problem):
    points, sigma, radius = problem
    allocations = {rule: allocate(points, sigma, radius, rule=rule) for rule in RULES}
    r = {rule: a.radius for rule, a in allocations.items()}
    for rule, a in allocations.items():
        assert_sound(points, sigma, a.radius, radius, a.answered)
        verify_allocation(points, sigma, a.radius, radius, answered=a.answered)
        assert np.all(r[rule][radius == 0] == 0)
        assert np.array_equal(a.answered, allocations["fill"].answered)  # the drop rule does not depend on the rule
    assert np.all(r["fill"] >= r["halving"])
    assert r["lp"].sum() >= r["fill"].sum() - 1e-7


@settings(max_examples=40, deadline=None)
@given(problems(max_points=8))
def test_lp_reaches_the_brute_force_optimum(problem):
    """The repaired LP solution is within 1e-6 of an independent dense LP over all different-level pairs."""
    points, sigma, radius = problem
    d = dense_distances(points)
    t = len(radius)
    dropped = brute_force_dropped(d, sigma, radius)
    allocation = allocate(points, sigma, radius, rule="lp")
    assert allocation.answered.tolist() == ((radius > 0) & ~dropped).tolist()
    radius = np.where(dropped, 0.0, radius)
    live = radius > 0
    rows = [(i, j) for i in range(t) for j in range(i + 1, t) if sigma[i] != sigma[j] and live[i] and live[j]]
    a_ub = np.zeros((len(rows), t))
    for k, (i, j) in enumerate(rows):
        a_ub[k, [i, j]] = 1
    b_ub = np.array([d[i, j] for i, j in rows])
    ref = scipy.optimize.linprog(-np.ones(t), A_ub=a_ub if rows else None, b_ub=b_ub if rows else None,
                                 bounds=list(zip(np.zeros(t), radius)), method="highs")
    assert ref.status == 0
    assert allocation.radius.sum() == pytest.approx(-ref.fun, abs=1e-6)


def brute_force_dropped(d, sigma, radius):
    """The duplicate rule, point by point: at a location shared by certified points of several levels, the level
    of the largest R (first index on ties) answers; the others abstain."""
    dropped = np.zeros(len(radius), dtype=bool)
    for k in np.flatnonzero(radius > 0):
        there = np.flatnonzero((d[k] == 0) & (radius > 0))
        winner = there[np.argmax(radius[there])]
        dropped[k] = sigma[k] != sigma[winner]
    return dropped


def test_three_points_by_hand():
    # On a line: 0 and 2 share a level, 1 sits between them at distance 1.5 from each.
    # Pairs (0, 1) and (1, 2) conflict: 1.2 + 0.5 > 1.5. The same-level pair (0, 2) never does.
    points = torch.tensor([[0.0], [1.5], [3.0]])
    sigma = torch.tensor([0.25, 0.5, 0.25])
    radius = torch.tensor([1.2, 0.5, 1.2], dtype=torch.float64)
    # halving: r0 = min(1.2, 1.5/2), r1 = min(0.5, 0.75, 0.75), r2 = min(1.2, 0.75).
    expected = {"halving": [0.75, 0.5, 0.75],
                # fill visits 0 (R 1.2), 2 (R 1.2, tie kept in index order), then 1: r0 = min(1.2, 1.5 - 0.5),
                # r2 = min(1.2, 1.5 - 0.5), r1 = min(0.5, 1.5 - 1.0, 1.5 - 1.0).
                "fill": [1.0, 0.5, 1.0],
                # lp: with r1 = t, r0 = r2 = min(1.2, 1.5 - t), so the sum is 2.4 + t for t <= 0.3 and 3 - t
                # beyond: the unique optimum is t = 0.3, sum 2.7.
                "lp": [1.2, 0.3, 1.2]}
    for rule, want in expected.items():
        allocation = allocate(points, sigma, radius, rule=rule)
        np.testing.assert_allclose(allocation.radius, want, rtol=0, atol=1e-8)
        assert np.all(allocation.radius <= np.array(want) + 1e-15)  # the safety margin only ever lowers
        assert allocation.num_points == 3 and allocation.num_conflicts == 2 and allocation.rule == rule
        assert allocation.mean_ratio == pytest.approx(np.mean(np.array(want) / [1.2, 0.5, 1.2]), abs=1e-8)
        verify_allocation(points, sigma, allocation.radius, radius)


def test_same_level_points_keep_their_radius():
    points = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.2]])
    sigma = np.array([0.5, 0.5, 0.5])
    radius = np.array([2.0, 3.0, 1.0])
    for rule in RULES:
        np.testing.assert_array_equal(allocate_radii(points, sigma, radius, rule=rule), radius)
    assert allocate(points, sigma, radius).num_conflicts == 0


def test_abstained_points_impose_nothing():
    points = np.array([[0.0], [0.1], [5.0]])
    sigma = np.array([0.25, 1.0, 1.0])
    radius = np.array([2.0, 0.0, 0.0])  # point 1 abstained right next to point 0
    for rule in RULES:
        allocation = allocate(points, sigma, radius, rule=rule)
        np.testing.assert_array_equal(allocation.radius, radius)
        assert allocation.num_conflicts == 0 and allocation.mean_ratio == 1.0
    assert np.isnan(allocate(points, sigma, np.zeros(3)).mean_ratio)


def test_duplicates_of_different_levels_one_level_keeps_its_answer():
    # Points 0, 1, 3 share a location; 1 has the largest R, so its level (0.5) answers there: 3 (also 0.5) keeps
    # its answer with r = 0 (its neighbour 0 of another level abstains), 0 abstains.
    points = np.array([[1.0, 2.0], [1.0, 2.0], [9.0, 9.0], [1.0, 2.0]])
    sigma, radius = [0.25, 0.5, 0.5, 0.5], [1.0, 1.5, 1.0, 0.5]
    for rule in RULES:
        a = allocate(points, sigma, radius, rule=rule)
        assert a.answered.tolist() == [False, True, True, True] and a.num_dropped == 1
        np.testing.assert_array_equal(a.radius, [0.0, 1.5, 1.0, 0.5])  # the dropped point constrains nothing
        verify_allocation(points, sigma, a.radius, radius, answered=a.answered)
    with pytest.raises(AllocationError, match="one location, two levels, both answering"):
        verify_allocation(points, sigma, np.zeros(4), radius)  # radii 0 are not enough: one must abstain
    tie = allocate(points[:2], [0.5, 0.25], [1.0, 1.0])
    assert tie.answered.tolist() == [True, False]  # equal radii: the first index keeps its answer


def test_a_centre_whose_radius_was_cut_to_zero_is_still_protected():
    # Point 1 keeps its answer with r = 0 at distance 1 from point 0 (another level): r_0 may reach 1, not beyond.
    points, sigma, radius = np.array([[0.0], [1.0]]), [0.25, 0.5], [2.0, 0.5]
    verify_allocation(points, sigma, [1.0, 0.0], radius)  # the open ball of radius 1 misses x_1
    with pytest.raises(AllocationError, match="overlap"):
        verify_allocation(points, sigma, [1.0 + 1e-12, 0.0], radius)
    verify_allocation(points, sigma, [1.5, 0.0], radius, answered=np.array([True, False]))  # 1 abstains: free
    for rule in RULES:
        a = allocate(points, sigma, radius, rule=rule)
        assert a.radius[0] + a.radius[1] <= 1.0 and a.answered.all()


@settings(max_examples=100, deadline=None)
@given(problems(), st.data())
def test_verifier_catches_every_planted_violation(problem, data):
    points, sigma, radius = problem
    a = allocate(points, sigma, radius, rule=data.draw(st.sampled_from(RULES)))
    r, answered = a.radius.copy(), a.answered.copy()
    # Plant: give up the allocation of one answering point by raising it to its certified radius, or make a dropped
    # point answer again; keep the change only if brute force says it is a violation.
    k = data.draw(st.integers(0, len(r) - 1))
    if radius[k] == 0:
        return
    answered[k] = True
    r[k] = data.draw(st.sampled_from([radius[k], 0.0]))
    try:
        assert_sound(points, sigma, r, radius, answered)
    except AssertionError:
        with pytest.raises(AllocationError):
            verify_allocation(points, sigma, r, radius, answered=answered)
    else:
        verify_allocation(points, sigma, r, radius, answered=answered)


def test_blocked_pairs_equal_dense():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(23, 2, 3, 3))
    sigma = rng.choice(LEVELS, size=23)
    radius = rng.uniform(0, 4, size=23) * (rng.random(23) > 0.2)
    d = dense_distances(points)
    want = {(i, j) for i in range(23) for j in range(i + 1, 23)
            if sigma[i] != sigma[j] and radius[i] > 0 and radius[j] > 0 and radius[i] + radius[j] > d[i, j]}
    assert want  # the case must exercise something
    for block_size in (1, 4, 7, 100):
        pairs = conflicting_pairs(torch.as_tensor(points), sigma, radius, block_size=block_size)
        assert set(zip(pairs.i.tolist(), pairs.j.tolist())) == want
        np.testing.assert_allclose(pairs.distance, d[pairs.i, pairs.j], rtol=1e-12)
        assert np.all(pairs.distance <= d[pairs.i, pairs.j] * (1 + 1e-12))
    for rule in RULES:
        small = allocate_radii(points, sigma, radius, rule=rule, block_size=5)
        np.testing.assert_allclose(small, allocate_radii(points, sigma, radius, rule=rule), rtol=0, atol=1e-9)
        verify_allocation(points, sigma, small, radius, block_size=3)


def test_high_dimensional_near_duplicates_are_exact():
    # CIFAR-sized vectors with large norms where the Gram form of d^2 cancels: distances must still be right.
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 1, size=3072)
    points = np.stack([base, base + 1e-6 * rng.normal(size=3072), base + 0.3 * rng.normal(size=3072)])
    sigma, radius = np.array([0.25, 0.5, 1.0]), np.array([1.0, 1.0, 1.0])
    pairs = conflicting_pairs(points, sigma, radius)
    d = dense_distances(points)
    np.testing.assert_allclose(pairs.distance, d[pairs.i, pairs.j], rtol=1e-12)
    for rule in RULES:
        r = allocate_radii(points, sigma, radius, rule=rule)
        assert_sound(points, sigma, r, radius)
        verify_allocation(points, sigma, r, radius)


@pytest.mark.parametrize(
    ("change", "kind"),
    [
        (lambda r: r.__setitem__(0, -1e-12), "negative"),
        (lambda r: r.__setitem__(1, 0.5 + 1e-12), "exceeds"),
        (lambda r: r.__setitem__(2, np.nan), "non-finite"),
        (lambda r: r.__setitem__(2, np.inf), "non-finite"),
        (lambda r: r.__setitem__(0, 1.0 + 1e-9), "overlap"),  # r0 + r1 = 1.5 + 1e-9 > d01 = 1.5
    ],
)
def test_verifier_catches_planted_violations(change, kind):
    points = np.array([[0.0], [1.5], [3.0]])
    sigma = np.array([0.25, 0.5, 0.25])
    radius = np.array([1.2, 0.5, 1.2])
    r = np.array([1.0, 0.5, 1.0])  # tight: r0 + r1 = d01 and r1 + r2 = d12 exactly
    verify_allocation(points, sigma, r, radius)
    change(r)
    with pytest.raises(AllocationError, match=kind):
        verify_allocation(points, sigma, r, radius)


def test_verifier_names_the_overlapping_pair():
    points = np.array([[0.0, 0.0], [3.0, 4.0]])
    with pytest.raises(AllocationError, match=r"i = 0, j = 1.*r_i = 3\.0.*r_j = 2\.5.*d_ij = 5\.0"):
        verify_allocation(points, [0.25, 1.0], [3.0, 2.5], [3.0, 3.0])
    verify_allocation(points, [1.0, 1.0], [3.0, 2.5], [3.0, 3.0])  # same level: overlap allowed


def test_verifier_rejects_wrong_shapes_and_abstain_radius():
    points = np.zeros((3, 2))
    with pytest.raises(AllocationError, match="shape"):
        verify_allocation(points, [0.5, 0.5, 0.5], np.zeros(2), np.ones(3))
    with pytest.raises(AllocationError, match="shape"):
        verify_allocation(points, [0.5, 0.5, 0.5], np.zeros((3, 1)), np.ones(3))
    with pytest.raises(AllocationError, match="exceeds"):
        verify_allocation(points, [0.5, 0.5, 0.5], [0.0, 0.1, 0.0], [1.0, 0.0, 1.0])
    with pytest.raises(AllocationError, match="non-finite input"):  # NaN distances would compare False
        verify_allocation(np.array([[0.0], [np.nan], [1.0]]), [0.5, 1.0, 0.5], [0.1, 0.1, 0.1], np.ones(3))


def test_allocation_error_is_a_runtime_error():
    assert issubclass(AllocationError, RuntimeError)


def test_unknown_rule_and_bad_inputs():
    with pytest.raises(ValueError, match=r"'greedy'.*halving, fill, lp"):
        allocate_radii(np.zeros((2, 1)), [0.5, 1.0], [1.0, 1.0], rule="greedy")
    with pytest.raises(ValueError, match="radius"):
        allocate_radii(np.zeros((2, 1)), [0.5, 1.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="radius"):
        allocate_radii(np.zeros((2, 1)), [0.5, 1.0], [1.0, np.nan])
    with pytest.raises(ValueError, match="sigma"):
        allocate_radii(np.zeros((2, 1)), [0.5], [1.0, 1.0])


def test_lp_failure_raises(monkeypatch):
    failed = scipy.optimize.OptimizeResult(status=4, x=None, message="numerical trouble")
    monkeypatch.setattr(scipy.optimize, "linprog", lambda *a, **k: failed)
    with pytest.raises(AllocationError, match="numerical trouble"):
        allocate_radii(np.array([[0.0], [1.0]]), [0.5, 1.0], [1.0, 1.0], rule="lp")


def test_lp_solution_outside_tolerance_is_repaired(monkeypatch):
    # A solver answer that breaks a pair constraint by more than its tolerance is shrunk, never passed on.
    real = scipy.optimize.linprog

    def sloppy(*args, **kwargs):
        result = real(*args, **kwargs)
        result.x = result.x + 1e-6
        return result

    monkeypatch.setattr(scipy.optimize, "linprog", sloppy)
    points, sigma, radius = np.array([[0.0], [1.5], [3.0]]), [0.25, 0.5, 0.25], [1.2, 0.5, 1.2]
    r = allocate_radii(points, sigma, radius, rule="lp")
    assert_sound(points, sigma, r, np.array(radius))
    verify_allocation(points, sigma, r, radius)


def test_many_points_multi_block():
    rng = np.random.default_rng(2)
    points = torch.rand(600, 1, 16, 16)
    sigma = torch.tensor(rng.choice(LEVELS, size=600))
    radius = torch.tensor(rng.uniform(0, 6, size=600))
    out = {rule: allocate(points, sigma, radius, rule=rule, block_size=128) for rule in RULES}
    assert out["fill"].num_conflicts > 100
    for rule in RULES:
        verify_allocation(points, sigma, out[rule].radius, radius, block_size=100)
    assert np.all(out["fill"].radius >= out["halving"].radius)
    assert out["lp"].radius.sum() >= out["fill"].radius.sum() - 1e-7
