"""The method end to end: pretrain, finetune (sample-wise levels, and the constant level beside it), the level
selector, one expert per level, and the certification of each, in one folder with one report."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import DictConfig, OmegaConf, open_dict

from ssmooth.build import ConfigError, build_datamodule, certify_config, plain
from ssmooth.pipeline.experts import train_experts
from ssmooth.pipeline.routed import FOLDER, certify_experts
from ssmooth.pipeline.runfolder import check_run_folder, never_started
from ssmooth.pipeline.selector import check_selector_settings, train_selector
from ssmooth.pipeline.train import build_training_job, train_and_certify

# What each stage's model can certify. In a pipeline, certify.kinds names kinds among all of these, and each
# stage computes the ones its model can (a stage that can certify none of them keeps its own default).
STAGE_KINDS = {
    "pretrain": ("constant",),
    "finetune_constant": ("constant",),
    "finetune_samplewise": ("constant", "constant_best", "samplewise", "cascade"),
    "selector": ("constant", "inductive", "inductive_set"),
}

# Called after each stage with its name, its summary (None when it certified nothing) and its folder.
StageHook = Callable[[str, "dict | None", Path], None]


@dataclasses.dataclass
class PipelineResult:
    folder: Path
    summaries: dict           # stage name -> certification summary (None when the stage certified nothing)
    report: dict | None       # paths of the report (markdown, plot, ...) once every stage certified

    @property
    def samplewise(self) -> dict | None:
        """The summary of the sample-wise model: the method's result."""
        return self.summaries.get("finetune_samplewise")


def run_pipeline(cfg: DictConfig, on_stage: StageHook | None = None,
                 on_start: Callable[[Path], None] | None = None) -> PipelineResult:
    """Pretrain at the base level (stage A), finetune with sample-wise levels (B-C) and certify with per-point
    levels and allocation (D-F); beside it, the same pretrained model continued at the constant level for the
    same number of epochs (``pipeline.constant_arm``), the level selector (``selector.enabled``), and one expert
    per level of the grid (``pipeline.experts``, listed in ``experts.json``; see ``load_experts``). Each stage
    has its own subfolder of ``cfg.output_dir``; one report covers all. Every stage's settings are checked
    before anything is written (then ``on_start(folder)`` is called). Re-running the same settings into the
    same folder skips finished stages and resumes an unfinished one."""
    check_pipeline(cfg)
    out = Path(cfg.output_dir)
    if on_start is not None:
        on_start(out)
    out.mkdir(parents=True, exist_ok=True)
    if never_started(out):
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    summaries = {}

    def done(name: str, summary: dict | None) -> None:
        summaries[name] = summary
        if on_stage is not None:
            on_stage(name, summary, out / name)

    done("pretrain", train_and_certify(pretrain_settings(cfg)))
    done("finetune_samplewise", train_and_certify(samplewise_settings(cfg)))
    if cfg.selector.enabled:
        done("selector", train_selector(stage_settings(cfg, "selector", **{"trainer.max_epochs": cfg.selector.epochs},
                                                       **stage_kinds(cfg, "selector")),
                                        out / "finetune_samplewise" / "checkpoints" / "last.ckpt"))
    if cfg.pipeline.constant_arm:
        done("finetune_constant", train_and_certify(constant_settings(cfg, "finetune_constant", cfg.noise.sigma)))
    if cfg.pipeline.get("experts", False):
        experts_stage(cfg)
        if cfg.selector.enabled:
            done(FOLDER, certify_experts(cfg))
    paths = None
    if all(s is not None for s in summaries.values()):
        from ssmooth import report

        paths = report.write_report(out, radii=plain(cfg.certify).get("radii"))
    return PipelineResult(folder=out, summaries=summaries, report=paths)


def check_pipeline(cfg: DictConfig) -> None:
    """Every stage's settings, checked before the pipeline writes anything: a ConfigError names the first bad
    one. The finetuning stages are checked as parts (their pretrained checkpoint does not exist yet)."""
    if cfg.noise.kind != "samplewise":
        raise ConfigError(f"stage=pipeline needs noise=samplewise (the finetuning levels), got noise.kind={cfg.noise.kind}")
    certify_config(cfg.certify)
    check_pipeline_kinds(cfg)
    if cfg.selector.enabled:
        check_selector_settings(cfg)
    out = Path(cfg.output_dir)
    # The whole pipeline's settings must match an earlier run in this folder; each stage then skips or resumes.
    check_run_folder(cfg, out)
    datamodule = build_datamodule(plain(cfg.dataset), cfg.seed)
    stages = [pretrain_settings(cfg), samplewise_settings(cfg)]
    if cfg.pipeline.constant_arm or cfg.pipeline.get("experts", False):
        stages.append(constant_settings(cfg, "finetune_constant", cfg.noise.sigma))
    with _quiet("lightning.pytorch"):  # the trainer's greeting belongs to the stage that trains
        for stage_cfg in stages:
            # As a fresh stage: what it resumes from is checked when it runs.
            try:
                build_training_job(stage_cfg, Path(stage_cfg.output_dir), "fresh",
                                   certify_config(stage_cfg.certify), datamodule, pretrained=None)
            except ConfigError as err:
                if stage_cfg.stage != "finetune":
                    raise
                raise ConfigError(f"{err} (in {stage_cfg.name}, which finetunes with pipeline.finetune_lr="
                                  f"{cfg.pipeline.finetune_lr} for pipeline.finetune_epochs="
                                  f"{cfg.pipeline.finetune_epochs})") from None


