"""Transductive radius allocation for sample-wise noise levels (docs/METHOD.md).

Cohen's certificate holds for one sigma. With a level per test point, the deployed classifier smooths at
`sigma_i` inside the ball `B(x_i, r_i)` and at sigma0 elsewhere; it is well defined when balls of DIFFERENT
levels never meet: `r_i + r_j <= ||x_i - x_j||_2` for every pair with `sigma_i != sigma_j`, and
`0 <= r_i <= R_i`. Each certificate "constant on B(x_i, r_i)" then holds with probability >= 1 - alpha.
Abstained points (R_i = 0) impose no constraint and get r_i = 0; points of the same level never conflict.

What a point that keeps its answer owns: its centre x_i and the open ball B(x_i, r_i). Even when its radius is
cut to r_i = 0 it still claims g_{sigma_i}(x_i) = c_i, so no ball of another level may contain its centre.
The rule for every pair of different levels where both points keep their answer is therefore
`r_i + r_j <= d_ij` AND `d_ij > 0`: with r_i = 0 this reads r_j <= d_ij (an open ball of radius exactly d_ij
does not contain x_i), and it forbids two answers at one location.
Duplicates (d_ij = 0, different levels): the deployed classifier has one value there, so only one level may
keep its answers. The level of the point with the largest certified radius R (ties: the first in index order)
keeps them; every point of another level at that location abstains (`answered` False: prediction -1,
radius 0, counted wrong). Labels are never looked at.

Rules (a pair conflicts when `R_i + R_j > d_ij`, i.e. when the raw radii cannot both be kept):
- `halving`: r_i = min(R_i, min over conflicting j of d_ij / 2);
- `fill` (default): halving, then in order of decreasing R_i raise r_i to min(R_i, min_j (d_ij - r_j));
- `lp`: maximize sum r_i under the pair constraints (scipy HiGHS, sparse rows for conflicting pairs only).

Floating point: every rule allocates against `d_ij * (1 - SAFETY)`, never `d_ij` itself. The exact distance of
two float64 vectors of dimension D is computed with relative error below about D * 2^-53 (1e-12 for D = 3072),
orders of magnitude below SAFETY = 1e-9, so `verify_allocation`, which recomputes distances its own way,
can check `r_i + r_j <= d_ij` with an exact `<=` and no tolerance in the allocator's favour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import scipy.sparse
import torch

RULES = ("halving", "fill", "lp")

# Relative margin between the distance the allocator targets and the true distance (see module docstring).
SAFETY = 1e-9
_EPS = float(np.finfo(np.float64).eps)


class AllocationError(RuntimeError):
    """An allocation violates `0 <= r_i <= R_i` or `r_i + r_j <= d_ij`; a bug that must stop the run."""


@dataclass(frozen=True)
class Allocation:
    """Allocated radii and what the summary reports beside them."""

    radius: np.ndarray  # float64 [T], the final r_i
    rule: str
    num_points: int  # |T|, every evaluated point (abstentions included)
    num_conflicts: int  # pairs of different levels with R_i + R_j > d_ij
    mean_ratio: float  # mean r_i / R_i over points with R_i > 0; NaN when there are none
    answered: np.ndarray  # bool [T]: keeps its answer; False for abstentions and dropped duplicates (predict -1)
    num_dropped: int  # points with R > 0 that abstain because another level answers at the same location


@dataclass(frozen=True)
class ConflictingPairs:
    """Pairs i < j (indices into the full point set) with different levels and R_i + R_j > d_ij."""

    i: np.ndarray  # int64 [P]
    j: np.ndarray  # int64 [P]
    distance: np.ndarray  # float64 [P], ||x_i - x_j||_2 (never above the true value by more than 1e-12 relative)


def allocate_radii(points, sigma, radius, rule: str = "fill", block_size: int = 512) -> np.ndarray:
    """Final radii `r` (float64 [T]) with `0 <= r <= radius` and no overlap between balls of different levels.

    Radii only: where duplicates of different levels exist, `allocate(...).answered` says which points must
    abstain, and `verify_allocation` without it refuses such a set."""
    return allocate(points, sigma, radius, rule=rule, block_size=block_size).radius


def allocate(points, sigma, radius, rule: str = "fill", block_size: int = 512) -> Allocation:
    """`allocate_radii` plus the statistics reported with it (|T|, conflicting pairs, mean r/R)."""
    if rule not in RULES:
        raise ValueError(f"unknown allocation rule {rule!r}; valid rules: {', '.join(RULES)}")
    x, sig, big_r = _as_inputs(points, sigma, radius)
    pairs = conflicting_pairs(x, sig, big_r, block_size=block_size)
    num_conflicts = len(pairs.i)
    dropped = _duplicates_to_drop(x, sig, big_r, pairs)
    live_r = np.where(dropped, 0.0, big_r)
    if dropped.any():  # a dropped point claims nothing, so its pairs are no constraint
        keep = ~(dropped[pairs.i] | dropped[pairs.j])
        pairs = ConflictingPairs(pairs.i[keep], pairs.j[keep], pairs.distance[keep])
    target = pairs.distance * (1.0 - SAFETY)
    if rule == "halving":
        r = _halving(live_r, pairs.i, pairs.j, target)
    elif rule == "fill":
        r = _fill(live_r, pairs.i, pairs.j, target)
    else:
        r = _lp(live_r, pairs.i, pairs.j, target)
    # The allocator's own contract, checked cheaply on the pairs it knows; verify_allocation checks all pairs.
    r = _repair(r, pairs.i, pairs.j, target)
    positive = big_r > 0
    mean_ratio = float(np.mean(r[positive] / big_r[positive])) if positive.any() else float("nan")
    return Allocation(r, rule, len(big_r), num_conflicts, mean_ratio, answered=positive & ~dropped,
                      num_dropped=int(np.count_nonzero(dropped)))


def _duplicates_to_drop(x, sig, big_r, pairs: ConflictingPairs) -> np.ndarray:
    """bool [T]: points that abstain because a point of another level sits at the same location (see the module
    docstring: the level of the largest R there keeps its answers, ties to the first index)."""
    dropped = np.zeros(len(big_r), dtype=bool)
    zero = pairs.distance == 0  # exact: near-duplicates get their true, positive distance
    if not zero.any():
        return dropped
    involved = np.unique(np.concatenate([pairs.i[zero], pairs.j[zero]]))
    rows = x[torch.as_tensor(involved, device=x.device)].cpu().numpy()
    _, group = np.unique(rows, axis=0, return_inverse=True)
    for g in np.unique(group):
        members = involved[group.reshape(-1) == g]  # ascending index
        winner = members[np.argmax(big_r[members])]  # argmax takes the first of equal radii
        dropped[members[sig[members] != sig[winner]]] = True
    return dropped


def conflicting_pairs(points, sigma, radius, block_size: int = 512) -> ConflictingPairs:
    """All pairs of different levels whose raw balls may not both be kept, found block by block.

    Only points with R > 0 take part. A block of rows is compared with every later point through the Gram
    matrix (one matmul, memory block_size x T), widened by a rigorous bound on its rounding error; a pair's
    distance is that bound's lower end `sqrt(d^2 - err)` when the bound is negligible, else it is recomputed
    from the difference vector (near-duplicate points, where the Gram form cancels). Nothing of size T x T
    is ever stored: 10,000 CIFAR-10 points take 250 MB in float64, and each block array 40 MB.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    x, sig, big_r = _as_inputs(points, sigma, radius)
    active = np.flatnonzero(big_r > 0)
    empty = ConflictingPairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64))
    if len(active) < 2:
        return empty
    xa = x[torch.as_tensor(active, device=x.device)]
    dim = xa.shape[1]
    sq = (xa * xa).sum(1)
    norm = sq.sqrt()
    sig_a = torch.as_tensor(sig[active], device=x.device)
    r_a = torch.as_tensor(big_r[active], device=x.device)
    # |fl(d^2) - d^2| <= ~(D + 3) eps/2 (|x| + |y|)^2 for any summation order; doubled for margin.
    err_scale = (dim + 4) * _EPS
    widen = 1.0 + 4 * SAFETY  # catch every pair with R_i + R_j > d (1 - SAFETY), see module docstring

    found_i, found_j, found_d = [], [], []
    n = len(active)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        rows = slice(start, stop)
        cols = slice(start, n)  # j >= start; the diagonal and j < i are masked below
        d2 = sq[rows, None] + sq[None, cols] - 2.0 * (xa[rows] @ xa[cols].T)
        err = err_scale * (norm[rows, None] + norm[None, cols]) ** 2
        reach = ((r_a[rows, None] + r_a[None, cols]) * widen) ** 2
        mask = (d2 - err) < reach
        mask &= sig_a[rows, None] != sig_a[None, cols]
        mask = torch.triu(mask, diagonal=1)  # local row k is global start + k, local column k likewise
        bi, bj = mask.nonzero(as_tuple=True)
        if len(bi):
            # sqrt(d2 - err) is always a lower bound on d (sound); where it is also tight (within 5e-11
            # relative, 5% of SAFETY) keep it, elsewhere (near-duplicates) the difference vector decides.
            d2_k, err_k = d2[bi, bj], err[bi, bj]
            dist = torch.where(err_k <= 0.1 * SAFETY * d2_k, (d2_k - err_k).clamp_min(0).sqrt(), torch.nan)
            found_i.append(bi + start)
            found_j.append(bj + start)
            found_d.append(dist)
    if not found_i:
        return empty
    ci, cj, dist = torch.cat(found_i), torch.cat(found_j), torch.cat(found_d)
    redo = dist.isnan().nonzero(as_tuple=True)[0]
    if len(redo):
        dist[redo] = _pair_distances(xa, ci[redo], cj[redo])
    keep = (r_a[ci] + r_a[cj]) > dist * (1.0 - SAFETY)
    ci, cj, dist = ci[keep].cpu().numpy(), cj[keep].cpu().numpy(), dist[keep].cpu().numpy()
    return ConflictingPairs(active[ci], active[cj], dist.astype(np.float64))


