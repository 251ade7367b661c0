"""ssmooth-train: train a base classifier under noise, then certify it.

  ssmooth-train                                             # the demo: 8x8 digits, MLP, sigma 0.25
  ssmooth-train experiment=mnist_gaussian noise.sigma=0.5   # a published recipe
  ssmooth-train -m noise.sigma=0.25,0.5,1.0 objective=gaussian,macer     # a sweep, one folder per job
  ssmooth-train stage=finetune pretrained=PATH noise=samplewise          # sample-wise finetuning (stages B-C)
  ssmooth-train trainer=ddp trainer.devices=4 trainer.num_nodes=2        # several GPUs / nodes

Every setting is checked before anything is written; a bad one exits with status 2 and one line naming it,
leaving the run folder as it was.
A run folder is never overwritten with other settings: re-running the same command (same folder) skips a
finished job and resumes an unfinished one from its last checkpoint; other settings are refused, naming the
difference; ckpt_path=last with a larger trainer.max_epochs continues a finished run. Ctrl-C stops with one
line saying what was kept.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from ssmooth.build import ConfigError, log, plain
from ssmooth.cli.common import console_main, swept_values


def run(cfg: DictConfig) -> dict | None:
    """The job of one composed config: the whole pipeline (stage=pipeline) or one training stage. Prints each
    certification's table; returns the (sample-wise) summary. Nothing is written into the run folder, not even
    Hydra's record of the job (.hydra/), before every setting has been checked."""
    from ssmooth.pipeline import run_pipeline, train_and_certify

    record = _hydra_record(cfg)  # the settings as composed, before the job names itself after a sweep

    def start(folder: Path) -> None:
        _announce_defaults(cfg)
        if record is not None:
            record()

    _name_after_sweep(cfg)
    folder = Path(cfg.output_dir)
    made_by_hydra = record is not None and folder.is_dir() and not any(folder.iterdir())
    try:
        if cfg.stage == "denoiser":
            from ssmooth import report
            from ssmooth.pipeline.denoiser import train_denoiser

            summary = train_denoiser(cfg)  # its arms side by side: direct, denoised, Gaussian-trained
            report.print_table(report.load_summaries(folder), radii=plain(cfg.certify).get("radii"),
                               title=f"{cfg.name}: certified accuracy (%) at l2 radius r")
            return summary
        if cfg.stage == "pipeline":
            result = run_pipeline(cfg, on_stage=_print_stage, on_start=start)
            if result.report is not None:
                _print_report(cfg, result)
            return result.samplewise
        summary = train_and_certify(cfg, on_start=start)
    except ConfigError:
        if made_by_hydra and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # Hydra made it for this job, which was refused before it wrote anything
        raise
    if summary is not None:
        _print_stage(cfg.stage, summary, folder)
    return summary


def _hydra_record(cfg: DictConfig):
    """What Hydra keeps of a job in ``<run folder>/.hydra/`` (config.yaml, hydra.yaml, overrides.yaml), to be
    written once the job starts: conf/train.yaml turns Hydra's own early copy off (hydra.output_subdir: null),
    so that a refused command leaves no record and never overwrites the record of the run already there."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.instance().cfg
        output_dir = Path(HydraConfig.get().runtime.output_dir)
    except (ValueError, AttributeError):  # called from Python, not from the console script
        return None
    if output_dir.resolve() != Path(cfg.output_dir).resolve():  # a Hydra app that ran earlier in this process
        return None
    files = {"config.yaml": OmegaConf.to_yaml(cfg), "hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
             "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}

    def write() -> None:
        folder = output_dir / ".hydra"
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)

    return write


def _print_stage(name: str, summary: dict | None, folder: Path) -> None:
    from ssmooth import report

    if summary is None:
        return
    report.print_table([summary])
    log.info(f"rows, summary and plot: {folder}")


def _print_report(cfg: DictConfig, result) -> None:
    # The stages side by side: pretrained, constant finetune, and the sample-wise model's variants.
    from ssmooth import report

    radii = plain(cfg.certify).get("radii")
    report.print_table(report.load_summaries(result.folder), radii=radii,
                       title=f"{cfg.name}: certified accuracy (%) at l2 radius r")
    log.info(f"report: {result.report['markdown']}  plot: {result.report['plot']}")


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
    swept = swept_values(_hydra_overrides())
    if swept:
        with open_dict(cfg):
            cfg.name = f"{cfg.name} {swept.replace(',', ' ')}"


main = console_main("train", run, __doc__)


if __name__ == "__main__":
    main()
