"""The selector stage: a small network that predicts each input's level, trained on the level table of a
sample-wise checkpoint, then certified with the inductive certificate (levels chosen from the input alone)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig

from ssmooth.build import (
    ConfigError,
    build_datamodule,
    build_loggers,
    build_model,
    build_trainer,
    certification_note,
    certify_config,
    finish_wandb,
    log,
    on_interrupt,
    plain,
    resolve_device,
    root_cause,
    test_points,
)

SELECTOR_KEYS = {"enabled", "model", "sigma_e", "epochs", "lr", "targets", "temperature", "balance", "copies",
                 "consistency", "entropy", "target_samples", "target_images"}


def train_selector(cfg: DictConfig, classifier_ckpt: Path) -> dict | None:
    """The level selector of the inductive certificate, trained on the level table of a sample-wise checkpoint
    (``selector.*``). Writes ``checkpoints/last.ckpt`` in the stage folder (the classifier, its table and the
    selector in one file, ready for ``ssmooth-certify``), then certifies the inductive certificate on the same
    points as the sample-wise stage (its constant and transductive certificates are that stage's). Returns the
    summary. A finished stage is skipped, and an interrupted one resumes with the selector it already saved."""
    output_dir = Path(cfg.output_dir)
    if (output_dir / "summary.json").is_file():
        log.info(f"{output_dir}: already finished (summary.json exists), skipping")
        return json.loads((output_dir / "summary.json").read_text())
    options = check_selector_settings(cfg)
    cert_cfg = certify_config(cfg.certify)
    datamodule = build_datamodule(plain(cfg.dataset), cfg.seed)
    datamodule.setup("fit")
    out = output_dir / "checkpoints" / "last.ckpt"
    if not out.is_file():
        if not fit_selector(cfg, options, classifier_ckpt, datamodule, out):
            return None  # a rank other than 0
    if not cert_cfg.enabled:
        return None
    return certify_selector(cfg, cert_cfg, datamodule, out)


def check_selector_settings(cfg: DictConfig) -> dict:
    """The ``selector.*`` settings, checked without the classifier (its grid's largest level is the default sigma_e)."""
    options = plain(cfg.selector)
    unknown = set(options) - SELECTOR_KEYS
    if unknown:
        raise ConfigError(f"selector: unknown key(s) {sorted(unknown)}")
    if options.get("sigma_e") is not None and not float(options["sigma_e"]) > 0:
        raise ConfigError(f"selector.sigma_e={options['sigma_e']} must be > 0")
    if options.get("targets", "radius") not in ("radius", "table"):
        raise ConfigError(f"selector.targets={options.get('targets')!r} must be 'radius' or 'table'")
    if not float(options.get("temperature", 0.1)) > 0:
        raise ConfigError(f"selector.temperature={options.get('temperature')} must be > 0")
    if not isinstance(options.get("epochs"), int) or options["epochs"] < 1:
        raise ConfigError(f"selector.epochs={options.get('epochs')!r} must be an integer >= 1")
    optimizer = _selector_optimizer(cfg, options)
    import torch

    try:  # built once now on a stand-in weight, so that a bad learning rate fails before the first stage
        optimizer(params=[torch.nn.Parameter(torch.zeros(1))])
    except Exception as err:
        raise ConfigError(f"selector.lr={options['lr']}: {root_cause(err)}") from None
    return options


def _selector_optimizer(cfg: DictConfig, options: dict):
    import functools

    from hydra.utils import instantiate

    try:
        return functools.partial(instantiate(cfg.optim.optimizer), lr=options["lr"])
    except Exception as err:
        raise ConfigError(f"optim: {root_cause(err)}") from None


def fit_selector(cfg: DictConfig, options: dict, classifier_ckpt: Path, datamodule, out: Path) -> bool:
    """Train the selector on the classifier's level table and save both in ``out``; False on ranks other than 0
    (they save nothing)."""
    import dataclasses

    import lightning as L

    from ssmooth.lit.module import load_checkpoint
    from ssmooth.lit.selector import default_selector_model, save_with_selector

    meta, state = load_checkpoint(classifier_ckpt)
    grid = meta["noise"].get("grid") or []
    if len(grid) < 2:
        raise ConfigError(f"selector: {classifier_ckpt} was not finetuned with per-sample levels (grid {grid})")
    # The largest grid level by default: on MNIST (LeNet, 100 points) the routed certificate scored as well or
    # better with it than at the base level at each of sigma 0.25 / 0.5 / 1.0 (+0.385 / +0.096 / 0.000 ACR), and
    # the demo's inductive certificate gained 0.058.
    sigma_e = float(options.get("sigma_e") or max(grid))
    if not sigma_e > 0:
        raise ConfigError(f"selector.sigma_e={sigma_e} must be > 0")
    model_cfg = options.get("model") or default_selector_model(meta["model"])
    L.seed_everything(cfg.seed, workers=True)
    selector = build_model(model_cfg, dataclasses.replace(datamodule.info, num_classes=len(grid)))
    optimizer = _selector_optimizer(cfg, options)
    began = time.perf_counter()
    module, target_stats = _selector_module(cfg, options, meta, state, grid, sigma_e, selector, optimizer,
                                            datamodule)
    output_dir = Path(cfg.output_dir)
    loggers = build_loggers(plain(cfg.logger), output_dir)
    trainer = build_trainer(cfg, output_dir, loggers, callbacks=[])
    try:
        # Training data only: the test split has class labels, not levels.
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    finally:
        finish_wandb(loggers)
    if not trainer.is_global_zero:
        return False
    selector_meta = {"model": model_cfg, "grid": [float(s) for s in grid], "sigma_e": sigma_e,
                     "targets": options.get("targets", "radius"), "target_stats": target_stats,
                     "epochs": int(cfg.trainer.max_epochs), "trained_from": str(classifier_ckpt),
                     "train_wall_time_s": round(time.perf_counter() - began, 2)}
    save_with_selector(classifier_ckpt, selector, selector_meta, out)
    log.info(f"trained model: {out} (the classifier and its level selector)")
    return True


def _selector_module(cfg, options: dict, meta: dict, state: dict, grid, sigma_e: float, selector, optimizer,
                     datamodule):
    """The LightningModule that trains the selector (``selector.targets``: radius or table), and what to report
    about its targets (images kept, best-level shares, their cost)."""
    from ssmooth.lit.module import model_state
    from ssmooth.lit.selector import RadiusSelectorModule, SelectorModule, selector_radius_targets

    targets_kind = options.get("targets", "radius")
    if targets_kind == "table":
        targets = _level_targets(state, grid, datamodule.train_set.indices)
        return SelectorModule(selector, targets, sigma_e, len(grid), optimizer, meta=meta), {}
    if targets_kind != "radius":
        raise ConfigError(f"selector.targets={targets_kind!r} must be 'radius' or 'table'")
    cert_cfg = certify_config(cfg.certify)
    classifier = build_model(meta["model"], datamodule.info)
    classifier.load_state_dict(model_state(state))
    try:
        targets, weights, stats = selector_radius_targets(
            classifier, datamodule.train_set, grid, len(state["noise.table"]), options, seed=cfg.seed,
            cap=cert_cfg.alpha ** (1 / cert_cfg.n), batch_size=cert_cfg.batch_size, device=resolve_device("auto"))
        module = RadiusSelectorModule(selector, targets, weights, sigma_e, optimizer, meta=meta,
                                      copies=int(options.get("copies", 2)),
                                      consistency=float(options.get("consistency", 0.0)),
                                      entropy=float(options.get("entropy", 0.0)))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    log.info(f"selector targets: {stats['kept']} of {stats['images']} images kept, best level shares "
             f"{stats['best_level_share']}, {stats['forward_passes']:,} forward passes in {stats['wall_time_s']} s")
    return module, stats


def _level_targets(state: dict, grid, train_indices):
    """Each training point's level as an index into ``grid`` (the test split has class labels, not levels)."""
    import torch

    from ssmooth.lit.selector import level_targets

    targets = torch.zeros(len(state["noise.table"]), dtype=torch.long)
    try:
        targets[train_indices] = level_targets(state["noise.table"][train_indices], grid)
    except ValueError as err:
        raise ConfigError(f"selector: {err}") from None
    return targets


def certify_selector(cfg: DictConfig, cert_cfg, datamodule, out: Path) -> dict:
    """The inductive certificate of the saved classifier and selector. Everything certified comes from the one
    saved file, so a resumed stage never mixes two selectors' rows."""
    import dataclasses

    from ssmooth.certify.runfolder import RunFolderError, file_sha256
    from ssmooth.evaluate import certify_model
    from ssmooth.lit.module import load_checkpoint, model_state
    from ssmooth.lit.selector import load_selector
    from ssmooth.pipeline.train import draw_certified_accuracy

    output_dir = Path(cfg.output_dir)
    meta, state = load_checkpoint(out)
    classifier = build_model(meta["model"], datamodule.info)
    classifier.load_state_dict(model_state(state))
    selector = load_selector(meta, state, datamodule.info)
    points = test_points(datamodule, cert_cfg)
    cert_cfg = dataclasses.replace(cert_cfg, policy="inductive", best_constant=False)
    source = Path(meta["selector"]["trained_from"]).parent.parent
    if reuse_constant_rows(source, output_dir, classifier, points, cert_cfg, base_sigma=meta["noise"]["sigma"],
                           dataset=datamodule.info.name, checkpoint_sha256=file_sha256(out), selector=selector):
        log.info(f"{output_dir}: the constant certificate's rows are those of {source} (the same classifier, "
                 "points and sampling)")
    with on_interrupt(lambda: certification_note(output_dir, len(points)), folder=output_dir):
        try:
            summary = certify_model(classifier, points, output_dir, cert_cfg, num_classes=datamodule.info.num_classes,
                                    base_sigma=meta["noise"]["sigma"], dataset=datamodule.info.name,
                                    meta={**meta, "name": cfg.name,
                                          "train_wall_time_s": meta["selector"].get("train_wall_time_s")},
                                    device=resolve_device("auto"), selector=selector,
                                    checkpoint_sha256=file_sha256(out))
        except RunFolderError as err:
            raise ConfigError(str(err)) from None
    draw_certified_accuracy(summary, output_dir)
    return summary


# What may differ between the sample-wise stage's folder and the selector stage's for their constant rows to be
# the same: how the run chooses levels, and the checkpoint file (the classifier inside is compared by its weights).
_ROWS_NEUTRAL = ("checkpoint_sha256", "policy", "grid", "selection", "selector", "experts")


def reuse_constant_rows(source: Path, output_dir: Path, classifier, points, cert_cfg, **how) -> bool:
    """Start the selector stage's constant certificate from the rows the stage that certified its classifier
    already wrote, instead of certifying the same points again: only into a folder with no rows yet, and only
    when that stage finished and certified the same weights (``state_dict`` hash), points, sampling, level,
    seed and package version. The copied rows are then resumed as the stage's own. Returns whether it copied."""
    import shutil

    from ssmooth.certify.runfolder import FINGERPRINT_FILE, diff_fingerprints, open_run_folder, state_dict_sha256
    from ssmooth.evaluate import _settled

    rows = source / "certify_constant.tsv"
    if not (rows.is_file() and (source / "summary.json").is_file() and (source / FINGERPRINT_FILE).is_file()):
        return False
    if (output_dir / FINGERPRINT_FILE).exists() or list(output_dir.glob("certify*.tsv")):
        return False
    recorded = json.loads((source / FINGERPRINT_FILE).read_text())
    _, _, fp = _settled(classifier, points, cert_cfg, **how)
    if recorded.get("checkpoint_sha256") != state_dict_sha256(classifier) \
            or [k for k in diff_fingerprints(recorded, fp) if k not in _ROWS_NEUTRAL]:
        return False
    output_dir.mkdir(parents=True, exist_ok=True)
    with open_run_folder(output_dir, fp):  # the fingerprint first: rows without one are never trusted
        shutil.copyfile(rows, output_dir / rows.name)
    return True