def stage_kinds(cfg: DictConfig, stage: str) -> dict:
    """The ``certify.kinds`` change of one stage: the pipeline's kinds that the stage's model can certify (none
    asked for: the stage's own default)."""
    wanted = plain(cfg.certify).get("kinds")
    if wanted is None:
        return {}
    return {"certify.kinds": [k for k in wanted if k in STAGE_KINDS[stage]] or None}


def check_pipeline_kinds(cfg: DictConfig) -> None:
    """ConfigError naming a kind of ``certify.kinds`` that no stage of this pipeline certifies."""
    from ssmooth.pipeline.routed import KINDS as ROUTED_KINDS

    stages = ["pretrain", "finetune_samplewise"] + (["selector"] if cfg.selector.enabled else [])
    available = {k for stage in stages for k in STAGE_KINDS[stage]}
    if cfg.pipeline.get("experts", False) and cfg.selector.enabled:
        available |= set(ROUTED_KINDS)
    for name in plain(cfg.certify).get("kinds") or []:
        if name not in available:
            raise ConfigError(f"certify.kinds: no stage of this pipeline certifies {name!r}; its stages certify "
                              f"{sorted(available)}")


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def pretrain_settings(cfg: DictConfig) -> DictConfig:
    """Stage A: the pipeline's model trained at the constant base level."""
    return stage_settings(cfg, "pretrain", stage="pretrain", noise={"kind": "constant", "sigma": cfg.noise.sigma},
                          **{"certify.policy": "constant"}, **stage_kinds(cfg, "pretrain"))


def samplewise_settings(cfg: DictConfig) -> DictConfig:
    """Stages B-C: the pretrained model finetuned with per-sample levels, certified with per-point levels."""
    return stage_settings(cfg, "finetune_samplewise", **finetune_changes(cfg), **{"certify.policy": "samplewise"},
                          **stage_kinds(cfg, "finetune_samplewise"))


def constant_settings(cfg: DictConfig, folder: str, level: float, certify: bool = True) -> DictConfig:
    """The pretrained model finetuned at the constant ``level`` for as long as the sample-wise finetuning."""
    return stage_settings(cfg, folder, **finetune_changes(cfg), noise={"kind": "constant", "sigma": level},
                          **({"certify.policy": "constant"} if certify else {"certify.enabled": False}),
                          **stage_kinds(cfg, "finetune_constant"))


def experts_stage(cfg: DictConfig) -> Path:
    """One expert per level of the finetuning grid: the pretrained model finetuned at that constant level, as
    long as the constant arm (which is the expert at the base level, so it is not trained twice). Training only:
    the experts are certified by the certificates that route inputs to them. Returns ``experts.json``."""
    from ssmooth.noise import sigma_grid

    out = Path(cfg.output_dir)
    grid = sigma_grid(cfg.noise.sigma, cfg.noise.grid_factors)
    done = {}
    if cfg.pipeline.constant_arm:
        done[float(cfg.noise.sigma)] = out / "finetune_constant" / "checkpoints" / "last.ckpt"

    def train_level(level: float, folder: str) -> Path:
        train_and_certify(constant_settings(cfg, folder, level, certify=False))
        return out / folder / "checkpoints" / "last.ckpt"

    return train_experts(cfg, grid, train_level, done)


def stage_settings(cfg: DictConfig, name: str, **changes) -> DictConfig:
    """A stage's settings: the pipeline's, in the subfolder ``name``, with ``changes`` (dotted keys) applied."""
    stage_cfg = cfg.copy()
    with open_dict(stage_cfg):
        stage_cfg.output_dir = str(Path(cfg.output_dir) / name)
        stage_cfg.name = f"{cfg.name}/{name}"
        for key, value in changes.items():
            OmegaConf.update(stage_cfg, key, value, merge=False)
    return stage_cfg


def finetune_changes(cfg: DictConfig) -> dict:
    """What a finetuning stage changes: it starts from the pretrained checkpoint and runs
    ``pipeline.finetune_epochs`` at the constant learning rate ``pipeline.finetune_lr``."""
    pretrained = Path(cfg.output_dir) / "pretrain" / "checkpoints" / "last.ckpt"
    return {"stage": "finetune", "pretrained": str(pretrained), "trainer.max_epochs": cfg.pipeline.finetune_epochs,
            "optim.optimizer.lr": cfg.pipeline.finetune_lr, "optim.scheduler": None, "ckpt_path": cfg.ckpt_path}
