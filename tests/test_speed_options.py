"""The speed options of CERTIFY change how fast the votes are counted, not what they say.

- bf16 autocast moves certified radii by less than the Monte-Carlo noise of the same n;
- channels-last (inputs, or inputs and weights) gives the same votes as the default memory format;
- copies of several points sharing forward batches give the votes of one point at a time.
"""
import copy

import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

from ssmooth.certify import certify, lower_confidence_bound, sample_counts
from ssmooth.certify.stats import radius_from_pA
from ssmooth.models import create_model


def gen(seed):
    return torch.Generator().manual_seed(seed)


def fixed_model(name="tiny", shape=(1, 8, 8), num_classes=3, **options):
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, input_shape=shape, **options).eval()


def points(count, shape, seed=1):
    return torch.rand((count, *shape), generator=gen(seed))


def cohen_radius(nA, n, alpha, sigma):
    pA = lower_confidence_bound(np.asarray(nA, dtype=np.float64), n, alpha)
    return np.where(pA >= 0.5, radius_from_pA(np.clip(pA, 0.5, 1.0), sigma), 0.0)


def test_bf16_autocast_moves_radii_less_than_the_monte_carlo_noise():
    model, x = fixed_model(), points(8, (1, 8, 8))
    kw = dict(n0=64, n=2000, alpha=0.001, batch_size=512, num_classes=3)
    sigma, n = 0.5, kw["n"]
    dtypes = []
    hook = model.body[-1].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    fp32 = certify(model, x, sigma, generator=gen(0), **kw)
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    bf16 = certify(model, x, sigma, generator=gen(0), autocast_dtype=torch.bfloat16, **kw)
    assert set(dtypes) == {torch.bfloat16}, "autocast did not reach the model"
    hook.remove()
    other_seed = certify(model, x, sigma, generator=gen(1), **kw)

    # the model is not trivial here: most points have a vote share strictly between 1/2 and 1
    share = fp32.count.numpy() / n
    assert ((share > 0.5) & (share < 0.99)).sum() >= 4

    # Per point: the bf16 radius lies within the radii of nA -+ 3 binomial standard deviations, the spread a
    # second run at the same n would show.
    nA = fp32.count.numpy().astype(np.float64)
    p = np.clip(nA / n, 1 / n, 1 - 1 / n)
    spread = 3 * np.sqrt(n * p * (1 - p))
    low = cohen_radius(np.clip(nA - spread, 0, n), n, kw["alpha"], sigma)
    high = cohen_radius(np.clip(nA + spread, 0, n), n, kw["alpha"], sigma)
    radius = bf16.radius.numpy()
    assert np.all((radius >= low - 1e-6) & (radius <= high + 1e-6)), (radius, low, high)
    # and on average bf16 (same draws) moves radii less than fresh draws do
    moved_by_bf16 = np.abs(bf16.radius.numpy() - fp32.radius.numpy()).mean()
    moved_by_seed = np.abs(other_seed.radius.numpy() - fp32.radius.numpy()).mean()
    assert moved_by_bf16 < moved_by_seed


@pytest.mark.parametrize("convert_weights", [False, True], ids=["inputs", "inputs+weights"])
def test_channels_last_gives_the_same_votes(convert_weights):
    shape = (3, 16, 16)
    model = fixed_model("lenet", shape, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    x = points(4, shape)
    kw = dict(batch_size=300, num_classes=5)
    plain = sample_counts(model, x, 0.5, 1000, generator=gen(0), **kw)

    fast = copy.deepcopy(model).to(memory_format=torch.channels_last) if convert_weights else model
    formats = []
    conv = fast.body[0]
    hook = conv.register_forward_pre_hook(
        lambda module, args: formats.append(
            (args[0].is_contiguous(memory_format=torch.channels_last), args[0].is_contiguous())))
    channels_last = sample_counts(fast, x, 0.5, 1000, generator=gen(0), channels_last=True, **kw)
    hook.remove()
    assert formats and all(cl and not contiguous for cl, contiguous in formats), "inputs were not channels-last"
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) == convert_weights
    # the votes are spread over several classes, so a changed prediction would show
    assert (plain > 0).sum(dim=1).min() >= 3
    assert torch.equal(channels_last, plain)


def per_point_model():
    return fixed_model("tiny", (1, 8, 8), num_classes=3)


def test_points_sharing_batches_get_exactly_the_votes_of_one_point_at_a_time():
    # With n a multiple of batch_size every chunk holds one point's copies, so one call on B points consumes the
    # generator exactly like B calls on one point each: the votes must be identical, point for point, also
    # with a different noise level per point.
    model, x = per_point_model(), points(5, (1, 8, 8))
    sigma = torch.tensor([0.25, 0.5, 1.0, 0.5, 2.0])
    together = sample_counts(model, x, sigma, 600, batch_size=200, num_classes=3, generator=gen(7))
    g = gen(7)
    alone = torch.stack([sample_counts(model, x[i : i + 1], sigma[i : i + 1], 600, batch_size=200, num_classes=3,
                                       generator=g)[0] for i in range(len(x))])
    assert torch.equal(together, alone)
    assert len({tuple(row) for row in together.tolist()}) == len(x)  # the points do differ


def test_points_sharing_batches_follow_the_distribution_of_one_point_at_a_time():
    # When chunks straddle points (n not a multiple of batch_size) the draws differ, so compare distributions:
    # a point's votes must be homogeneous with its votes when certified alone at its own level (chi-square),
    # while a different level would be told apart (the test has power).
    model, x = per_point_model(), points(4, (1, 8, 8), seed=3)
    sigma = torch.tensor([0.25, 0.5, 1.0, 2.0])
    n, kw = 3000, dict(batch_size=448, num_classes=3)
    together = sample_counts(model, x, sigma, n, generator=gen(11), **kw).numpy()
    alone = np.stack([sample_counts(model, x[i : i + 1], sigma[i : i + 1], n, generator=gen(100 + i), **kw)[0].numpy()
                      for i in range(len(x))])
    assert together.sum(axis=1).tolist() == [n] * len(x)

    def pvalue(a, b):
        table = np.stack([a, b])
        table = table[:, table.sum(axis=0) > 0]
        return 1.0 if table.shape[1] < 2 else chi2_contingency(table).pvalue

    for i in range(len(x)):
        assert pvalue(together[i], alone[i]) > 1e-3 / len(x), (i, together[i], alone[i])
    wrong_level = sample_counts(model, x[:1], sigma[3:], n, generator=gen(5), **kw)[0].numpy()
    assert pvalue(together[0], wrong_level) < 1e-6


def test_speed_options_leave_the_callers_model_as_it_was():
    model = fixed_model("lenet", (3, 16, 16), num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cert = certify(model, points(2, (3, 16, 16)), 0.25, n0=32, n=256, alpha=0.01, batch_size=128, num_classes=5,
                   generator=gen(0), autocast_dtype=torch.bfloat16, channels_last=True)
    assert cert.radius.shape == (2,) and torch.isfinite(cert.radius).all()
    assert model.training  # put back in training mode
    for key, value in model.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key])
        assert value.is_contiguous()  # weights not converted behind the caller's back
