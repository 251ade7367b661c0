"""Per-point noise streams: a point's draws, votes, level and certificate do not depend on how it is batched."""
import numpy as np
import pytest
import torch
from scipy.stats import kstest, pearsonr
from torch import nn

from ssmooth.certify import certify, predict, sample_counts
from ssmooth.certify.results import RowWriter, read_rows
from ssmooth.certify.run import certify_points
from ssmooth.certify.inductive import selector_seed
from ssmooth.certify.runfolder import SCHEME_VERSION
from ssmooth.certify.streams import PURPOSES, NoiseStream, point_seed, point_streams, seeded_generator
from ssmooth.selection import select_sigma

SHAPE = (1, 6, 6)


def test_one_generator_cut_in_two_calls_is_not_one_call():
    # The trap the fixed-size pieces avoid: the draws would depend on where a forward batch ends.
    g = torch.Generator().manual_seed(0)
    cut = torch.cat([torch.randn(10, generator=g), torch.randn(7, generator=g)])
    whole = torch.randn(17, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(cut, whole)


@pytest.mark.parametrize("cuts", [[1] * 50, [7, 13, 30], [50], [3, 0, 47]])
def test_a_stream_serves_the_same_draws_however_they_are_taken(cuts, monkeypatch):
    monkeypatch.setattr("ssmooth.certify.streams.PIECE_VALUES", 11 * 36)  # pieces of 11 draws: cuts straddle them
    whole = NoiseStream(5, SHAPE, 50).take(50)
    stream = NoiseStream(5, SHAPE, 50)
    pieces = torch.cat([stream.take(k) for k in cuts])
    assert torch.equal(pieces, whole)
    with pytest.raises(ValueError, match="50 draws"):
        stream.take(1)


def test_streams_are_standard_normal_and_independent_across_points_and_purposes():
    a, b = (s.take(4000).flatten().numpy() for s in point_streams(0, [3, 4], "estimation", (2,), 4000))
    c = point_streams(0, [3], "selection", (2,), 4000)[0].take(4000).flatten().numpy()
    assert kstest(a, "norm").pvalue > 1e-3 and kstest(c, "norm").pvalue > 1e-3
    for u, v in [(a, b), (a, c)]:
        assert abs(pearsonr(u, v).statistic) < 0.05  # 8000 pairs: the null's sd is 0.011
    seeds = {point_seed(s, i, p) for s in (0, 1) for i in range(50) for p in PURPOSES}
    assert len(seeds) == 2 * 50 * len(PURPOSES)
    assert point_seed(1, 2, "level") == point_seed(1, 2, "level")
    with pytest.raises(ValueError, match="unknown noise purpose"):
        point_seed(0, 0, "estimaton")


def test_two_streams_whose_seeds_share_their_low_32_bits_draw_different_noise():
    # Before: the CPU generator kept 32 bits of a stream's seed, and with seed 20 points 14054 and 19634 drew
    # identical noise for every sample
    a, b = (point_seed(20, i, "estimation") for i in (14054, 19634))
    assert a != b and a % 2**32 == b % 2**32
    assert not torch.equal(NoiseStream(a, SHAPE, 5).take(5), NoiseStream(b, SHAPE, 5).take(5))
    assert seeded_generator(a).initial_seed() == a
    for bit in (0, 31, 32, 62):  # every bit of the seed changes the draws
        assert not torch.equal(torch.randn(4, generator=seeded_generator(5)),
                               torch.randn(4, generator=seeded_generator(5 ^ (1 << bit))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_streams_use_every_bit_of_their_seed_too():
    a, b = (point_seed(20, i, "estimation") for i in (14054, 19634))
    draws = [NoiseStream(s, SHAPE, 5, device="cuda").take(5) for s in (a, b)]
    assert not torch.equal(*draws)


# Every stream a run can draw from: the run seed's purposes (the cascade's per level too), and the streams of the
# inductive certificate's level selector, under a seed of their own.
RUN_PURPOSES = [(0, p) for p in PURPOSES] + [(0, f"cascade{k}/{p}") for k in range(3)
                                             for p in ("selection", "estimation")]
RUN_PURPOSES += [(1, "selection"), (1, "estimation")]


def distinct_first_draws(seed: int, num_points: int) -> None:
    seeds = (seed, selector_seed(seed))
    firsts = {tuple(torch.randn(2, generator=seeded_generator(point_seed(seeds[which], i, purpose))).tolist())
              for i in range(num_points) for which, purpose in RUN_PURPOSES}
    assert len(firsts) == num_points * len(RUN_PURPOSES)


def test_no_two_streams_of_a_run_share_their_first_draws():
    distinct_first_draws(20, 1000)


@pytest.mark.slow
def test_no_two_streams_of_a_run_of_20000_points_share_their_first_draws():
    distinct_first_draws(20, 20_000)  # before: points 14054 and 19634 shared their estimation draws


def test_the_scheme_version_names_these_draws():
    # Rows are made of these draws. If this fails, rows of unchanged settings have changed: bump SCHEME_VERSION
    # (run folders of the old rows are then refused instead of resumed) and write the new values here.
    assert SCHEME_VERSION == 2
    draws = NoiseStream(point_seed(0, 7, "estimation"), (3,), 2).take(2)
    expected = [[1.1746066808700562, -0.26910391449928284, -0.5210855007171631],
                [1.291256070137024, -0.24056854844093323, 1.0641156435012817]]
    assert draws.tolist() == expected


def tiny_model(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, num_classes)).eval()


def points(count, seed=1):
    return torch.rand((count, *SHAPE), generator=torch.Generator().manual_seed(seed))


def test_votes_of_a_point_do_not_depend_on_its_neighbours_or_the_batch_size():
    model, x = tiny_model(), points(5)
    sigma = torch.tensor([0.25, 0.5, 1.0, 0.5, 2.0])
    indices = [10, 11, 12, 13, 14]

    def votes(rows, batch_size, num=300):
        nums = num if isinstance(num, int) else [num[i] for i in rows]
        streams = point_streams(7, [indices[i] for i in rows], "estimation", SHAPE, nums)
        return sample_counts(model, x[rows], sigma[rows], nums, batch_size=batch_size, num_classes=3, streams=streams)

    together = votes([0, 1, 2, 3, 4], 1000)
    assert len({tuple(r) for r in together.tolist()}) == 5  # the points do differ
    for batch_size in (7, 64, 299):
        assert torch.equal(votes([0, 1, 2, 3, 4], batch_size), together)
    alone = torch.cat([votes([i], 128) for i in range(5)])
    assert torch.equal(alone, together)
    assert torch.equal(votes([3, 1], 50), together[[3, 1]])
    # a count per point: every point still gets its own first draws
    per_point = votes([0, 1, 2, 3, 4], 64, num=[300, 20, 300, 5, 300])
    assert per_point.sum(1).tolist() == [300, 20, 300, 5, 300]
    assert torch.equal(per_point[[0, 2, 4]], together[[0, 2, 4]])


def test_certify_and_predict_with_streams_give_each_point_its_own_result():
    model, x = tiny_model(), points(6, seed=2)
    kw = dict(n0=20, n=400, alpha=0.01, num_classes=3, seed=3)
    together = certify(model, x, 0.5, batch_size=1000, indices=list(range(100, 106)), **kw)
    split = [certify(model, x[i : i + 2], 0.5, batch_size=33, indices=[100 + i, 101 + i], **kw) for i in (0, 2, 4)]
    assert torch.equal(torch.cat([c.count for c in split]), together.count)
    assert torch.equal(torch.cat([c.radius for c in split]), together.radius)
    other_seed = certify(model, x, 0.5, batch_size=1000, indices=list(range(100, 106)), **{**kw, "seed": 4})
    assert not torch.equal(other_seed.count, together.count)
    labels = predict(model, x, 0.5, n=400, alpha=0.01, num_classes=3, seed=3, indices=list(range(6)))
    assert torch.equal(labels[2:4], predict(model, x[2:4], 0.5, n=400, alpha=0.01, num_classes=3, seed=3,
                                            indices=[2, 3], batch_size=17))
    with pytest.raises(ValueError, match="not both"):
        certify(model, x, 0.5, indices=list(range(6)), generator=torch.Generator(), **kw)


def test_level_selection_with_streams_does_not_depend_on_batching():
    model, x = tiny_model(seed=4), points(6, seed=5)
    grid, m = [0.1, 0.4, 1.6], 16

    def levels(rows, batch_size):
        streams = point_streams(0, rows, "level", SHAPE, len(grid) * m)
        return select_sigma(model, x[rows], grid, num_samples=m, streams=streams, batch_size=batch_size)

    together = levels(list(range(6)), 1024)
    assert len(set(together.tolist())) > 1  # the points choose different levels: the check can fail
    assert torch.equal(levels(list(range(6)), 5), together)
    assert torch.equal(torch.cat([levels([i], 7) for i in range(6)]), together)


class Items(list):
    """(x, y, index) items, as SmoothingDataModule.test_points gives them."""


def test_certify_points_rows_are_the_same_for_any_grouping_and_after_a_resume(tmp_path):
    model, x = tiny_model(seed=6), points(7, seed=7)
    items = Items((x[i], i % 3, 40 + 3 * i) for i in range(7))
    grid = [0.2, 0.5, 1.0]

    def selector(xb, streams):
        return select_sigma(model, xb, grid, num_samples=8, streams=streams("level", len(grid) * 8))

    kw = dict(n0=16, n=200, alpha=0.05, batch_size=256, num_classes=3, seed=1)
    for sigma in (0.5, selector):
        results = []
        for name, groups in [("one", 1), ("three", 3), ("all", 7)]:
            with RowWriter(tmp_path / f"{name}.tsv") as writer:
                certify_points(model, items, writer, sigma=sigma, points_per_group=groups, **kw)
            results.append(read_rows(tmp_path / f"{name}.tsv"))
        # resumed: the first 3 rows written, then the run "killed" and started again on every point
        with RowWriter(tmp_path / "resumed.tsv") as writer:
            certify_points(model, Items(items[:3]), writer, sigma=sigma, points_per_group=2, **kw)
        with RowWriter(tmp_path / "resumed.tsv") as writer:
            assert writer.done == {40, 43, 46}
            certify_points(model, items, writer, sigma=sigma, points_per_group=4, **kw)
        results.append(read_rows(tmp_path / "resumed.tsv"))
        cols = ["idx", "predict", "radius", "sigma"]
        for other in results[1:]:
            assert other[cols].equals(results[0][cols])
        assert results[0]["predict"].nunique() > 1 or results[0]["radius"].nunique() > 1
        if sigma is selector:
            assert results[0]["sigma"].nunique() > 1
        for f in tmp_path.glob("*.tsv"):
            f.unlink()
