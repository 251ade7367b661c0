"""What a training job may do in its run folder: start, skip a finished run, resume an unfinished one, or
continue a finished one to more epochs; anything else is refused before the folder is touched."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ssmooth.build import ConfigError, config_differences, plain, rerun_hint

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

# What training keeps in its folder; everything else there is certification output (rows, summary, fingerprint,
# per-rank parts, plots) of the model as it was when certified.
TRAINING_ENTRIES = ("config.yaml", "checkpoints", "csv", "wandb", ".hydra", "cert_during_training")


def check_run_folder(cfg: DictConfig, output_dir: Path) -> str:
    """What a job may do in ``output_dir``, from the config saved there by an earlier job (``config.yaml``):

    fresh     nothing ran there yet (or nothing was saved before it stopped);
    skip      a finished run with the same settings (keys in RESULT_NEUTRAL_KEYS aside);
    resume    an unfinished run with the same settings: continue from its last checkpoint;
    continue  a run saved at fewer epochs, with ckpt_path=last and only a larger trainer.max_epochs.

    Any other difference is refused with a ConfigError naming it; the folder is left as it is. A folder that
    holds only the settings of a run that never started (see ``never_started``) counts as empty."""
    saved_path = output_dir / "config.yaml"
    finished = (output_dir / "summary.json").is_file()
    last = output_dir / "checkpoints" / "last.ckpt"
    if not saved_path.is_file():
        if finished or last.is_file():
            raise ConfigError(f"{output_dir} holds results but no config.yaml, so it cannot tell which settings "
                              "produced them; use a new folder")
        return "fresh"
    if never_started(output_dir):
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


# What a folder holds before its run does any work: the saved settings and the command's own records and log.
NOT_STARTED_ENTRIES = ("config.yaml", ".hydra")


def never_started(output_dir: Path) -> bool:
    """True when ``output_dir`` holds nothing but settings and logs: no checkpoint, metrics, rows or stage
    folder, so no run that started there is lost by starting another."""
    if not output_dir.is_dir():
        return True
    return all(p.name in NOT_STARTED_ENTRIES or p.suffix == ".log" for p in output_dir.iterdir())


def _training_done(last: Path, cfg: DictConfig) -> bool:
    if not last.is_file():
        return False
    return checkpoint_epoch(last) + 1 >= cfg.trainer.max_epochs


def checkpoint_epoch(path) -> int:
    """The last epoch a checkpoint holds (0-based)."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])


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


def training_note(output_dir: Path, trainer) -> str:
    """What an interrupted training kept, and how to resume it."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return f"training stopped in its first epoch; no checkpoint was saved in {output_dir}"
    done = checkpoint_epoch(last) + 1
    return (f"training stopped in epoch {trainer.current_epoch + 1} of {trainer.max_epochs}; kept {last} "
            f"({done} epochs done); {rerun_hint(output_dir)} to resume")
