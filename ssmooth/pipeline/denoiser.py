"""Denoised smoothing as a stage (``stage=denoiser``): certify a classifier that was not trained under noise.

  ssmooth-train experiment=digits_denoised                          # minutes on a CPU: the three arms below
  ssmooth-train experiment=mnist_denoised noise.sigma=0.25 model.checkpoint=clean.ckpt denoiser.train.objective=mse
  ssmooth-train stage=denoiser denoiser=diffusion denoiser.path=DDPM_DIR model=timm model.arch=resnet18 \
      model.checkpoint=resnet18.safetensors dataset=cifar10         # an off-the-shelf classifier and DDPM

The classifier comes from ``model.checkpoint`` (an ssmooth checkpoint or a weights file; frozen). Without one,
the stage first trains ``model`` on clean images. Then, each in its own subfolder of the run folder:
``direct/``     the classifier smoothed as it is (with ``compare.direct``);
``denoised/``   a denoiser trained in front of it (``denoiser=dncnn``; ``denoiser=diffusion`` needs no training),
                and the composition certified at ``noise.sigma`` (or per-sample levels, ``certify.policy``);
``gaussian/``   the same architecture trained under Gaussian noise at ``noise.sigma``, the usual reference
                (with ``compare.gaussian``).
A table prints the arms side by side. ``train_denoiser`` returns the summary of the denoised arm.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ssmooth.build import (
    CONFIG_DIR,
    ConfigError,
    certification_grid,
    certify_config,
    check_output_width,
    config_differences,
    log,
    plain,
    resolve_device,
    test_points,
)
from ssmooth.pipeline.run import stage_settings

OFF_THE_SHELF = ("timm", "torchvision")
TRAIN_KEYS = {"objective", "epochs", "lr", "sigma", "grid_factors", "mse_epochs", "batch_size"}


def load_weights(path) -> dict:
    """A state_dict from ``path``: an ssmooth checkpoint, a ``.safetensors`` file, or a torch file holding a
    state_dict (bare, or under ``state_dict`` / ``model``). ConfigError naming the path otherwise."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.checkpoint={path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a torn or foreign file
        raise ConfigError(f"model.checkpoint={path} could not be read ({type(err).__name__})") from None
    if isinstance(state, dict) and "ssmooth" in state and "state_dict" in state:
        from ssmooth.lit.module import model_state

        return model_state(state["state_dict"])
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.checkpoint={path} holds no state_dict")
    return state


def build_classifier(model_cfg: dict, info):
    """The classifier of ``model_cfg`` (without its ``checkpoint`` key), normalization first: one of the
    project's models, or a timm / torchvision architecture ``arch`` built without downloading weights."""
    options = {k: v for k, v in model_cfg.items() if k != "checkpoint"}
    if options.get("name") not in OFF_THE_SHELF:
        from ssmooth.build import build_model

        return build_model(options, info)
    from collections import OrderedDict

    from torch import nn

    from ssmooth.models import Normalize

    name, arch = options.pop("name"), options.pop("arch", None)
    normalize = options.pop("normalize", True)
    try:
        if name == "timm":
            import timm

            body = timm.create_model(arch, pretrained=False, num_classes=info.num_classes, **options)
        else:
            import torchvision

            body = torchvision.models.get_model(arch, weights=None, num_classes=info.num_classes, **options)
    except ImportError:
        raise ConfigError(f"model={name} needs the {name} package: pip install 'ssmooth[denoise]'") from None
    except Exception as err:  # unknown architecture names and options
        raise ConfigError(f"model={name} model.arch={arch}: {err}") from None
    channels = info.input_shape[0]
    mean, std = (info.mean, info.std) if normalize else ((0.0,) * channels, (1.0,) * channels)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), body=body))


def load_classifier(model_cfg: dict, info):
    """The frozen classifier ``model.checkpoint`` holds. Weights of the whole model (``normalize.``/``body.``
    keys, as ssmooth saves them) or of the network alone (a timm or torchvision file) are both accepted."""
    model = build_classifier(model_cfg, info)
    state = load_weights(model_cfg["checkpoint"])
    target = model if any(k.startswith("body.") for k in state) else model.body
    try:
        target.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"model.checkpoint={model_cfg['checkpoint']} does not fit model={model_cfg['name']}: "
                          f"{first}") from None
    check_output_width(model, info.input_shape, info.num_classes, f"model.checkpoint={model_cfg['checkpoint']}")
    return model.requires_grad_(False).eval()


def load_dncnn(denoiser, path) -> None:
    """Start from (or certify) the DnCNN of an earlier denoiser run: its checkpoint (``denoised/checkpoints/
    last.ckpt``) holds the pair, the denoiser's weights under ``model.denoiser.``."""
    from ssmooth.lit.module import load_checkpoint

    try:
        _, state = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"denoiser.path: {err}") from None
    prefix = "model.denoiser."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ConfigError(f"denoiser.path={path} holds no denoiser (a checkpoint of stage=denoiser has one)")
    try:
        denoiser.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(f"denoiser.path={path} does not fit denoiser.depth/width: "
                          f"{str(err).splitlines()[0]}") from None


