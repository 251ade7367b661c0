"""Every certification function refuses what the commands refuse, with a ValueError naming the argument."""
import warnings

import pytest
import torch
from torch import nn

from ssmooth.certify import certify, certify_adaptive, predict
from ssmooth.certify.cascade import certify_cascade
from ssmooth.certify.inductive import certify_inductive, predict_inductive
from ssmooth.data import IndexedDataset
from ssmooth.evaluate import CertifyConfig, certify_model
from ssmooth.selection import select_sigma

SHAPE = (1, 4, 4)


class ByMean(nn.Module):
    """``width`` logits; the class is 6 where the mean pixel is above 1/2, else 3 (one-hot, noise-proof enough at
    the small levels used here)."""

    def __init__(self, width: int = 10):
        super().__init__()
        self.width = width

    def forward(self, x):
        label = torch.where(x.flatten(1).mean(1) > 0.5, 6, 3)
        return nn.functional.one_hot(label, self.width).float()


class NaNLogits(nn.Module):
    def forward(self, x):
        return torch.full((len(x), 10), float("nan"))


def images(count=2, seed=0):
    return torch.rand((count, *SHAPE), generator=torch.Generator().manual_seed(seed))


def gen():
    return torch.Generator().manual_seed(0)


def inductive(model, x, sigma, *, num_classes):
    # the level selector is the model itself: its 10 outputs are levels of a 10-level grid
    return certify_inductive(model, ByMean(), x, [sigma] * 1 + [sigma * (k + 2) for k in range(9)], 0.25, n0=8,
                             n=50, num_classes=num_classes, seed=0, indices=list(range(len(x))))


def cascade(model, x, sigma, *, num_classes):
    return certify_cascade(model, x, [sigma, 2 * sigma], n0=8, n=50, num_classes=num_classes, seed=0,
                           indices=list(range(len(x))))


