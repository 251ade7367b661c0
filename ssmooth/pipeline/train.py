"""The training stages: pretrain (stage A) and finetune (constant or sample-wise levels, stages B-C), each
followed by the certification of the trained model on the test subset (``certify.*``)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from ssmooth.build import (
    ConfigError,
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_model,
    build_noise,
    build_objective,
    build_optimizer,
    build_trainer,
    certification_grid,
    certification_note,
    certify_config,
    check_output_width,
    checkpoint_meta,
    finish_wandb,
    load_data,
    log,
    on_interrupt,
    plain,
    test_points,
)
from ssmooth.pipeline.runfolder import (
    check_run_folder,
    checkpoint_epoch,
    resolve_resume,
    set_aside_certification,
    training_note,
)

STAGES = ("pretrain", "finetune", "pipeline", "denoiser")


@dataclasses.dataclass
class TrainingJob:
    """Everything one training stage needs, built and checked before the run folder is touched."""

    cfg: DictConfig
    output_dir: Path
    action: str               # fresh | resume | continue (see check_run_folder)
    cert_cfg: object
    datamodule: object
    module: object
    noise: object
    meta: dict
    points: object            # the certification subset, or None when certify.enabled=false
    grid: list | None
    ckpt_path: str | None     # the checkpoint training resumes from
    resume_epoch: int | None
    loggers: list
    trainer: object


def train_and_certify(cfg: DictConfig, on_start: Callable[[Path], None] | None = None) -> dict | None:
    """Train the model of ``cfg`` (stage pretrain or finetune) into ``cfg.output_dir``, then certify it. Returns
    the certification summary (None when certification is off, or on ranks other than 0). Every setting is
    checked before anything is written; an earlier run in the folder is skipped, resumed or continued (see
    ``check_run_folder``). ``on_start(folder)`` is called once the checks passed, before the first write. The
    trained model is ``checkpoints/last.ckpt`` in the folder."""
    output_dir = Path(cfg.output_dir)
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r} must be one of {STAGES}")
    cert_cfg = certify_config(cfg.certify)
    datamodule = build_datamodule(plain(cfg.dataset), cfg.seed)
    pretrained = load_pretrained(cfg, datamodule.info)
    action = check_run_folder(cfg, output_dir)
    if action == "skip":
        # Re-running a sweep into the same folder skips the jobs that already finished with the same settings.
        log.info(f"{output_dir}: already finished with the same settings, skipping")
        summary_path = output_dir / "summary.json"
        return json.loads(summary_path.read_text()) if summary_path.is_file() else None
    job = build_training_job(cfg, output_dir, action, cert_cfg, datamodule, pretrained)
    if on_start is not None:
        on_start(output_dir)
    open_run_folder(job)
    try:
        began = time.perf_counter()
        fit(job)
        if job.trainer.is_global_zero:
            log.info(f"trained model: {output_dir / 'checkpoints' / 'last.ckpt'}")
        # Selection included; after a resume, only the resumed part.
        job.meta = {**job.meta, "train_wall_time_s": round(time.perf_counter() - began, 2)}
        if not cert_cfg.enabled:
            return None
        return certify_trained(job)
    finally:
        finish_wandb(job.loggers)


def load_pretrained(cfg: DictConfig, info):
    """stage=finetune: the pretrained checkpoint's state; ``cfg.model`` becomes the checkpoint's architecture
    (the saved config then says which was trained). None for stage=pretrain."""
    from ssmooth.lit.module import load_checkpoint

    if cfg.stage != "finetune":
        return None
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
    with open_dict(cfg):
        cfg.model = OmegaConf.create(pretrained_meta["model"])
    return pretrained_state


def build_training_job(cfg: DictConfig, output_dir: Path, action: str, cert_cfg, datamodule,
                       pretrained) -> TrainingJob:
    """Build and check every part of the stage: model, objective, optimizer, data, noise, certification subset,
    callbacks, loggers and trainer. Nothing is written yet."""
    parts = build_training_parts(cfg, cert_cfg, datamodule, pretrained)
    callbacks = build_callbacks(cfg.get("callbacks"), output_dir)
    ckpt_path = resolve_resume(cfg.ckpt_path, output_dir, action)
    resume_epoch = checkpoint_epoch(ckpt_path) if ckpt_path else None
    loggers = build_loggers(plain(cfg.logger), output_dir, resume_epoch)
    trainer = build_trainer(cfg, output_dir, loggers, callbacks)
    return TrainingJob(cfg=cfg, output_dir=output_dir, action=action, cert_cfg=cert_cfg, datamodule=datamodule,
                       ckpt_path=ckpt_path, resume_epoch=resume_epoch, loggers=loggers, trainer=trainer, **parts)


def build_training_parts(cfg: DictConfig, cert_cfg, datamodule, pretrained) -> dict:
    """The LightningModule of the stage (model, objective, optimizer, noise) and what certifies it (points,
    grid), each checked; the data is read here. Returns the TrainingJob fields ``module noise meta points
    grid``."""
    import lightning as L

    from ssmooth.lit.module import model_state

    info = datamodule.info
    model_cfg = plain(cfg.model)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # before the model: the seed decides the weights
    model = build_model(model_cfg, info)
    if pretrained is not None:
        model.load_state_dict(model_state(pretrained))
    check_output_width(model, info.input_shape, info.num_classes, f"model={model_cfg['name']}")
    objective = build_objective(plain(cfg.objective), cfg.attack)
    optimizer, scheduler = build_optimizer(cfg.optim, model)
    load_data(datamodule)
    # The table is indexed by dataset index, which may exceed the subset's length.
    noise = build_noise(plain(cfg.noise), int(datamodule.train_set.indices.max()) + 1)
    points = grid = None
    if cert_cfg.enabled:
        points = test_points(datamodule, cert_cfg)
        grid = certification_grid(cert_cfg, noise.sigma, getattr(noise, "grid", None),
                                  f"the model (noise.kind={noise.kind})")
    meta = checkpoint_meta(cfg, info, noise, model_cfg)
    module = _training_module(cfg, model, objective, noise, optimizer, scheduler, info.num_classes, meta)
    return {"module": module, "noise": noise, "meta": meta, "points": points, "grid": grid}


def _training_module(cfg: DictConfig, model, objective, noise, optimizer, scheduler, num_classes: int, meta: dict):
    from ssmooth.lit.module import SmoothingModule

    if noise.kind == "samplewise":
        from ssmooth.lit.finetune import SigmaFinetuneModule

        return SigmaFinetuneModule(model=model, objective=objective, noise=noise, optimizer=optimizer,
                                   scheduler=scheduler, num_classes=num_classes, meta=meta,
                                   update_every=cfg.noise.update_every, num_draws=cfg.noise.num_draws,
                                   soft=cfg.noise.soft, selection=cfg.noise.get("selection", "local"),
                                   fraction=cfg.noise.get("fraction", 1.0))
    return SmoothingModule(model=model, objective=objective, noise=noise, optimizer=optimizer,
                           scheduler=scheduler, num_classes=num_classes, meta=meta)


def open_run_folder(job: TrainingJob) -> None:
    """Make the run folder, set aside the certification of a run that continues to more epochs, and save the
    settings (only now, when they run in this folder: the folder check refused any others)."""
    cfg, output_dir = job.cfg, job.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    if job.action == "continue":
        saved_epochs = OmegaConf.load(output_dir / "config.yaml").trainer.max_epochs
        earlier = set_aside_certification(output_dir, saved_epochs)
        log.info(f"continuing {output_dir} from epoch {job.resume_epoch + 1} to {cfg.trainer.max_epochs}"
                 + (f"; the certification of the {saved_epochs}-epoch model is kept in {earlier}" if earlier else ""))
    elif job.action == "resume":
        log.info(f"resuming {output_dir} from its last checkpoint ({job.resume_epoch + 1} of "
                 f"{cfg.trainer.max_epochs} epochs done)")
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def fit(job: TrainingJob) -> None:
    """Train; Ctrl-C becomes one line saying which checkpoint was kept."""
    for logger in job.loggers:
        logger.log_hyperparams(plain(job.cfg))
    trainer = job.trainer
    with on_interrupt(lambda: training_note(job.output_dir, trainer)):
        try:
            trainer.fit(job.module, datamodule=job.datamodule, ckpt_path=job.ckpt_path)
        except SystemExit:
            if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after its own cleanup
                raise KeyboardInterrupt from None
            raise


def certify_trained(job: TrainingJob) -> dict | None:
    """Certify the trained model on the test subset; the summary on rank 0, None on the other ranks. Under DDP
    every rank certifies its share of the points; rank 0 merges, allocates and summarizes. (ddp_fork/ddp_spawn
    run only fit in their processes: here the launching process is alone.)"""
    import torch.distributed as dist

    from ssmooth.certify.runfolder import RunFolderError
    from ssmooth.evaluate import certify_on_ranks

    trainer, output_dir, info = job.trainer, job.output_dir, job.datamodule.info
    ranks = dist.is_available() and dist.is_initialized()
    with on_interrupt(lambda: certification_note(output_dir, len(job.points)), folder=output_dir):
        try:  # the trained weights are fingerprinted by their state_dict
            summary = certify_on_ranks(job.module.model, job.points, output_dir, job.cert_cfg,
                                       rank=trainer.global_rank if ranks else 0,
                                       world_size=trainer.world_size if ranks else 1,
                                       barrier=trainer.strategy.barrier, num_classes=info.num_classes,
                                       base_sigma=job.noise.sigma, grid=job.grid, dataset=info.name, meta=job.meta,
                                       device=trainer.strategy.root_device)
        except RunFolderError as err:
            raise ConfigError(str(err)) from None
    if not trainer.is_global_zero:
        return None
    from ssmooth.lit.logging import log_certification

    plot = draw_certified_accuracy(summary, output_dir)
    log_certification(job.loggers, summary, trainer.global_step, plot)
    return summary


def draw_certified_accuracy(summary: dict, output_dir: Path) -> Path:
    """The certified-accuracy curve of a finished certification, ``certified_accuracy.png`` in its folder."""
    from ssmooth import report

    path = Path(output_dir) / "certified_accuracy.png"
    report.plot_certified_accuracy([summary], path, envelope=False, title=summary.get("name"))
    return path
