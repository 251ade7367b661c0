"""ssmooth-train: train a base classifier under noise, then certify it.

  ssmooth-train                                             # the demo: 8x8 digits, MLP, sigma 0.25
  ssmooth-train experiment=mnist_gaussian noise.sigma=0.5   # a published recipe
  ssmooth-train -m noise.sigma=0.25,0.5,1.0 objective=gaussian,macer     # a sweep, one folder per job
  ssmooth-train stage=finetune pretrained=PATH noise=samplewise          # sample-wise finetuning (stages B-C)
  ssmooth-train trainer=ddp trainer.devices=4 trainer.num_nodes=2        # several GPUs / nodes

Every setting is checked before training starts; a bad one exits with status 2 and one line naming it.
A run folder is never overwritten with other settings: re-running the same command (same folder) skips a
finished job and resumes an unfinished one from its last checkpoint; other settings are refused, naming the
difference; ckpt_path=last with a larger trainer.max_epochs continues a finished run. Ctrl-C stops with one
line saying what was kept.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ssmooth.cli.common import (
    ConfigError,
    certification_grid,
    certification_note,
    certify_config,
    check_output_width,
    config_differences,
    console_main,
    log,
    on_interrupt,
    plain,
    report_certification,
    rerun_hint,
    resolve_device,
    test_points,
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
    except (TypeError, ValueError) as err:
        raise ConfigError(f"dataset: {err}") from None


def load_data(datamodule) -> None:
    """Read the splits now, so that a missing or malformed file (bad shape, NaN pixels) fails before training."""
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
    except ValueError as err:
        raise ConfigError(f"dataset: {err}") from None


def build_loggers(logger_cfg: dict, output_dir: Path, resume_epoch: int | None = None):
    from hydra.utils import instantiate

    loggers = []
    for name, options in (logger_cfg or {}).items():
        options = dict(options)
        if name == "wandb":
            from ssmooth.lit.logging import wandb_offline_default

            if options.get("offline") is None:
                options["offline"] = wandb_offline_default()
            os.environ.setdefault("WANDB_SILENT", "true")
        if options.get("_target_", "").endswith("ResumableCSVLogger"):
            options["resume_epoch"] = resume_epoch  # keep the rows of the epochs the checkpoint holds
        try:
            logger = instantiate(options)
        except Exception as err:
            raise ConfigError(f"logger.{name}: {_root_cause(err)}") from None
        if name == "wandb":
            # Lightning always passes wandb's deprecated `anonymous` setting, and wandb warns about it on every run.
            getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        loggers.append(logger)
    return loggers


def build_trainer(cfg: DictConfig, output_dir: Path, loggers, callbacks):
    import sys

    from hydra.utils import instantiate

    extra = {}
    if not sys.stderr.isatty():
        # Written to a file (SLURM, a redirect): one line per epoch, not a bar redrawn into one huge line.
        extra["enable_progress_bar"] = False
    if not extra.get("enable_progress_bar", cfg.trainer.get("enable_progress_bar")):
        from ssmooth.lit.logging import epoch_line_callback

        callbacks = [*callbacks, epoch_line_callback()]
    try:
        return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                           default_root_dir=str(output_dir), **extra)
    except Exception as err:
        raise ConfigError(f"trainer: {_root_cause(err)}") from None


def checkpoint_meta(cfg: DictConfig, info, noise, model_cfg: dict) -> dict:
    where = {k: v for k, v in plain(cfg.dataset).items() if k in ("source", "root", "npz_dir")}
    # Absolute, so that certifying the checkpoint from another directory finds the same files.
    where.update({k: str(Path(where[k]).resolve()) for k in ("root", "npz_dir") if where.get(k)})
    return {
        "name": cfg.name,
        "stage": cfg.stage,
        "dataset": {"name": info.name, "num_classes": info.num_classes, "input_shape": list(info.input_shape),
                    **where},
        "model": model_cfg,
        "objective": cfg.objective.get("name", ""),
        "noise": {"kind": noise.kind, "sigma": float(noise.sigma), "grid": list(getattr(noise, "grid", []))},
        "seed": int(cfg.seed),
        "config": plain(cfg),
    }


def resolve_resume(ckpt_path, output_dir: Path, action: str):
    """The checkpoint training starts from: an explicit ckpt_path=PATH, else the folder's last.ckpt when the run
    folder check says to resume or continue (ckpt_path=last with nothing saved yet starts fresh)."""
    if ckpt_path is None or ckpt_path == "last":
        return str(output_dir / "checkpoints" / "last.ckpt") if action in ("resume", "continue") else None
    if Path(ckpt_path).is_dir():
        raise ConfigError(f"ckpt_path={ckpt_path} is a folder, not a checkpoint{_checkpoints_in(ckpt_path)}")
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r}: no such checkpoint")
    return ckpt_path


def _checkpoints_in(folder) -> str:
    from ssmooth.lit.module import checkpoints_in

    found = checkpoints_in(folder)
    return f"; it holds {', '.join(found)}" if found else "; it holds no .ckpt file"


# Keys that do not change what a run computes: where data and logs go, how progress is shown, the run's label,
# and how certification splits its work (each point's noise comes from its own streams, so batch sizes, groups,
# shards and memory layout give the same rows). A re-run that differs only in these is the same run.
RESULT_NEUTRAL_KEYS = (
    "name", "output_dir", "ckpt_path", "logger", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.log_every_n_steps", "dataset.num_workers", "dataset.root", "dataset.npz_dir", "dataset.download",
    "certify.progress", "certify.batch_size", "certify.points_per_group", "certify.channels_last",
    "certify.compile", "certify.overwrite", "certify.num_shards", "certify.shard", "certify.shard_dirs",
    "certify.merge",
)


def check_run_folder(cfg: DictConfig, output_dir: Path) -> str:
    """What a job may do in ``output_dir``, from the config saved there by an earlier job (``config.yaml``):

    fresh     nothing ran there yet (or nothing was saved before it stopped);
    skip      a finished run with the same settings (keys in RESULT_NEUTRAL_KEYS aside);
    resume    an unfinished run with the same settings: continue from its last checkpoint;
    continue  a run saved at fewer epochs, with ckpt_path=last and only a larger trainer.max_epochs.

    Any other difference is refused with a ConfigError naming it; the folder is left as it is."""
    saved_path = output_dir / "config.yaml"
    finished = (output_dir / "summary.json").is_file()
    last = output_dir / "checkpoints" / "last.ckpt"
    if not saved_path.is_file():
        if finished or last.is_file():
            raise ConfigError(f"{output_dir} holds results but no config.yaml, so it cannot tell which settings "
                              "produced them; use a new folder")
        return "fresh"
    saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    requested = plain(cfg)
    differences = config_differences(saved, requested, RESULT_NEUTRAL_KEYS)
    if not differences:
        if finished or (not cfg.certify.enabled and cfg.stage != "pipeline" and _training_done(last, cfg)):
            return "skip"
        return "resume" if last.is_file() else "fresh"
    epochs = [d for d in differences if d.startswith("trainer.max_epochs=")]
    more_epochs = bool(epochs) and requested["trainer"]["max_epochs"] > saved["trainer"]["max_epochs"]
    if cfg.ckpt_path == "last" and more_epochs and len(differences) == 1 and last.is_file() \
            and cfg.stage != "pipeline":
        return "continue"
    ways_out = "use a new folder"
    if more_epochs and len(differences) == 1 and cfg.stage != "pipeline":
        ways_out += f", or add ckpt_path=last to continue its training to {requested['trainer']['max_epochs']} epochs"
    elif all(d.startswith("certify.") for d in differences) and last.is_file():
        ways_out += f", or certify its model with: ssmooth-certify ckpt={last} certify.KEY=VALUE"
    state = "a finished run" if finished else "a run"
    raise ConfigError(f"{output_dir} already holds {state} with other settings: {'; '.join(differences)}. "
                      f"{ways_out[0].upper()}{ways_out[1:]} (the folder is left as it is)")


def _training_done(last: Path, cfg: DictConfig) -> bool:
    if not last.is_file():
        return False
    import torch

    return int(torch.load(last, map_location="cpu", weights_only=False)["epoch"]) + 1 >= cfg.trainer.max_epochs


# What training keeps in its folder; everything else there is certification output (rows, summary, fingerprint,
# per-rank parts, plots) of the model as it was when certified.
TRAINING_ENTRIES = ("config.yaml", "checkpoints", "csv", "wandb", ".hydra", "cert_during_training")


def set_aside_certification(output_dir: Path, epochs: int) -> Path | None:
    """Before a finished run continues training, move its certification results (they describe the model of the
    earlier epochs) into a subfolder, with the summary renamed so that sweep reports do not take it for a run."""
    files = [p for p in output_dir.iterdir()
             if p.name not in TRAINING_ENTRIES and p.suffix != ".log" and not p.name.startswith("certified_after_")]
    if not files:
        return None
    earlier = output_dir / f"certified_after_{epochs}_epochs"
    earlier.mkdir(exist_ok=False)
    for path in files:
        path.rename(earlier / ("summary_superseded.json" if path.name == "summary.json" else path.name))
    return earlier


def run(cfg: DictConfig) -> dict | None:
    _announce_defaults(cfg)
    _name_after_sweep(cfg)
    if cfg.stage == "pipeline":
        return run_pipeline(cfg)
    return train_and_certify(cfg)


def _hydra_overrides() -> list[str] | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # called from Python, not from the console script
        return None


def _announce_defaults(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    overrides = _hydra_overrides()
    if overrides is None or any(o.lstrip("+~").split("=")[0] == "experiment" for o in overrides):
        return
    if HydraConfig.get().job.get("num", 0):  # said once, by a sweep's first job
        return
    if cfg.get("name") == "demo":
        log.info("No experiment= given: running the demo (experiment=demo: 8x8 digits, an MLP, sigma 0.25). Pick a "
                 "recipe with experiment=NAME, or ~experiment for the plain config groups.")


def _name_after_sweep(cfg: DictConfig) -> None:
    # A sweep job's name shows its swept values ("demo noise.sigma=0.5"), so that table rows and legends differ.
    from ssmooth.cli.common import swept_values

    swept = swept_values(_hydra_overrides())
    if swept:
        with open_dict(cfg):
            cfg.name = f"{cfg.name} {swept.replace(',', ' ')}"


def run_pipeline(cfg: DictConfig) -> dict | None:
    """The method end to end in one job (docs/METHOD.md): pretrain at the base level (stage A), finetune with
    sample-wise levels (B-C) and certify with per-point levels and allocation (D-F); beside it, the same
    pretrained model continued at the constant level for the same number of epochs. One report covers all."""
    from omegaconf import open_dict

    from ssmooth import report

    if cfg.noise.kind != "samplewise":
        raise ConfigError(f"stage=pipeline needs noise=samplewise (the finetuning levels), got noise.kind={cfg.noise.kind}")
    certify_config(cfg.certify)  # fail before the first stage, not after it
    out = Path(cfg.output_dir)
    # The whole pipeline's settings must match an earlier run in this folder; each stage then skips or resumes.
    check_run_folder(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.yaml").is_file():
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
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
        log.info(f"report: {paths['markdown']}  plot: {paths['plot']}")
    return summaries.get("finetune_samplewise")


SELECTOR_KEYS = {"enabled", "model", "sigma_e", "epochs", "lr", "targets", "temperature", "balance", "copies",
                 "consistency", "entropy", "target_samples", "target_images"}


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

    from ssmooth.certify.runfolder import RunFolderError, file_sha256
    from ssmooth.evaluate import certify_model
    from ssmooth.lit.module import load_checkpoint, model_state
    from ssmooth.lit.selector import (
        RadiusSelectorModule,
        SelectorModule,
        default_selector_model,
        level_targets,
        load_selector,
        save_with_selector,
        selector_radius_targets,
    )

    output_dir = Path(cfg.output_dir)
    if (output_dir / "summary.json").is_file():
        log.info(f"{output_dir}: already finished (summary.json exists), skipping")
        return json.loads((output_dir / "summary.json").read_text())
    options = plain(cfg.selector)
    unknown = set(options) - SELECTOR_KEYS
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
        model_cfg = options.get("model") or default_selector_model(meta["model"])
        L.seed_everything(cfg.seed, workers=True)
        selector = build_model(model_cfg, dataclasses.replace(datamodule.info, num_classes=len(grid)))
        try:
            optimizer = functools.partial(instantiate(cfg.optim.optimizer), lr=options["lr"])
        except Exception as err:
            raise ConfigError(f"optim: {_root_cause(err)}") from None
        began = time.perf_counter()
        if options.get("targets", "radius") == "table":
            train_indices = datamodule.train_set.indices
            targets = torch.zeros(len(state["noise.table"]), dtype=torch.long)
            try:
                targets[train_indices] = level_targets(state["noise.table"][train_indices], grid)
            except ValueError as err:
                raise ConfigError(f"selector: {err}") from None
            module = SelectorModule(selector, targets, sigma_e, len(grid), optimizer, meta=meta)
            target_stats = {}
        else:
            classifier = build_model(meta["model"], datamodule.info)
            classifier.load_state_dict(model_state(state))
            targets, weights, target_stats = selector_radius_targets(
                classifier, datamodule.train_set, grid, len(state["noise.table"]), options, seed=cfg.seed,
                cap=cert_cfg.alpha ** (1 / cert_cfg.n), batch_size=cert_cfg.batch_size,
                device=resolve_device("auto"))
            log.info(f"selector targets: {target_stats}")
            module = RadiusSelectorModule(selector, targets, weights, sigma_e, optimizer, meta=meta,
                                          copies=int(options.get("copies", 2)),
                                          consistency=float(options.get("consistency", 0.0)),
                                          entropy=float(options.get("entropy", 0.0)))
        loggers = build_loggers(plain(cfg.logger), output_dir)
        trainer = build_trainer(cfg, output_dir, loggers, callbacks=[])
        try:
            # Training data only: the test split has class labels, not levels.
            trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
        finally:
            _finish_wandb(loggers)
        if not trainer.is_global_zero:
            return None
        selector_meta = {"model": model_cfg, "grid": [float(s) for s in grid], "sigma_e": sigma_e,
                         "targets": options.get("targets", "radius"), "target_stats": target_stats,
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
    points = test_points(datamodule, cert_cfg)
    cert_cfg = dataclasses.replace(cert_cfg, policy="inductive", best_constant=False)
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
    report_certification(summary, output_dir)
    return summary


def train_and_certify(cfg: DictConfig) -> dict | None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ssmooth.certify.runfolder import RunFolderError
    from ssmooth.evaluate import certify_on_ranks
    from ssmooth.lit.module import SmoothingModule, load_checkpoint, model_state

    output_dir = Path(cfg.output_dir)
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r} must be one of {STAGES}")

    # Validate and build everything before any training starts.
    cert_cfg = certify_config(cfg.certify)
    datamodule = build_datamodule(plain(cfg.dataset), cfg.seed)
    info = datamodule.info
    pretrained = None
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
        if pretrained_meta["model"] != plain(cfg.model):
            log.info(f"model: {pretrained_meta['model']['name']}, as in pretrained={cfg.pretrained}")
        with open_dict(cfg):  # the architecture comes from the checkpoint: the saved config says so
            cfg.model = OmegaConf.create(pretrained_meta["model"])
        pretrained = pretrained_state
    model_cfg = plain(cfg.model)

    action = check_run_folder(cfg, output_dir)
    if action == "skip":
        # Re-running a sweep into the same folder skips the jobs that already finished with the same settings.
        log.info(f"{output_dir}: already finished with the same settings, skipping")
        summary_path = output_dir / "summary.json"
        return json.loads(summary_path.read_text()) if summary_path.is_file() else None

    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before the model: the seed decides the weights
    model = build_model(model_cfg, info)
    if pretrained is not None:
        model.load_state_dict(model_state(pretrained))
    check_output_width(model, info.input_shape, info.num_classes, f"model={model_cfg['name']}")
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
    load_data(datamodule)
    # The table is indexed by dataset index, which may exceed the subset's length.
    noise = build_noise(plain(cfg.noise), int(datamodule.train_set.indices.max()) + 1)
    points = grid = None
    if cert_cfg.enabled:
        points = test_points(datamodule, cert_cfg)
        grid = certification_grid(cert_cfg, noise.sigma, getattr(noise, "grid", None),
                                  f"the model (noise.kind={noise.kind})")
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
    ckpt_path = resolve_resume(cfg.ckpt_path, output_dir, action)
    resume_epoch = _checkpoint_epoch(ckpt_path) if ckpt_path else None
    loggers = build_loggers(plain(cfg.logger), output_dir, resume_epoch)
    trainer = build_trainer(cfg, output_dir, loggers, callbacks)
    output_dir.mkdir(parents=True, exist_ok=True)
    if action == "continue":
        saved_epochs = OmegaConf.load(output_dir / "config.yaml").trainer.max_epochs
        earlier = set_aside_certification(output_dir, saved_epochs)
        log.info(f"continuing {output_dir} from epoch {resume_epoch + 1} to {cfg.trainer.max_epochs}"
                 + (f"; the certification of the {saved_epochs}-epoch model is kept in {earlier}" if earlier else ""))
    elif action == "resume":
        log.info(f"resuming {output_dir} from its last checkpoint ({resume_epoch + 1} of "
                 f"{cfg.trainer.max_epochs} epochs done)")
    # Written only now, when these settings run in this folder (the check above refused any others).
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    for logger in loggers:
        logger.log_hyperparams(plain(cfg))
    try:
        began = time.perf_counter()
        with on_interrupt(lambda: _training_note(output_dir, trainer)):
            try:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
            except SystemExit:
                if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after its own cleanup
                    raise KeyboardInterrupt from None
                raise
        # Selection included; after a resume, only the resumed part.
        meta = {**meta, "train_wall_time_s": round(time.perf_counter() - began, 2)}
        if not cert_cfg.enabled:
            return None
        # Under DDP every rank certifies its share of the points; rank 0 merges, allocates and summarizes.
        # (ddp_fork/ddp_spawn run only fit in their processes: here the launching process is alone.)
        import torch.distributed as dist

        ranks = dist.is_available() and dist.is_initialized()
        with on_interrupt(lambda: certification_note(output_dir, len(points)), folder=output_dir):
            try:  # the trained weights are fingerprinted by their state_dict
                summary = certify_on_ranks(module.model, points, output_dir, cert_cfg,
                                           rank=trainer.global_rank if ranks else 0,
                                           world_size=trainer.world_size if ranks else 1,
                                           barrier=trainer.strategy.barrier, num_classes=info.num_classes,
                                           base_sigma=noise.sigma, grid=grid, dataset=info.name, meta=meta,
                                           device=trainer.strategy.root_device)
            except RunFolderError as err:
                raise ConfigError(str(err)) from None
        if not trainer.is_global_zero:
            return None
        report_certification(summary, output_dir)
        from ssmooth.lit.logging import log_certification

        log_certification(loggers, summary, trainer.global_step, output_dir / "certified_accuracy.png")
        return summary
    finally:
        _finish_wandb(loggers)


def _checkpoint_epoch(path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])


def _training_note(output_dir: Path, trainer) -> str:
    last = output_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return f"training stopped in its first epoch; no checkpoint was saved in {output_dir}"
    done = _checkpoint_epoch(last) + 1
    return (f"training stopped in epoch {trainer.current_epoch + 1} of {trainer.max_epochs}; kept {last} "
            f"({done} epochs done); {rerun_hint(output_dir)} to resume")


def _finish_wandb(loggers) -> None:
    # One wandb run per Hydra job: finish it even when the job fails, or the next sweep job logs into it.
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        from ssmooth.lit.logging import offline_wandb_note

        note = offline_wandb_note(loggers)
        wandb.finish()
        if note:
            log.info(note)


main = console_main("train", run, __doc__)


if __name__ == "__main__":
    main()