CALLS = {
    "certify": lambda m, x, s, *, num_classes: certify(m, x, s, n0=8, n=50, num_classes=num_classes, generator=gen()),
    "predict": lambda m, x, s, *, num_classes: predict(m, x, s, n=50, num_classes=num_classes, generator=gen()),
    "certify_adaptive": lambda m, x, s, *, num_classes: certify_adaptive(m, x, s, n0=8, n=50,
                                                                         num_classes=num_classes, generator=gen()),
    "certify_inductive": inductive,
    "certify_cascade": cascade,
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_a_model_wider_than_num_classes_is_refused_on_its_first_batch(call):
    # Before: the flat vote index point * 5 + 6 put point 0's votes into point 1's counts (a wrong certificate)
    with pytest.raises(ValueError, match=r"num_classes=5, but the model returns outputs of shape \(\d+, 10\)"):
        call(ByMean(10), torch.stack([torch.full(SHAPE, 0.9), torch.full(SHAPE, 0.1)]), 0.01, num_classes=5)


def test_two_classes_for_a_ten_class_model_is_a_clear_error_not_an_index_error():
    with pytest.raises(ValueError, match="num_classes=2"):
        certify(ByMean(10), images(), 0.25, n0=8, n=50, num_classes=2, generator=gen())
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        certify(ByMean(10), images(), 0.25, n0=8, n=50, num_classes=0, generator=gen())


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_input_is_refused(call, bad):
    # Before: a NaN pixel was certified (class 0, radius 0.62 for a linear model)
    x = images(3)
    x[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match="x holds NaN or infinite values .in 1 of its 3 points, the first at "
                                         "position 1"):
        call(nn.Sequential(nn.Flatten(), nn.Linear(16, 10)), x, 0.25, num_classes=10)


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_non_finite_logits_are_refused(call):
    with pytest.raises(ValueError, match="NaN or infinite logits"):
        call(NaNLogits(), images(), 0.25, num_classes=10)


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_an_empty_point_set_is_refused(call):
    with pytest.raises(ValueError, match="x holds no point"):
        call(ByMean(), images(0), 0.25, num_classes=10)


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
@pytest.mark.parametrize("level", [0.0, -0.5, float("inf"), float("nan")])
def test_a_level_that_is_not_finite_and_positive_is_refused(call, level):
    with pytest.raises(ValueError, match=r"(sigma|grid|levels) must be finite and > 0, got"):
        call(ByMean(), images(), level, num_classes=10)


def test_level_selection_refuses_the_same():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    x = images(3)
    with pytest.raises(ValueError, match="x holds no point"):
        select_sigma(model, images(0), [0.25, 0.5])
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x holds NaN"):
        select_sigma(model, x, [0.25, 0.5])
    with pytest.raises(ValueError, match="grid must be finite and > 0, got inf"):
        select_sigma(model, images(), [0.25, float("inf")])
    with pytest.raises(ValueError, match="NaN or infinite logits"):
        select_sigma(NaNLogits(), images(), [0.25, 0.5])


def test_certify_model_refuses_an_empty_subset_and_bad_levels(tmp_path):
    empty = IndexedDataset(torch.zeros(0, *SHAPE), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    cfg = CertifyConfig(n0=8, n=400, alpha=0.01, progress=False)
    with pytest.raises(ValueError, match="points is empty"):
        certify_model(ByMean(), empty, tmp_path, cfg, num_classes=10, base_sigma=0.25)
    data = IndexedDataset(images(2), torch.tensor([3, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="base_sigma must be finite and > 0, got inf"):
        certify_model(ByMean(), data, tmp_path, cfg, num_classes=10, base_sigma=float("inf"))
    with pytest.raises(ValueError, match="grid must be finite and > 0, got nan"):
        certify_model(ByMean(), data, tmp_path, cfg, num_classes=10, base_sigma=0.25, grid=[0.25, float("nan")])
    assert not (tmp_path / "summary.json").exists() and not list(tmp_path.glob("*.tsv"))


def test_one_image_is_a_batch_of_one_with_a_scalar_result():
    model, x = nn.Sequential(nn.Flatten(), nn.Linear(16, 10)), images(1)
    one = certify(model, x[0], 0.25, n0=8, n=50, num_classes=10, generator=gen())
    batch = certify(model, x, 0.25, n0=8, n=50, num_classes=10, generator=gen())
    assert one.prediction.shape == () and one.radius.shape == () and one.count.shape == ()
    assert int(one.prediction) == int(batch.prediction[0]) and float(one.radius) == float(batch.radius[0])
    label = predict(model, x[0], 0.25, n=50, num_classes=10, generator=gen())
    assert label.shape == () and int(label) == int(predict(model, x, 0.25, n=50, num_classes=10, generator=gen())[0])
    adaptive = certify_adaptive(model, x[0], 0.25, n0=8, n=50, num_classes=10, generator=gen())
    assert adaptive.radius.shape == () and adaptive.samples.shape == ()
    deployed = certify_inductive(model, ByMean(), x[0], [0.25] * 10, 0.25, n0=8, n=50, num_classes=10,
                                 generator=gen(), selector_generator=gen())
    assert deployed.radius.shape == () and deployed.level.shape == ()
    labels, level = predict_inductive(model, ByMean(), x[0], [0.25] * 10, 0.25, n=50, num_classes=10,
                                      generator=gen(), selector_generator=gen())
    assert labels.shape == () and level.shape == ()


def test_inputs_outside_the_unit_interval_warn_and_unit_inputs_do_not():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
    with pytest.warns(UserWarning, match=r"x holds values in 0\.\.255, outside \[0, 1\]"):
        certify(model, torch.full((1, *SHAPE), 255.0).index_fill_(3, torch.tensor([0]), 0.0), 0.25, n0=8, n=50,
                num_classes=10, generator=gen())
    with pytest.warns(UserWarning, match="outside"):
        predict(model, images() * 255, 0.25, n=50, num_classes=10, generator=gen())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        certify(model, images(), 0.25, n0=8, n=50, num_classes=10, generator=gen())


def test_a_one_class_model_predicts_its_only_class():
    # a grid of one level makes the inductive selector a one-class model: PREDICT needs no runner-up there
    one_class = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    assert predict(one_class, images(), 0.25, n=50, num_classes=1, generator=gen()).tolist() == [0, 0]