def train_clean_classifier(cfg: DictConfig) -> str:
    """Train ``model`` on clean images (cross-entropy, no noise) into ``classifier/``; returns its last.ckpt.
    Reuses the project's training stage, so the folder resumes and skips like any other (the noise level it
    reports is that of its validation monitor only)."""
    from ssmooth.pipeline import train_and_certify

    # Only what decides the classifier is kept, so that runs at other levels, with other denoisers or other
    # certification settings find this folder finished and reuse it.
    certify_defaults = OmegaConf.load(Path(CONFIG_DIR) / "certify" / "default.yaml")
    sub = stage_settings(cfg, "classifier", stage="pretrain", noise={"kind": "constant", "sigma": 0.25},
                   objective={"_target_": "ssmooth.lit.denoiser.clean_objective", "_partial_": True,
                              "name": "clean"},
                   certify={**OmegaConf.to_container(certify_defaults), "enabled": False})
    with open_dict(sub):
        sub.model.pop("checkpoint", None)
        for key in ("denoiser", "compare"):
            sub.pop(key, None)
    last = Path(sub.output_dir) / "checkpoints" / "last.ckpt"
    log.info(f"no model.checkpoint: training model={cfg.model.name} on clean images first ({sub.output_dir})")
    train_and_certify(sub)
    return str(last)


def _training_levels(train: dict, sigma: float) -> list[float]:
    from ssmooth.noise import sigma_grid

    base = float(train.get("sigma") or sigma)
    factors = train.get("grid_factors")
    try:
        return sigma_grid(base, factors) if factors else [base]
    except ValueError as err:
        raise ConfigError(f"denoiser.train: {err}") from None


