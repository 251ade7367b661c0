"""The method end to end: pretrain, finetune (sample-wise levels, and the constant level beside it), the level
selector, and the certification of each, in one folder with one report."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from ssmooth.build import ConfigError, certify_config, plain
from ssmooth.pipeline.experts import train_experts
from ssmooth.pipeline.runfolder import check_run_folder
from ssmooth.pipeline.selector import train_selector
from ssmooth.pipeline.train import train_and_certify

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


def run_pipeline(cfg: DictConfig, on_stage: StageHook | None = None) -> PipelineResult:
    """Pretrain at the base level (stage A), finetune with sample-wise levels (B-C) and certify with per-point
    levels and allocation (D-F); beside it, the same pretrained model continued at the constant level for the
    same number of epochs (``pipeline.constant_arm``), the level selector (``selector.enabled``), and one expert
    per level of the grid (``pipeline.experts``, listed in ``experts.json``; see ``load_experts``). Each stage
    has its own subfolder of ``cfg.output_dir``; one report covers all. Re-running the same settings into the
    same folder skips finished stages and resumes an unfinished one."""
    if cfg.noise.kind != "samplewise":
        raise ConfigError(f"stage=pipeline needs noise=samplewise (the finetuning levels), got noise.kind={cfg.noise.kind}")
    certify_config(cfg.certify)  # fail before the first stage, not after it
    out = Path(cfg.output_dir)
    # The whole pipeline's settings must match an earlier run in this folder; each stage then skips or resumes.
    check_run_folder(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.yaml").is_file():
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    summaries = {}

    def done(name: str, summary: dict | None) -> None:
        summaries[name] = summary
        if on_stage is not None:
            on_stage(name, summary, out / name)

    constant_noise = {"kind": "constant", "sigma": cfg.noise.sigma}
    done("pretrain", train_and_certify(stage_settings(cfg, "pretrain", stage="pretrain", noise=constant_noise,
                                                      **{"certify.policy": "constant"})))
    finetune = finetune_changes(cfg, out / "pretrain" / "checkpoints" / "last.ckpt")
    done("finetune_samplewise", train_and_certify(
        stage_settings(cfg, "finetune_samplewise", **finetune, **{"certify.policy": "samplewise"})))
    if cfg.selector.enabled:
        done("selector", train_selector(stage_settings(cfg, "selector", **{"trainer.max_epochs": cfg.selector.epochs}),
                                        out / "finetune_samplewise" / "checkpoints" / "last.ckpt"))
    if cfg.pipeline.constant_arm:
        done("finetune_constant", train_and_certify(
            stage_settings(cfg, "finetune_constant", **finetune, noise=constant_noise,
                           **{"certify.policy": "constant"})))
    if cfg.pipeline.get("experts", False):
        experts_stage(cfg, finetune)
    paths = None
    if all(s is not None for s in summaries.values()):
        from ssmooth import report

        paths = report.write_report(out, radii=plain(cfg.certify).get("radii"))
    return PipelineResult(folder=out, summaries=summaries, report=paths)


def experts_stage(cfg: DictConfig, finetune: dict) -> Path:
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
        train_and_certify(stage_settings(cfg, folder, **finetune, noise={"kind": "constant", "sigma": level},
                                         **{"certify.enabled": False}))
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


def finetune_changes(cfg: DictConfig, pretrained: Path) -> dict:
    """What a finetuning stage changes: it starts from ``pretrained`` and runs ``pipeline.finetune_epochs`` at
    the constant learning rate ``pipeline.finetune_lr``."""
    return {"stage": "finetune", "pretrained": str(pretrained), "trainer.max_epochs": cfg.pipeline.finetune_epochs,
            "optim.optimizer.lr": cfg.pipeline.finetune_lr, "optim.scheduler": None, "ckpt_path": cfg.ckpt_path}
