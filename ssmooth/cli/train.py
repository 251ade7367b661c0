"""ssmooth-train: train a base classifier under noise, then certify it.

  ssmooth-train                                             # the demo: 8x8 digits, MLP, sigma 0.25
  ssmooth-train experiment=mnist_gaussian noise.sigma=0.5   # a published recipe
  ssmooth-train -m noise.sigma=0.25,0.5,1.0 objective=gaussian,macer     # a sweep, one folder per job
  ssmooth-train stage=finetune pretrained=PATH noise=samplewise          # sample-wise finetuning (stages B-C)
  ssmooth-train trainer=ddp trainer.devices=4 trainer.num_nodes=2        # several GPUs / nodes

Every setting is checked before training starts; a bad one exits with status 2 and one line naming it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ssmooth.cli.common import (
    CONFIG_DIR,
    ConfigError,
    certify_config,
    exit_on_config_error,
    plain,
    report_certification,
    resolve_device,
)

STAGES = ("pretrain", "finetune", "pipeline")
NOISE_KINDS = ("constant", "samplewise")


def build_model(model_cfg: dict, info):
    """The network of ``model_cfg`` for dataset ``info``, normalization included as its first layer."""
    from ssmooth.models import create_model

    options = dict(model_cfg)
    name = options.pop("name")
    normalize = options.pop("normalize", True)
    try:
        return create_model(name, num_classes=info.num_classes, input_shape=info.input_shape,
                            mean=info.mean if normalize else None, std=info.std if normalize else None, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model: {err}") from None


def build_noise(noise_cfg: dict, num_train: int):
    from ssmooth.noise import ConstantSigma, SampleWiseSigma, sigma_grid

    kind = noise_cfg.get("kind")
    if kind not in NOISE_KINDS:
        raise ConfigError(f"noise.kind={kind!r} must be one of {NOISE_KINDS}")
    sigma = noise_cfg.get("sigma")
    if not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ConfigError(f"noise.sigma={sigma!r} must be > 0")
    if kind == "constant":
        unknown = set(noise_cfg) - {"kind", "sigma"}
        if unknown:
            raise ConfigError(f"noise: unknown key(s) {sorted(unknown)} for kind=constant")
        return ConstantSigma(sigma)
    allowed = {"kind", "sigma", "grid_factors", "update_every", "num_draws", "soft", "selection", "fraction"}
    unknown = set(noise_cfg) - allowed
    if unknown:
        raise ConfigError(f"noise: unknown key(s) {sorted(unknown)}; allowed {sorted(allowed)}")
    if noise_cfg["update_every"] < 1:
        raise ConfigError(f"noise.update_every={noise_cfg['update_every']} must be >= 1")
    if noise_cfg["num_draws"] < 1:
        raise ConfigError(f"noise.num_draws={noise_cfg['num_draws']} must be >= 1")
    if noise_cfg.get("selection", "local") not in ("local", "full"):
        raise ConfigError(f"noise.selection={noise_cfg['selection']!r} must be 'local' or 'full'")
    if not 0 < noise_cfg.get("fraction", 1.0) <= 1:
        raise ConfigError(f"noise.fraction={noise_cfg['fraction']!r} must be in (0, 1]")
    try:
        grid = sigma_grid(sigma, noise_cfg["grid_factors"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return SampleWiseSigma(sigma, grid, num_train)


def build_objective(objective_cfg: dict, attack_node):
    from hydra.utils import instantiate

    options = dict(objective_cfg)
    name = options.pop("name", "?")
    try:
        if name == "smoothadv":
            if not attack_node:
                raise ConfigError("objective=smoothadv needs an attack: set attack=pgd or attack=ddn")
            attack_options = {k: v for k, v in plain(attack_node).items() if k != "name"}
            options["attack"] = instantiate(attack_options)
        elif attack_node:
            raise ConfigError(f"attack={attack_node.get('name')} is only used by objective=smoothadv, not {name}")
        return instantiate(options)
    except ConfigError:
        raise
    except Exception as err:  # Hydra wraps the constructor's ValueError/TypeError
        raise ConfigError(f"objective {name}: {_root_cause(err)}") from None


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err)


def build_datamodule(dataset_cfg: dict, seed: int):
    from ssmooth.data import SmoothingDataModule

    try:
        return SmoothingDataModule(**dataset_cfg, seed=seed)
    except TypeError as err:
        raise ConfigError(f"dataset: {err}") from None
    except ValueError as err:
        raise ConfigError(f"dataset: {err}") from None


def build_loggers(logger_cfg: dict, output_dir: Path):
    from hydra.utils import instantiate

    loggers = []
    for name, options in (logger_cfg or {}).items():
        options = dict(options)
        if name == "wandb":
            from ssmooth.lit.logging import wandb_offline_default

            if options.get("offline") is None:
                options["offline"] = wandb_offline_default()
            os.environ.setdefault("WANDB_SILENT", "true")
        try:
            loggers.append(instantiate(options))
        except Exception as err:
            raise ConfigError(f"logger.{name}: {_root_cause(err)}") from None
    return loggers


def build_trainer(cfg: DictConfig, output_dir: Path, loggers, callbacks):
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                           default_root_dir=str(output_dir))
    except Exception as err:
        raise ConfigError(f"trainer: {_root_cause(err)}") from None


def checkpoint_meta(cfg: DictConfig, info, noise, model_cfg: dict) -> dict:
    return {
        "name": cfg.name,
        "stage": cfg.stage,
        "dataset": {"name": info.name, "num_classes": info.num_classes, "input_shape": list(info.input_shape),
                    **{k: v for k, v in plain(cfg.dataset).items() if k in ("source", "root", "npz_dir")}},
        "model": model_cfg,
        "objective": cfg.objective.get("name", ""),
        "noise": {"kind": noise.kind, "sigma": float(noise.sigma), "grid": list(getattr(noise, "grid", []))},
        "seed": int(cfg.seed),
        "config": plain(cfg),
    }


def resolve_resume(ckpt_path, output_dir: Path):
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        # "last" with nothing to resume starts fresh: a re-run sweep job that never saved continues cleanly.
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r}: no such checkpoint")
    return ckpt_path


def run(cfg: DictConfig) -> dict | None:
    if cfg.stage == "pipeline":
        return run_pipeline(cfg)
    return train_and_certify(cfg)


def run_pipeline(cfg: DictConfig) -> dict | None:
    """The method end to end in one job (SPEC section 3): pretrain at the base level (stage A), finetune with
    sample-wise levels (B-C) and certify with per-point levels and allocation (D-F); beside it, the same
    pretrained model continued at the constant level for the same number of epochs. One report covers all."""
    from omegaconf import open_dict

    from ssmooth import report

    if cfg.noise.kind != "samplewise":
        raise ConfigError(f"stage=pipeline needs noise=samplewise (the finetuning levels), got noise.kind={cfg.noise.kind}")
    certify_config(cfg.certify)  # fail before the first stage, not after it
    out = Path(cfg.output_dir)
    pipeline = cfg.pipeline
    constant_noise = {"kind": "constant", "sigma": cfg.noise.sigma}

    def stage(name: str, **changes) -> DictConfig:
        stage_cfg = cfg.copy()
        with open_dict(stage_cfg):
            stage_cfg.output_dir = str(out / name)
            stage_cfg.name = f"{cfg.name}/{name}"
            for key, value in changes.items():
                OmegaConf.update(stage_cfg, key, value, merge=False)
        return stage_cfg

    summaries = {}
    summaries["pretrain"] = train_and_certify(stage("pretrain", stage="pretrain", noise=constant_noise,
                                                    **{"certify.policy": "constant"}))
    pretrained = str(out / "pretrain" / "checkpoints" / "last.ckpt")
    finetune = {"stage": "finetune", "pretrained": pretrained, "trainer.max_epochs": pipeline.finetune_epochs,
                "optim.optimizer.lr": pipeline.finetune_lr, "optim.scheduler": None, "ckpt_path": cfg.ckpt_path}
    summaries["finetune_samplewise"] = train_and_certify(
        stage("finetune_samplewise", **finetune, **{"certify.policy": "samplewise"}))
    if cfg.selector.enabled:
        summaries["selector"] = train_selector(stage("selector", **{"trainer.max_epochs": cfg.selector.epochs}),
                                               out / "finetune_samplewise" / "checkpoints" / "last.ckpt")
    if pipeline.constant_arm:
        summaries["finetune_constant"] = train_and_certify(
            stage("finetune_constant", **finetune, noise=constant_noise, **{"certify.policy": "constant"}))
    if all(s is not None for s in summaries.values()):
        radii = plain(cfg.certify).get("radii")
        paths = report.write_report(out, radii=radii)
        # The stages side by side: pretrained, constant finetune, and the sample-wise model's variants.
        report.print_table(report.load_summaries(out), radii=radii,
                           title=f"{cfg.name}: certified accuracy (%) at l2 radius r")
        print(f"report: {paths['markdown']}  plot: {paths['plot']}")
    return summaries.get("finetune_samplewise")


def train_selector(cfg: DictConfig, classifier_ckpt: Path) -> dict | None:
    """The level selector of the inductive certificate, trained on the level table of a sample-wise checkpoint
    (``selector.*``). Writes ``checkpoints/last.ckpt`` in the stage folder (the classifier, its table and the
    selector in one file, ready for ``ssmooth-certify``), then certifies the inductive certificate on the same
    points as the sample-wise stage (its constant and transductive certificates are that stage's). Returns the
    summary. A finished stage is skipped, and an interrupted one resumes with the selector it already saved."""
    import dataclasses
    import functools

    import lightning as L
    import torch
    from hydra.utils import instantiate

    from ssmooth.evaluate import certify_model
    from ssmooth.lit.module import load_checkpoint, model_state
    from ssmooth.lit.selector import (
        SelectorModule,
        default_selector_model,
        level_targets,
        load_selector,
        save_with_selector,
    )

    output_dir = Path(cfg.output_dir)
    if (output_dir / "summary.json").is_file():
        print(f"{output_dir}: already finished (summary.json exists), skipping")
        return json.loads((output_dir / "summary.json").read_text())
    options = plain(cfg.selector)
    unknown = set(options) - {"enabled", "model", "sigma_e", "epochs", "lr"}
    if unknown:
        raise ConfigError(f"selector: unknown key(s) {sorted(unknown)}")
    cert_cfg = certify_config(cfg.certify)
    datamodule = build_datamodule(plain(cfg.dataset), cfg.seed)
    datamodule.setup("fit")
    out = output_dir / "checkpoints" / "last.ckpt"
    if not out.is_file():
        meta, state = load_checkpoint(classifier_ckpt)
        grid = meta["noise"].get("grid") or []
        if len(grid) < 2:
            raise ConfigError(f"selector: {classifier_ckpt} was not finetuned with per-sample levels (grid {grid})")
        sigma_e = float(options.get("sigma_e") or max(grid))  # at least the largest level, as in Dual RS
        if not sigma_e > 0:
            raise ConfigError(f"selector.sigma_e={sigma_e} must be > 0")
        train_indices = datamodule.train_set.indices
        targets = torch.zeros(len(state["noise.table"]), dtype=torch.long)
        try:
            targets[train_indices] = level_targets(state["noise.table"][train_indices], grid)
        except ValueError as err:
            raise ConfigError(f"selector: {err}") from None
        model_cfg = options.get("model") or default_selector_model(meta["model"])
        L.seed_everything(cfg.seed, workers=True)
        selector = build_model(model_cfg, dataclasses.replace(datamodule.info, num_classes=len(grid)))
        try:
            optimizer = functools.partial(instantiate(cfg.optim.optimizer), lr=options["lr"])
        except Exception as err:
            raise ConfigError(f"optim: {_root_cause(err)}") from None
        module = SelectorModule(selector, targets, sigma_e, len(grid), optimizer, meta=meta)
        loggers = build_loggers(plain(cfg.logger), output_dir)
        trainer = build_trainer(cfg, output_dir, loggers, callbacks=[])
        began = time.perf_counter()
        try:
            # Training data only: the test split has class labels, not levels.
            trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
        finally:
            _finish_wandb(loggers)
        if not trainer.is_global_zero:
            return None
        selector_meta = {"model": model_cfg, "grid": [float(s) for s in grid], "sigma_e": sigma_e,
                         "epochs": int(cfg.trainer.max_epochs), "trained_from": str(classifier_ckpt),
                         "train_wall_time_s": round(time.perf_counter() - began, 2)}
        save_with_selector(classifier_ckpt, selector, selector_meta, out)
    if not cert_cfg.enabled:
        return None
    # Everything certified comes from the one saved file, so a resumed stage never mixes two selectors' rows.
    meta, state = load_checkpoint(out)
    classifier = build_model(meta["model"], datamodule.info)
    classifier.load_state_dict(model_state(state))
    selector = load_selector(meta, state, datamodule.info)
    points = datamodule.test_points(cert_cfg.skip, cert_cfg.max, cert_cfg.start)
    cert_cfg = dataclasses.replace(cert_cfg, policy="inductive", best_constant=False)
    summary = certify_model(classifier, points, output_dir, cert_cfg, num_classes=datamodule.info.num_classes,
                            base_sigma=meta["noise"]["sigma"], dataset=datamodule.info.name,
                            meta={**meta, "name": cfg.name,
                                  "train_wall_time_s": meta["selector"].get("train_wall_time_s")},
                            device=resolve_device("auto"), selector=selector)
    report_certification(summary, output_dir)
    return summary


def train_and_certify(cfg: DictConfig) -> dict | None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ssmooth.evaluate import certify_model
    from ssmooth.lit.module import SmoothingModule, load_checkpoint, model_state

    output_dir = Path(cfg.output_dir)
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r} must be one of {STAGES}")
    summary_path = output_dir / "summary.json"
    if summary_path.is_file():
        # Re-running a sweep into the same folder skips the jobs that already finished.
        print(f"{output_dir}: already finished (summary.json exists), skipping")
        return json.loads(summary_path.read_text())

    # Validate and build everything before any training starts.
    cert_cfg = certify_config(cfg.certify)
    datamodule = build_datamodule(plain(cfg.dataset), cfg.seed)
    info = datamodule.info
    pretrained = None
    model_cfg = plain(cfg.model)
    if cfg.stage == "finetune":
        if cfg.pretrained is None:
            raise ConfigError("stage=finetune needs pretrained=PATH (a checkpoint of stage pretrain)")
        try:
            pretrained_meta, pretrained_state = load_checkpoint(cfg.pretrained)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"pretrained: {err}") from None
        if pretrained_meta["dataset"]["name"] != info.name:
            raise ConfigError(f"pretrained={cfg.pretrained} was trained on {pretrained_meta['dataset']['name']}, "
                              f"not dataset={info.name}")
        model_cfg = pretrained_meta["model"]  # the architecture comes from the checkpoint
        pretrained = pretrained_state
    L.seed_everything(cfg.seed, workers=True)  # before the model, so the seed decides the initial weights
    model = build_model(model_cfg, info)
    if pretrained is not None:
        model.load_state_dict(model_state(pretrained))
    objective = build_objective(plain(cfg.objective), cfg.attack)
    from hydra.utils import instantiate

    try:
        optimizer = instantiate(cfg.optim.optimizer)
        scheduler = instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None
        # The factories are partials: build them once now so that a misspelt argument fails before training.
        probe = optimizer(params=model.parameters())
        if scheduler is not None:
            scheduler(optimizer=probe)
    except Exception as err:
        raise ConfigError(f"optim: {_root_cause(err)}") from None
    datamodule.prepare_data()
    datamodule.setup("fit")  # a missing dataset fails here, before training
    # The table is indexed by dataset index, which may exceed the subset's length.
    noise = build_noise(plain(cfg.noise), int(datamodule.train_set.indices.max()) + 1)
    meta = checkpoint_meta(cfg, info, noise, model_cfg)

    if noise.kind == "samplewise":
        from ssmooth.lit.finetune import SigmaFinetuneModule

        module = SigmaFinetuneModule(model=model, objective=objective, noise=noise, optimizer=optimizer,
                                     scheduler=scheduler, num_classes=info.num_classes, meta=meta,
                                     update_every=cfg.noise.update_every, num_draws=cfg.noise.num_draws,
                                     soft=cfg.noise.soft, selection=cfg.noise.get("selection", "local"),
                                     fraction=cfg.noise.get("fraction", 1.0))
    else:
        module = SmoothingModule(model=model, objective=objective, noise=noise, optimizer=optimizer,
                                 scheduler=scheduler, num_classes=info.num_classes, meta=meta)

    callbacks = [ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="epoch{epoch:03d}",
                                 auto_insert_metric_name=False, save_last=True, save_top_k=1)]
    try:
        callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    except Exception as err:
        raise ConfigError(f"callbacks: {_root_cause(err)}") from None
    loggers = build_loggers(plain(cfg.logger), output_dir)
    trainer = build_trainer(cfg, output_dir, loggers, callbacks)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    for logger in loggers:
        logger.log_hyperparams(plain(cfg))
    try:
        began = time.perf_counter()
        trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_resume(cfg.ckpt_path, output_dir))
        # Selection included; after a resume, only the resumed part.
        meta = {**meta, "train_wall_time_s": round(time.perf_counter() - began, 2)}
        if not trainer.is_global_zero or not cert_cfg.enabled:
            return None
        device = resolve_device("auto")
        points = datamodule.test_points(cert_cfg.skip, cert_cfg.max, cert_cfg.start)
        grid = getattr(noise, "grid", None)  # used only when the certify policy is sample-wise
        summary = certify_model(module.model, points, output_dir, cert_cfg, num_classes=info.num_classes,
                                base_sigma=noise.sigma, grid=grid, dataset=info.name, meta=meta, device=device)
        report_certification(summary, output_dir)
        from ssmooth.lit.logging import log_certification

        log_certification(loggers, summary, trainer.global_step, output_dir / "certified_accuracy.png")
        return summary
    finally:
        _finish_wandb(loggers)


def _finish_wandb(loggers) -> None:
    # One wandb run per Hydra job: finish it even when the job fails, or the next sweep job logs into it.
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