def fit_denoiser(cfg: DictConfig, model, options: dict, datamodule, out: Path, meta: dict) -> dict:
    """Train ``model.denoiser`` in ``out`` (checkpoints/last.ckpt; an interrupted run resumes, a finished one is
    loaded). Returns the training facts for the summary."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ssmooth.build import build_loggers, build_trainer
    from ssmooth.lit.denoiser import DENOISER_OBJECTIVES, DenoiserModule

    train = dict(options.get("train") or {})
    unknown = set(train) - TRAIN_KEYS
    if unknown:
        raise ConfigError(f"denoiser.train: unknown key(s) {sorted(unknown)}; allowed {sorted(TRAIN_KEYS)}")
    objective = train.get("objective", "mse")
    if objective not in DENOISER_OBJECTIVES:
        raise ConfigError(f"denoiser.train.objective={objective!r} must be one of {DENOISER_OBJECTIVES}")
    epochs = int(train.get("epochs", 10))
    levels = _training_levels(train, float(cfg.noise.sigma))
    mse_epochs = train.get("mse_epochs")
    mse_epochs = epochs // 2 if mse_epochs is None else int(mse_epochs)
    facts = {"objective": objective, "epochs": epochs, "levels": levels, "mse_epochs": mse_epochs}
    if epochs == 0:
        return facts
    check_denoiser_folder(out, {"denoiser": options, "model": meta["model"], "dataset": plain(cfg.dataset),
                                "seed": int(cfg.seed)})
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    optimizer = functools.partial(torch.optim.Adam, lr=float(train.get("lr", 1e-3)))
    module = DenoiserModule(model, objective, levels, optimizer, mse_epochs=mse_epochs,
                            meta={**meta, "denoiser": {**options, "facts": facts}})
    sub = cfg.copy()
    with open_dict(sub):
        sub.trainer.max_epochs = epochs
    last = out / "checkpoints" / "last.ckpt"
    callbacks = [ModelCheckpoint(dirpath=out / "checkpoints", filename="epoch{epoch:03d}", auto_insert_metric_name=False,
                                 save_last=True, save_top_k=1)]
    loggers = build_loggers(plain(cfg.logger), out)
    trainer = build_trainer(sub, out, loggers, callbacks)
    batch_size = train.get("batch_size") or cfg.dataset.batch_size
    loader = torch.utils.data.DataLoader(datamodule.train_set, batch_size=int(batch_size), shuffle=True,
                                         num_workers=int(cfg.dataset.num_workers))
    began = time.perf_counter()
    with warnings.catch_warnings():
        # The frozen classifier is in eval mode on purpose: its batch-norm statistics must not move.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(last) if last.is_file() else None)
    facts["train_wall_time_s"] = round(time.perf_counter() - began, 2)
    return facts


def check_denoiser_folder(out: Path, settings: dict) -> None:
    """A denoiser folder resumes or reuses only the training it was started with: its checkpoint is refused,
    naming the differences, when these settings (denoiser, classifier, data, seed) differ from the saved ones."""

    saved_path = out / "training.json"
    if saved_path.is_file():
        differences = config_differences(json.loads(saved_path.read_text()), settings, ("dataset.num_workers",))
        if differences:
            raise ConfigError(f"{out} already holds a denoiser trained with other settings: {'; '.join(differences)}."
                              " Use a new folder (the folder is left as it is)")
        return
    out.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(json.dumps(settings, indent=1))


def certify_arm(model, points, out: Path, cert_cfg, *, info, sigma: float, grid, meta: dict) -> dict:
    from ssmooth.certify.runfolder import RunFolderError
    from ssmooth.evaluate import certify_model

    try:
        summary = certify_model(model, points, out, cert_cfg, num_classes=info.num_classes, base_sigma=sigma,
                                grid=grid, dataset=info.name, meta=meta, device=resolve_device("auto"))
    except RunFolderError as err:
        raise ConfigError(str(err)) from None
    from ssmooth.pipeline.train import draw_certified_accuracy

    draw_certified_accuracy(summary, out)
    return summary


def _compare_options(cfg: DictConfig) -> dict:
    compare = {"direct": False, "gaussian": False, **plain(cfg.get("compare"))}
    unknown = set(compare) - {"direct", "gaussian"}
    if unknown:
        raise ConfigError(f"compare: unknown key(s) {sorted(unknown)}; allowed ['direct', 'gaussian']")
    return compare


def train_denoiser(cfg: DictConfig) -> dict | None:
    """The ``denoiser`` stage on the composed config (see the module docstring). Returns the summary of the
    denoised arm (of the direct one with ``denoiser=none``)."""
    from ssmooth.build import build_datamodule, load_data
    from ssmooth.pipeline import train_and_certify
    from ssmooth.models.denoisers import DenoisedClassifier, build_denoiser

    options = plain(cfg.get("denoiser")) or {"name": "none"}
    compare = _compare_options(cfg)
    cert_cfg = certify_config(cfg.certify)
    model_cfg = plain(cfg.model)
    if model_cfg.get("name") in OFF_THE_SHELF and not model_cfg.get("checkpoint"):
        raise ConfigError(f"model={model_cfg['name']} needs model.checkpoint=PATH (a local weights file)")
    if compare["gaussian"] and model_cfg.get("name") in OFF_THE_SHELF:
        raise ConfigError(f"compare.gaussian trains the architecture, which model={model_cfg['name']} cannot")
    datamodule = build_datamodule(plain(cfg.dataset), cfg.seed)
    load_data(datamodule)
    info = datamodule.info
    try:
        denoiser = build_denoiser(options, info.input_shape[0])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    points = test_points(datamodule, cert_cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    sigma = float(cfg.noise.sigma)
    if not model_cfg.get("checkpoint"):
        model_cfg["checkpoint"] = train_clean_classifier(cfg)
    classifier = load_classifier(model_cfg, info)
    meta = {"model": model_cfg, "dataset": {"name": info.name}, "noise": {"kind": "constant", "sigma": sigma}}

    summaries = {}
    if compare["direct"] or denoiser is None:
        grid = certification_grid(cert_cfg, sigma, None, "the classifier")
        summaries["direct"] = certify_arm(classifier, points, out / "direct", cert_cfg, info=info, sigma=sigma,
                                          grid=grid, meta={**meta, "name": f"{cfg.name}/direct", "objective": "clean"})
    if denoiser is not None:
        if options["name"] == "dncnn" and options.get("path"):
            load_dncnn(denoiser, options["path"])
        model = DenoisedClassifier(classifier, denoiser)
        facts = {"levels": [sigma]}
        if options["name"] == "dncnn":
            facts = fit_denoiser(cfg, model, options, datamodule, out / "denoised", meta)
        grid = certification_grid(cert_cfg, sigma, facts["levels"] if len(facts["levels"]) > 1 else None,
                                  f"the denoiser (denoiser={options['name']})")
        objective = f"{options['name']} {facts.get('objective', '')}".strip()
        summaries["denoised"] = certify_arm(
            model, points, out / "denoised", cert_cfg, info=info, sigma=sigma, grid=grid,
            meta={**meta, "name": f"{cfg.name}/denoised", "objective": objective,
                  "train_wall_time_s": facts.get("train_wall_time_s")})
        (out / "denoised" / "denoiser.json").write_text(json.dumps({**options, **facts}, indent=1))
    if compare["gaussian"]:
        gaussian_model = {k: v for k, v in model_cfg.items() if k != "checkpoint"}
        summaries["gaussian"] = train_and_certify(stage_settings(cfg, "gaussian", stage="pretrain", model=gaussian_model,
                                                           noise={"kind": "constant", "sigma": sigma}))
    return summaries.get("denoised", summaries.get("direct"))

