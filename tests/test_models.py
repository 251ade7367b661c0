import pytest
import torch

from ssmooth.data import DATASETS
from ssmooth.models import MODELS, Normalize, create_model, register_model

# each model on the dataset shape it is meant for
CASES = [
    ("mlp", "digits", {}),
    ("tiny", "digits", {}),
    ("lenet", "mnist", {}),
    ("cifar_resnet", "cifar10", {"depth": 20}),
]


@pytest.mark.parametrize("name, dataset, options", CASES)
def test_model_maps_batch_to_logits_in_train_and_eval(name, dataset, options):
    info = DATASETS[dataset]
    model = create_model(
        name, num_classes=info.num_classes, input_shape=info.input_shape, mean=info.mean, std=info.std, **options
    )
    x = torch.rand(3, *info.input_shape)
    model.train()
    logits = model(x)
    assert logits.shape == (3, info.num_classes)
    logits.sum().backward()  # gradients reach the weights through the normalization layer
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (3, info.num_classes)
        assert model(x[:1]).shape == (1, info.num_classes)


def test_cifar_resnet_accepts_channels_last():
    model = create_model("cifar_resnet", num_classes=10, input_shape=(3, 32, 32), depth=20).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_normalize_subtracts_mean_and_divides_by_std_per_channel():
    layer = Normalize(mean=(0.5, 0.25), std=(0.5, 2.0))
    x = torch.tensor([[[[1.0, 0.0]], [[0.25, 4.25]]]])  # [1, 2 channels, 1, 2]
    expected = torch.tensor([[[[1.0, -1.0]], [[0.0, 2.0]]]])
    torch.testing.assert_close(layer(x), expected)


def test_normalization_is_the_first_layer_and_is_saved():
    model = create_model("lenet", num_classes=10, input_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,))
    assert isinstance(model[0], Normalize)
    state = model.state_dict()
    torch.testing.assert_close(state["normalize.mean"], torch.tensor([0.1307]))
    torch.testing.assert_close(state["normalize.std"], torch.tensor([0.3081]))

    # a checkpoint restores the normalization too
    other = create_model("lenet", num_classes=10, input_shape=(1, 28, 28))
    other.load_state_dict(state)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(other(x), model(x))


def test_no_normalization_is_the_identity():
    model = create_model("lenet", num_classes=10, input_shape=(1, 28, 28), mean=None, std=None)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model.normalize(x), x)
    assert set(model.state_dict()) >= {"normalize.mean", "normalize.std"}


def test_lenet_is_the_reference_architecture():
    model = create_model("lenet", num_classes=10, input_shape=(1, 28, 28))
    convs = [m for m in model.body if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.body if isinstance(m, torch.nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 20, (5, 5)), (20, 50, (5, 5))]
    assert [(f.in_features, f.out_features) for f in linears] == [(800, 500), (500, 10)]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.body) == 2


def test_mlp_hidden_sizes():
    model = create_model("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=[32])
    linears = [m for m in model.body if isinstance(m, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in linears] == [(64, 32), (32, 10)]


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'.*cifar_resnet.*lenet.*mlp"):
        create_model("resnet9000", num_classes=10, input_shape=(3, 32, 32))


def test_unsupported_depth_is_named():
    with pytest.raises(ValueError, match="got 32"):
        create_model("cifar_resnet", num_classes=10, input_shape=(3, 32, 32), depth=32)


def test_unknown_option_and_bad_normalization_are_errors():
    with pytest.raises(ValueError, match="unknown option.*depth"):
        create_model("mlp", num_classes=10, input_shape=(1, 8, 8), depth=20)
    with pytest.raises(ValueError, match="one value per channel"):
        create_model("cifar_resnet", num_classes=10, input_shape=(3, 32, 32), mean=(0.5,), std=(0.5,), depth=20)
    with pytest.raises(ValueError, match="both mean and std"):
        create_model("mlp", num_classes=10, input_shape=(1, 8, 8), mean=(0.5,))
    with pytest.raises(ValueError, match="positive"):
        Normalize(mean=(0.0,), std=(0.0,))
    with pytest.raises(ValueError, match="at least 16x16"):
        create_model("lenet", num_classes=10, input_shape=(1, 8, 8))


def test_register_model_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        register_model("mlp")(lambda *, num_classes, input_shape: torch.nn.Identity())
    assert "tiny" in MODELS


@pytest.mark.slow
def test_cifar_resnet110_has_about_1_7m_parameters():
    model = create_model("cifar_resnet", num_classes=10, input_shape=(3, 32, 32), depth=110)
    count = sum(p.numel() for p in model.parameters())
    assert 1.70e6 < count < 1.76e6  # He et al. 2016, Table 6: 1.7M
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