def _pair_distances(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, max_elems: int = 1 << 23):
    """||x_i - x_j|| from the difference vectors (no cancellation), in chunks of pairs."""
    step = max(1, max_elems // max(1, x.shape[1]))
    chunks = [slice(k, k + step) for k in range(0, len(i), step)]
    return torch.cat([torch.linalg.vector_norm(x[i[c]] - x[j[c]], dim=1) for c in chunks])


def _halving(big_r, i, j, target):
    r = big_r.copy()
    np.minimum.at(r, i, target / 2)
    np.minimum.at(r, j, target / 2)
    return r


def _fill(big_r, i, j, target):
    r = _halving(big_r, i, j, target)
    if len(i) == 0:
        return r
    # Symmetric adjacency (CSR) of the conflict graph.
    src = np.concatenate([i, j])
    dst = np.concatenate([j, i])
    dist = np.concatenate([target, target])
    order = np.argsort(src, kind="stable")
    src, dst, dist = src[order], dst[order], dist[order]
    indptr = np.searchsorted(src, np.arange(len(big_r) + 1))
    involved = np.unique(src)
    # Decreasing R_i; ties keep index order (stable sort on -R).
    for k in involved[np.argsort(-big_r[involved], kind="stable")]:
        nbr = slice(indptr[k], indptr[k + 1])
        room = min(big_r[k], float(np.min(dist[nbr] - r[dst[nbr]])))
        while room > r[k] and np.any(room + r[dst[nbr]] > dist[nbr]):  # d - r_j rounded up: step down an ulp
            room = float(np.nextafter(room, 0.0))
        r[k] = max(r[k], room)  # every constraint held before, so room >= r[k] up to rounding: never lower
    return r


def _lp(big_r, i, j, target):
    r = big_r.copy()
    if len(i) == 0:
        return r
    nodes, inverse = np.unique(np.concatenate([i, j]), return_inverse=True)
    li, lj = inverse[: len(i)], inverse[len(i) :]
    rows = np.repeat(np.arange(len(i)), 2)
    cols = np.stack([li, lj], axis=1).ravel()
    a_ub = scipy.sparse.csr_array((np.ones(2 * len(i)), (rows, cols)), shape=(len(i), len(nodes)))
    bounds = np.stack([np.zeros(len(nodes)), big_r[nodes]], axis=1)
    result = scipy.optimize.linprog(
        -np.ones(len(nodes)),
        A_ub=a_ub,
        b_ub=target,
        bounds=bounds,
        method="highs",
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    if result.status != 0 or result.x is None:
        raise AllocationError(f"LP allocation failed (status {result.status}): {result.message}")
    # HiGHS satisfies constraints only up to its tolerance: clip to the box; _repair fixes pair excesses.
    r[nodes] = np.clip(result.x, 0.0, big_r[nodes])
    return r


def _repair(r, i, j, target, max_rounds: int = 8):
    """Shrink radii until `r_i + r_j <= target_ij` holds exactly in float64 on every known pair.

    Only radii on violating pairs move, and only down. Each round lowers both ends of a violating pair by
    the pair's excess (enough even when one end is clipped at 0); if rounding leaves a violation, the
    halving value d/2 + d/2 = d is exact and ends it.
    """
    r = np.maximum(r, 0.0)
    for _ in range(max_rounds):
        excess = r[i] + r[j] - target
        bad = excess > 0
        if not bad.any():
            return r
        cut = np.zeros_like(r)
        np.maximum.at(cut, i[bad], excess[bad])
        np.maximum.at(cut, j[bad], excess[bad])
        r = np.maximum(r - cut, 0.0)
    bad = r[i] + r[j] > target
    np.minimum.at(r, i[bad], target[bad] / 2)
    np.minimum.at(r, j[bad], target[bad] / 2)
    return r


def _as_inputs(points, sigma, radius):
    """points -> float64 torch [T, D] (on its own device); sigma, radius -> float64 numpy [T]."""
    x = torch.as_tensor(points)
    if x.ndim < 1:
        raise ValueError(f"points must have shape [T, ...], got {tuple(x.shape)}")
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    sig = _vector(sigma, "sigma", x.shape[0])
    big_r = _vector(radius, "radius", x.shape[0])
    if not np.isfinite(sig).all():
        raise ValueError("sigma must be finite")
    if not np.isfinite(big_r).all() or (big_r < 0).any():
        raise ValueError("radius must be finite and >= 0 (abstentions have radius 0)")
    if not torch.isfinite(x).all():
        raise ValueError("points must be finite")
    return x, sig, big_r


def _vector(values, name, length):
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {arr.shape}")
    return arr


def verify_allocation(points, sigma, r, radius, block_size: int = 512, *, answered=None) -> None:
    """Raise AllocationError unless `r` is a sound allocation for (points, sigma, radius).

    ``answered`` (bool [T]) marks the points that keep their answer; default: every point with R > 0. Checks
    shape, finiteness, `0 <= r_i <= R_i`, that only certified points answer and only answering points have a
    radius, and for every pair of different levels where both answer `r_i + r_j <= d_ij` with an exact `<=`
    and `d_ij > 0` (see the module docstring: a point cut to r = 0 still owns its centre).
    Independent of the allocator on purpose: NumPy instead of torch, its own Gram filter and error bound,
    distances recomputed from the points.

    One piece on purpose: the independent check of an allocation, read in one go."""
    x = _as_float_array(points)
    if x.ndim < 1:
        raise AllocationError(f"shape violation: points have shape {x.shape}, expected [T, ...]")
    t = x.shape[0]
    x = x.reshape(t, -1)
    sig = _as_float_array(sigma)
    big_r = _as_float_array(radius)
    r = _as_float_array(r)
    for name, arr in (("sigma", sig), ("radius", big_r), ("r", r)):
        if arr.shape != (t,):
            raise AllocationError(f"shape violation: {name} has shape {arr.shape}, expected ({t},)")
    if not (np.isfinite(x).all() and np.isfinite(big_r).all() and (big_r >= 0).all()):
        raise AllocationError("non-finite input: points and certified radii must be finite, radii >= 0")
    answered = big_r > 0 if answered is None else np.asarray(answered)
    if answered.shape != (t,) or answered.dtype != bool:
        raise AllocationError(f"shape violation: answered must be bool ({t},), got {answered.dtype} {answered.shape}")
    if not np.isfinite(r).all():
        k = int(np.flatnonzero(~np.isfinite(r))[0])
        raise AllocationError(f"non-finite radius: r[{k}] = {float(r[k])!r}")
    if (r < 0).any():
        k = int(np.flatnonzero(r < 0)[0])
        raise AllocationError(f"negative radius: r[{k}] = {float(r[k])!r}")
    if (r > big_r).any():
        k = int(np.flatnonzero(r > big_r)[0])
        raise AllocationError(
            f"radius exceeds certified radius: r[{k}] = {float(r[k])!r} > R[{k}] = {float(big_r[k])!r}"
        )
    if (answered & (big_r == 0)).any():
        k = int(np.flatnonzero(answered & (big_r == 0))[0])
        raise AllocationError(f"answer without a certificate: point {k} abstained (R = 0) but is marked answered")
    if ((r > 0) & ~answered).any():
        k = int(np.flatnonzero((r > 0) & ~answered)[0])
        raise AllocationError(f"radius without an answer: r[{k}] = {float(r[k])!r} but point {k} abstains")

    idx = np.flatnonzero(answered)  # r_i = 0 included: such a point still owns its centre
    xs, ss, rs = x[idx], sig[idx], r[idx]
    sq = np.einsum("ij,ij->i", xs, xs)
    norm = np.sqrt(sq)
    bound = 2 * (x.shape[1] + 4) * _EPS
    for start in range(0, len(idx), block_size):
        stop = min(start + block_size, len(idx))
        d2 = sq[start:stop, None] + sq[None, start:] - 2.0 * (xs[start:stop] @ xs[start:].T)
        slack = bound * (norm[start:stop, None] + norm[None, start:]) ** 2
        reach = rs[start:stop, None] + rs[None, start:]
        # <=: two zero radii at one location (d = 0, reach = 0) must reach the exact check
        suspect = (d2 - slack <= reach**2) & (ss[start:stop, None] != ss[None, start:])
        a, b = np.nonzero(np.triu(suspect, k=1))
        a, b = a + start, b + start
        for lo in range(0, len(a), 4096):
            pa, pb = a[lo : lo + 4096], b[lo : lo + 4096]
            dist = _scaled_norm(xs[pa] - xs[pb])
            over = np.flatnonzero((rs[pa] + rs[pb] > dist) | (dist == 0))
            if len(over):
                k = over[0]
                i, j = int(idx[pa[k]]), int(idx[pb[k]])
                what = "overlap between levels" if dist[k] > 0 else "one location, two levels, both answering"
                raise AllocationError(
                    f"{what}: i = {i}, j = {j}: r_i + r_j > d_ij or d_ij = 0 with r_i = {float(r[i])!r}, "
                    f"r_j = {float(r[j])!r}, d_ij = {float(dist[k])!r} "
                    f"(sigma_i = {float(sig[i])}, sigma_j = {float(sig[j])})"
                )


def _scaled_norm(diff: np.ndarray) -> np.ndarray:
    """Row norms of difference vectors, scaled by the largest entry so that a tiny difference never squares to
    0: the norm is 0 exactly when the two points are the same."""
    scale = np.abs(diff).max(axis=1, initial=0.0)
    return scale * np.sqrt(np.sum((diff / np.where(scale > 0, scale, 1.0)[:, None]) ** 2, axis=1))


def _as_float_array(values):
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)
