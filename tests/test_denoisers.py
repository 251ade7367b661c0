"""Denoised smoothing: one-shot diffusion denoising, per-sample levels through a denoiser, denoiser training,
off-the-shelf classifiers from local files, and the stage on composed configs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from ssmooth.certify import certify
from ssmooth.certify.core import sample_counts
from ssmooth.cli.common import CONFIG_DIR, ConfigError
from ssmooth.pipeline.denoiser import load_classifier, train_clean_classifier, train_denoiser
from ssmooth.lit.denoiser import DenoiserModule, denoiser_loss
from ssmooth.models import create_model
from ssmooth.models.denoisers import (
    DenoisedClassifier,
    DiffusionDenoiser,
    DnCNN,
    build_denoiser,
    call_model,
    closest_timesteps,
)
from ssmooth.selection import select_sigma


def linear_schedule(steps: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


# ---------------------------------------------------------------------------------------------------------------
# One-shot diffusion denoising


def test_closest_timestep_is_the_closest():
    abar = torch.tensor([0.99, 0.8, 0.5])  # ratios sqrt((1 - abar) / abar): 0.1005, 0.5, 1.0
    # 2 sigma = 0.7 lies nearer 0.5 than 1.0; 2 sigma = 0.8 nearer 1.0; tiny and huge levels clamp to the ends.
    picked = closest_timesteps(abar, torch.tensor([0.35, 0.4, 1e-4, 10.0]))
    assert picked.tolist() == [1, 2, 0, 2]
    schedule = linear_schedule()
    ratio = ((1 - schedule) / schedule).sqrt()
    sigma = torch.rand(200, dtype=torch.float64) * 3
    picked = closest_timesteps(schedule, sigma)
    gaps = (ratio[None, :] - 2 * sigma[:, None]).abs()
    assert torch.equal(gaps.gather(1, picked[:, None]).squeeze(1), gaps.min(dim=1).values)


class OracleNoise(nn.Module):
    """A noise predictor that returns the noise the test drew: exact whenever x_t is a forward-process sample."""

    def __init__(self, eps: torch.Tensor):
        super().__init__()
        self.eps = eps
        self.seen_t = None

    def forward(self, x_t, t):
        self.seen_t = t
        return self.eps


def test_oracle_noise_predictor_recovers_the_clean_image_exactly():
    schedule = linear_schedule()
    steps = torch.tensor([10, 250, 600, 999])  # one level per image, mixed in one batch
    abar = schedule[steps]
    sigma = (((1 - abar) / abar).sqrt() / 2).float()  # levels that sit exactly on those timesteps
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=generator)
    eps = torch.randn(x.shape, generator=generator)
    oracle = OracleNoise(eps)
    denoiser = DiffusionDenoiser(oracle, schedule, clip=False)
    recovered = denoiser(x + sigma.view(-1, 1, 1, 1) * eps, sigma)
    assert oracle.seen_t.tolist() == steps.tolist()
    # exact up to float32 rounding, which grows with the level (sigma is about 80 at t = 999)
    torch.testing.assert_close(recovered, x, atol=1e-6 * (1 + float(sigma.max())), rtol=0)


def test_learned_variance_channels_are_dropped():
    x = torch.rand(2, 3, 4, 4)
    eps = torch.randn_like(x)
    both = DiffusionDenoiser(OracleNoise(torch.cat([eps, torch.full_like(eps, 9.0)], dim=1)), linear_schedule())
    plain_eps = DiffusionDenoiser(OracleNoise(eps), linear_schedule())
    sigma = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(both(x, sigma), plain_eps(x, sigma))


# ---------------------------------------------------------------------------------------------------------------
# Per-sample levels reach the denoiser


class LevelAsImage(nn.Module):
    """A 'denoiser' that outputs an image filled with the level it was told: the votes then show the level."""

    def forward(self, x, sigma):
        return sigma.view(-1, 1, 1, 1).expand_as(x).clone()


class ClassOfLevel(nn.Module):
    """Class k for a mean pixel near levels[k]."""

    def __init__(self, levels):
        super().__init__()
        self.register_buffer("levels", torch.tensor(levels))

    def forward(self, x):
        distance = (x.mean(dim=(1, 2, 3))[:, None] - self.levels[None, :]).abs()
        return -distance


def test_each_noisy_input_reaches_the_denoiser_with_its_own_level():
    levels = [0.12, 0.25, 0.5]
    model = DenoisedClassifier(ClassOfLevel(levels), LevelAsImage())
    x = torch.rand(3, 1, 4, 4)
    sigma = torch.tensor([0.5, 0.12, 0.25])
    counts = sample_counts(model, x, sigma, [7, 5, 3], batch_size=4, num_classes=3,
                           generator=torch.Generator().manual_seed(0))
    assert counts.tolist() == [[0, 0, 7], [5, 0, 0], [0, 3, 0]]
    cert = certify(model, x, sigma, n0=10, n=200, alpha=0.01, batch_size=64, num_classes=3, seed=0,
                   indices=[0, 1, 2])
    assert cert.prediction.tolist() == [2, 0, 1]
    # Test-time selection over the grid calls it at every level; with labels = class of the largest level,
    # only the largest level is right.
    chosen = select_sigma(model, x, levels, num_samples=4, labels=torch.tensor([2, 2, 2]),
                          generator=torch.Generator().manual_seed(0))
    assert chosen.tolist() == [0.5, 0.5, 0.5]


def test_call_model_passes_the_level_only_to_models_that_want_it():
    classifier = nn.Flatten()
    x = torch.rand(2, 1, 2, 2)
    assert torch.equal(call_model(classifier, x, torch.tensor([0.1, 0.2])), x.flatten(1))
    model = DenoisedClassifier(ClassOfLevel([0.1, 0.2]), LevelAsImage())
    assert call_model(model, x, torch.tensor([0.1, 0.2])).argmax(dim=1).tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# Training objectives


def identity_dncnn(channels: int = 1) -> DnCNN:
    dncnn = DnCNN(channels, depth=3, width=4)
    nn.init.zeros_(dncnn.net[-1].weight)
    nn.init.zeros_(dncnn.net[-1].bias)
    return dncnn


def test_mse_objective_of_an_identity_denoiser_is_the_noise_energy():
    model = DenoisedClassifier(create_model("mlp", num_classes=3, input_shape=(1, 4, 4), hidden=[8]), identity_dncnn())
    x, noise = torch.rand(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    sigma = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    loss, _ = denoiser_loss(model, x, sigma, "mse", noise=noise)
    expected = ((sigma.view(-1, 1, 1, 1) * noise) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_stability_targets_the_classifiers_clean_label_and_trains_only_the_denoiser():
    classifier = create_model("mlp", num_classes=3, input_shape=(1, 4, 4), hidden=[8])
    model = DenoisedClassifier(classifier, identity_dncnn())
    x = torch.rand(6, 1, 4, 4)
    zero = torch.zeros(6)  # no noise: the identity denoiser hands the classifier x itself
    loss, logits = denoiser_loss(model, x, zero + 1e-9, "stability", noise=torch.zeros_like(x))
    target = classifier(x).argmax(dim=1)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(classifier(x), target))
    loss.backward()
    assert all(p.grad is None for p in classifier.parameters())
    assert any(p.grad is not None for p in model.denoiser.parameters())
    module = DenoiserModule(model, "mse+stability", [0.25], torch.optim.Adam, mse_epochs=2)
    assert [module.objective_now()] == ["mse"]
    with pytest.raises(ValueError, match="objective"):
        DenoiserModule(model, "sharpness", [0.25], torch.optim.Adam)


def test_frozen_classifier_stays_in_eval_mode():
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.BatchNorm1d(3))
    model = DenoisedClassifier(classifier, identity_dncnn()).train()
    assert not classifier.training and model.denoiser.training


# ---------------------------------------------------------------------------------------------------------------
# Loading: denoiser folders and off-the-shelf classifiers


def test_clear_error_for_a_missing_or_wrong_diffusion_folder(tmp_path):
    with pytest.raises(ValueError, match=r"denoiser.path=.*nope: no such folder"):
        build_denoiser({"name": "diffusion", "path": str(tmp_path / "nope")}, channels=1)
    with pytest.raises(ValueError, match="not a diffusers DDPM folder: it has no unet or scheduler"):
        build_denoiser({"name": "diffusion", "path": str(tmp_path)}, channels=1)
    (tmp_path / "unet").mkdir()
    (tmp_path / "scheduler").mkdir()
    pytest.importorskip("diffusers")
    with pytest.raises(ValueError, match="could not be loaded"):
        build_denoiser({"name": "diffusion", "path": str(tmp_path)}, channels=1)
    with pytest.raises(ValueError, match="needs denoiser.path"):
        build_denoiser({"name": "diffusion", "path": None}, channels=1)
    with pytest.raises(ValueError, match="denoiser.name='dnn'"):
        build_denoiser({"name": "dnn"}, channels=1)


def test_timm_classifier_from_a_local_file(tmp_path):
    timm = pytest.importorskip("timm")
    from ssmooth.data import SmoothingDataModule

    info = SmoothingDataModule("digits").info
    body = timm.create_model("test_resnet", num_classes=info.num_classes, in_chans=1).eval()
    torch.save(body.state_dict(), tmp_path / "weights.pth")
    cfg = {"name": "timm", "arch": "test_resnet", "in_chans": 1, "normalize": False,
           "checkpoint": str(tmp_path / "weights.pth")}
    model = load_classifier(cfg, info)
    x = torch.rand(2, *info.input_shape)
    torch.testing.assert_close(model(x), body(x))
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="no such file"):
        load_classifier({**cfg, "checkpoint": str(tmp_path / "missing.pth")}, info)
    with pytest.raises(ConfigError, match="does not fit"):
        load_classifier({**cfg, "arch": "resnet10t"}, info)


def tiny_ddpm_folder(path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return unet, scheduler


def saved_mlp(path, info) -> str:
    torch.manual_seed(0)
    model = create_model("mlp", num_classes=info.num_classes, input_shape=info.input_shape, hidden=[16])
    torch.save(model.state_dict(), path)  # a plain state_dict, as a user would save one
    return str(path)


def test_tiny_diffusers_unet_round_trip_on_digits(tmp_path):
    from ssmooth.data import SmoothingDataModule

    unet, scheduler = tiny_ddpm_folder(tmp_path / "ddpm")
    loaded = build_denoiser({"name": "diffusion", "path": str(tmp_path / "ddpm")}, channels=1)
    torch.testing.assert_close(loaded.alphas_cumprod, scheduler.alphas_cumprod.float())
    x, sigma = torch.rand(3, 1, 8, 8), torch.tensor([0.1, 0.25, 0.5])
    with torch.no_grad():
        fresh = DiffusionDenoiser(unet.eval(), scheduler.alphas_cumprod)(x, sigma)
        torch.testing.assert_close(loaded.eval()(x, sigma), fresh)

    info = SmoothingDataModule("digits").info
    checkpoint = saved_mlp(tmp_path / "mlp.pt", info)
    cfg = compose_cfg(["~experiment", "stage=denoiser", "denoiser=diffusion", f"denoiser.path={tmp_path / 'ddpm'}",
                       "model.hidden=[16]", f"+model.checkpoint={checkpoint}", f"output_dir={tmp_path / 'run'}",
                       "certify.max=30", "certify.skip=10", "certify.n0=8", "certify.n=40", "certify.policy=constant",
                       "certify.progress=false", "logger=none"])
    summary = train_denoiser(cfg)
    assert summary["points"]["count"] == 3 and summary["objective"] == "diffusion"
    assert summary["name"].endswith("/denoised")
    assert json.loads((tmp_path / "run" / "denoised" / "denoiser.json").read_text())["name"] == "diffusion"


def test_stage_refuses_bad_settings_before_any_work(tmp_path):
    base = ["~experiment", "stage=denoiser", f"output_dir={tmp_path}", "logger=none"]
    with pytest.raises(ConfigError, match="no such folder"):
        train_denoiser(compose_cfg([*base, "denoiser=diffusion", f"denoiser.path={tmp_path / 'none'}"]))
    with pytest.raises(ConfigError, match="needs model.checkpoint"):
        train_denoiser(compose_cfg([*base, "model=timm"]))
    with pytest.raises(ConfigError, match="compare: unknown key"):
        train_denoiser(compose_cfg([*base, "+compare.everything=true"]))
    assert not any(tmp_path.iterdir())


def test_denoiser_folder_refuses_a_checkpoint_trained_with_other_settings(tmp_path):
    from ssmooth.pipeline.denoiser import check_denoiser_folder

    settings = {"denoiser": {"name": "dncnn", "train": {"objective": "mse"}}, "seed": 0}
    check_denoiser_folder(tmp_path, settings)
    check_denoiser_folder(tmp_path, settings)  # the same settings resume
    other = {"denoiser": {"name": "dncnn", "train": {"objective": "stability"}}, "seed": 0}
    with pytest.raises(ConfigError, match=r"other settings: denoiser.train.objective=stability \(was mse\)"):
        check_denoiser_folder(tmp_path, other)


@pytest.mark.slow
def test_digits_recipe_certifies_three_arms_side_by_side(tmp_path):
    cfg = compose_cfg(["experiment=digits_denoised", f"output_dir={tmp_path}", "logger=none", "trainer.max_epochs=2",
                       "denoiser.train.epochs=2", "certify.n=200", "certify.skip=20", "certify.progress=false",
                       "trainer.enable_progress_bar=false"])
    summary = train_denoiser(cfg)
    assert summary["name"] == "digits_denoised/denoised"
    for arm in ("direct", "denoised", "gaussian"):
        assert (tmp_path / arm / "summary.json").is_file()
    assert math.isfinite(json.loads((tmp_path / "denoised" / "denoiser.json").read_text())["train_wall_time_s"])
    # Another level and other certification settings reuse the clean classifier instead of training it again.
    last = tmp_path / "classifier" / "checkpoints" / "last.ckpt"
    trained_at = last.stat().st_mtime_ns
    again = compose_cfg(["experiment=digits_denoised", f"output_dir={tmp_path}", "logger=none",
                         "trainer.max_epochs=2", "denoiser=none", "noise.sigma=0.5", "certify.n=100"])
    assert train_clean_classifier(again) == str(last)
    assert last.stat().st_mtime_ns == trained_at
