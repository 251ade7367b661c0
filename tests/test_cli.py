"""The Hydra apps: every experiment config runs, bad settings fail early and clearly, DDP on CPU, resume."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ssmooth.build import build_trainer
from ssmooth.cli import certify as certify_cli
from ssmooth.cli import train as train_cli
from ssmooth.cli.common import CONFIG_DIR, ConfigError

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))

# One optimizer step, a couple of certified points, few samples: enough to run every code path of a config.
TINY = [
    "~experiment", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
    "dataset.train_subset=8", "dataset.batch_size=4", "dataset.eval_batch_size=4", "dataset.num_workers=0",
    "certify.n0=8", "certify.n=100", "certify.max=2", "certify.skip=1", "certify.batch_size=64",
    "certify.progress=false", "pipeline.finetune_epochs=1",
]


def compose_cfg(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides)


def data_overrides(experiment: str, shared: Path) -> list[str]:
    if experiment.startswith(("mnist", "cifar10")):
        return ["dataset.source=npz", f"dataset.npz_dir={shared}"]
    return []


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_config_runs_one_step(experiment, tmp_path, request):
    shared = request.getfixturevalue("shared_data") if experiment.startswith(("mnist", "cifar10")) else None
    extra = ["model.depth=20"] if "cifar10" in experiment else []
    extra += ["noise.num_draws=2"] if "samplewise" in experiment or experiment == "demo" else []
    # one step of a small denoiser: the recipe's 17-layer DnCNN for 90 epochs is for a GPU
    extra += ["denoiser.train.epochs=1", "denoiser.depth=3", "denoiser.width=8"] if "denoised" in experiment else []
    if experiment.startswith("imagenet"):  # a tiny ImageFolder; a small net keeps 224 px steps fast on a CPU
        extra += [f"dataset.root={request.getfixturevalue('tiny_imagenet')}", "model.name=tiny",
                  "trainer.precision=32-true", "dataset.pin_memory=false"]
    tiny = [o for o in TINY if not o.startswith("~experiment")]
    cfg = compose_cfg("train", [f"experiment={experiment}", f"output_dir={tmp_path}", *tiny, *extra,
                                *data_overrides(experiment, shared)])
    summary = train_cli.run(cfg)
    assert summary is not None
    assert summary["points"]["count"] == 2
    written = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert written["n"] == 100 and written["alpha"] == 0.001
    if cfg.stage == "pipeline":
        assert set(summary["variants"]) >= {"constant", "samplewise_raw", "samplewise_fill", "samplewise_lp"}
        assert (tmp_path / "report.md").is_file()


def run_expecting_config_error(overrides, tmp_path, match):
    cfg = compose_cfg("train", [f"output_dir={tmp_path}", *TINY, *overrides])
    with pytest.raises((ConfigError, FileNotFoundError), match=match):
        train_cli.run(cfg)
    assert not (tmp_path / "checkpoints").exists(), "validation must happen before training starts"


@pytest.mark.parametrize("overrides, match", [
    (["noise.sigma=0"], r"noise.sigma=0"),
    (["noise.sigma=-0.5"], r"noise.sigma=-0.5"),
    (["certify.alpha=1.5"], r"certify.alpha=1.5"),
    (["certify.n0=0"], r"certify.n0=0"),
    (["certify.n=10"], r"certify.n=10 .*at most 0.0030"),
    (["certify.batch_size=0"], r"certify.batch_size=0"),
    (["dataset.batch_size=0"], r"batch_size"),
    (["objective=smoothadv"], r"needs an attack"),
    (["objective=gaussian", "attack=pgd"], r"only used by objective=smoothadv"),
    (["objective=smoothadv", "attack=pgd", "attack.eps=-1"], r"eps"),
    (["objective=macer", "objective.num_noise=0"], r"num_noise"),
    (["model=cifar_resnet", "model.depth=33"], r"depth"),
    (["dataset=mnist", "dataset.source=npz", "dataset.npz_dir=/nonexistent"], r"/nonexistent.*download"),
    (["stage=finetune"], r"pretrained"),
    (["stage=finetune", "pretrained=/no/such.ckpt"], r"/no/such.ckpt"),
    (["stage=pipeline"], r"noise=samplewise"),
    (["+optim.optimizer.momentun=0.9"], r"optim: .*momentun"),
    (["certify.grid_factors=[]"], r"^certify.grid_factors=\[\] must be a non-empty list"),
    (["certify.grid_factors=[0.5,-1]"], r"^certify.grid_factors=\[0.5, -1\] must be a non-empty list of factors > 0"),
    (["certify.start=360", "certify.max=-1"], r"^certify.start=360 is past the end of the digits test split \(360 images"),
    (["certify.start=10", "certify.max=5"], r"^certify.max=5 is not above certify.start=10"),
    # a sample-wise certification of a model trained at one level needs a grid: refused before training
    (["certify.policy=samplewise"], r"^certify.policy=samplewise: .*certify.grid_factors"),
    (["dataset=mnist", "dataset.source=npz"], r"dataset.source=npz needs dataset.npz_dir=DIR"),
])
def test_bad_settings_fail_before_training_and_name_the_value(overrides, match, tmp_path):
    run_expecting_config_error(overrides, tmp_path, match)


def test_bad_setting_from_the_command_line_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ssmooth.cli.train", "noise.sigma=-1", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "noise.sigma=-1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ddp_cpu_training_gathers_the_sigma_table(tmp_path):
    # Two gloo processes; each selects levels for half of the training samples. The grid leaves out the base
    # level, so an entry that was not gathered would still hold 0.25.
    pretrain = tmp_path / "pretrain"
    cfg = compose_cfg("train", [f"output_dir={pretrain}", *TINY, "certify.enabled=false"])
    train_cli.run(cfg)
    finetune = tmp_path / "finetune"
    cfg = compose_cfg("train", [f"output_dir={finetune}", *TINY, "trainer=ddp_cpu", "stage=finetune",
                                f"pretrained={pretrain / 'checkpoints' / 'last.ckpt'}", "noise=samplewise",
                                "noise.grid_factors=[0.5,2.0]", "noise.num_draws=4", "dataset.train_subset=16",
                                "noise.fraction=1", "certify.enabled=false"])  # every sample in the one update
    train_cli.run(cfg)
    state = torch.load(finetune / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    table = state["noise.table"][:1437]
    from ssmooth.data import SmoothingDataModule

    datamodule = SmoothingDataModule("digits")
    datamodule.setup()
    train_indices = datamodule.train_set.indices[:16]
    assert set(table[train_indices].tolist()) <= {0.125, 0.5}


def test_train_then_certify_checkpoint_without_repeating_the_architecture(tmp_path):
    cfg = compose_cfg("train", [f"output_dir={tmp_path / 'train'}", *TINY, "model.hidden=[32]",
                                "certify.enabled=false"])
    train_cli.run(cfg)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    cfg = compose_cfg("certify", [f"ckpt={ckpt}", f"output_dir={tmp_path / 'cert'}", "certify.n=200",
                                  "certify.n0=10", "certify.max=6", "certify.skip=2", "certify.progress=false"])
    summary = certify_cli.run(cfg)
    rows = pd.read_csv(tmp_path / "cert" / "certify.tsv", sep="\t")
    assert len(rows) == 3 and rows["idx"].is_unique
    assert summary["sigma"] == 0.25  # from the checkpoint, not repeated by the user
    assert (tmp_path / "cert" / "certified_accuracy.png").is_file()


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    cfg = compose_cfg("certify", [f"ckpt={bad}", f"output_dir={tmp_path / 'cert'}"])
    with pytest.raises(ConfigError, match=str(bad)):
        certify_cli.run(cfg)


@pytest.mark.cli
def test_killed_certification_resumes_without_lost_or_duplicated_rows(tmp_path):
    cfg = compose_cfg("train", [f"output_dir={tmp_path / 'train'}", *TINY, "certify.enabled=false"])
    train_cli.run(cfg)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    out = tmp_path / "cert"
    cmd = [sys.executable, "-m", "ssmooth.cli.certify", f"ckpt={ckpt}", f"hydra.run.dir={out}", "certify.n=20000",
           "certify.n0=10", "certify.points_per_group=4", "certify.batch_size=2000", "certify.max=-1",
           "certify.skip=3", "certify.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tsv = out / "certify.tsv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if tsv.is_file() and len(tsv.read_text().splitlines()) > 9:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = pd.read_csv(tsv, sep="\t")
    assert 8 <= len(done_before) < 120, "the kill should land part-way"
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    rows = pd.read_csv(tsv, sep="\t")
    assert len(rows) == 120 and rows["idx"].is_unique  # 360 test digits, every 3rd
    kept = rows.set_index("idx").loc[done_before["idx"]]
    assert (kept["radius"].to_numpy() == done_before["radius"].to_numpy()).all()  # finished rows not redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["points"]["count"] == 120


def test_wandb_logger_runs_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = compose_cfg("train", [f"output_dir={tmp_path}", *TINY, "logger=wandb"])
    summary = train_cli.run(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "one offline run per job, in the job's folder"
    assert summary["variants"]["constant"]["num_points"] == 2


@pytest.mark.cli
def test_sweep_runs_each_job_in_its_own_folder_and_reports_one_table(tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ssmooth.cli.train", "-m", "noise.sigma=0.25,0.5", *TINY, "certify.max=4",
           f"hydra.sweep.dir={sweep}"]
    subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["sigma"] for p in summaries} == {0.25, 0.5}
    # folders and run names show what the sweep varies
    assert [p.parent.name for p in summaries] == ["0_noise.sigma=0.25", "1_noise.sigma=0.5"]
    assert sorted(json.loads(p.read_text())["name"] for p in summaries) == [
        "digits_mlp_gaussian_s0.25 noise.sigma=0.25", "digits_mlp_gaussian_s0.5 noise.sigma=0.5"]
    log_file = (sweep / "0_noise.sigma=0.25" / "train.log").read_text()
    assert "rows, summary and plot" in log_file and "epoch 1/1" in log_file  # the run's lines, in its log
    # re-running the sweep skips the finished jobs
    again = subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, text=True, timeout=300)
    assert again.stdout.count("already finished with the same settings") == 2
    # ... and refuses other settings, naming the difference, without touching the saved config
    saved = (sweep / "0_noise.sigma=0.25" / "config.yaml").read_bytes()
    changed = [c if c != "certify.n0=8" else "certify.n0=9" for c in cmd]
    refused = subprocess.run(changed, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        f"error: {sweep / '0_noise.sigma=0.25'} already holds a finished run with other settings: certify.n0=9 "
        f"(was 8). Use a new folder, or certify its model with: ssmooth-certify "
        f"ckpt={sweep / '0_noise.sigma=0.25' / 'checkpoints' / 'last.ckpt'} certify.KEY=VALUE (the folder is left "
        "as it is)"]
    assert (sweep / "0_noise.sigma=0.25" / "config.yaml").read_bytes() == saved
    from ssmooth.cli import report as report_cli

    assert report_cli.main([str(sweep)]) == 0
    table = (sweep / "report.md").read_text()
    assert "noise.sigma=0.25" in table and "noise.sigma=0.5" in table


def test_the_demo_is_the_default_and_runs_the_whole_method(tmp_path):
    tiny = [o for o in TINY if not o.startswith("~experiment")]
    cfg = compose_cfg("train", [f"output_dir={tmp_path}", *tiny, "noise.num_draws=2"])
    assert cfg.stage == "pipeline" and cfg.dataset.name == "digits"
    summary = train_cli.run(cfg)
    assert summary["sigma_policy"] == "samplewise"
    assert {p.parent.name for p in tmp_path.rglob("summary.json")} == {
        "pretrain", "finetune_samplewise", "selector", "finetune_constant"}
    inductive = json.loads((tmp_path / "selector" / "summary.json").read_text())
    assert inductive["main"] == "inductive" and inductive["variants"]["inductive"]["setting"] == "any input"
    assert inductive["points"]["indices"] == summary["points"]["indices"]
    report = (tmp_path / "report.md").read_text()
    assert "samplewise_fill" in report and "unsound" in report and "inductive" in report
    # The saved selector checkpoint certifies every kind on the same points: constant, the best single level,
    # transductive and inductive.
    every = certify_cli.run(compose_cfg("certify", [
        f"ckpt={tmp_path / 'selector' / 'checkpoints' / 'last.ckpt'}", f"output_dir={tmp_path / 'cert'}",
        "certify.n=100", "certify.n0=8", "certify.max=2", "certify.batch_size=64", "certify.progress=false"]))
    assert every["sigma_policy"] == "inductive" and every["main"] == "inductive"
    assert set(every["variants"]) >= {"constant", "constant_best", "samplewise_fill", "inductive"}
    for key in ("acr", "level_histogram", "mean_radius_selector", "mean_radius_classifier"):  # same seeds
        assert every["variants"]["inductive"][key] == inductive["variants"]["inductive"][key]


@pytest.mark.parametrize("trainer", sorted(p.stem for p in (REPO / "conf" / "trainer").glob("*.yaml")))
def test_every_trainer_config_builds_a_trainer(trainer, tmp_path):
    # GPU configs are built with the accelerator swapped for the CPU: the rest (strategy, timeout) is checked.
    cfg = compose_cfg("train", ["~experiment", f"trainer={trainer}", "trainer.accelerator=cpu",
                                "trainer.precision=32-true", f"output_dir={tmp_path}"])
    if cfg.trainer.devices == -1:
        cfg.trainer.devices = 2
    built = build_trainer(cfg, tmp_path, [], [])
    assert built.max_epochs == cfg.trainer.max_epochs


def _interrupt_when(cmd, cwd, ready) -> subprocess.CompletedProcess:
    """Start ``cmd``, send Ctrl-C (SIGINT) once ``ready()`` holds, return its exit status and output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, "", err)


def test_ctrl_c_in_training_says_what_was_kept_and_exits_130(tmp_path, monkeypatch, capsys):
    from ssmooth.cli.common import Interrupted, exit_on_config_error
    from ssmooth.lit.module import SmoothingModule

    def ctrl_c(self):
        if self.current_epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(SmoothingModule, "on_train_epoch_start", ctrl_c, raising=False)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # Lightning would ignore SIGINT for the rest of pytest
    cfg = compose_cfg("train", [f"output_dir={tmp_path}", *TINY, "trainer.max_epochs=5"])
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(Interrupted, match=rf"^training stopped in epoch 3 of 5; kept {last} \(2 epochs done\); "
                                          rf"re-run with output_dir={tmp_path} to resume$"):
        train_cli.run(cfg)
    assert not (tmp_path / "summary.json").exists()

    def interrupted_task(cfg):
        raise Interrupted("kept 3/9 rows")

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        exit_on_config_error(interrupted_task)(cfg)
    assert exit_.value.code == 130
    assert [line for line in capsys.readouterr().err.splitlines() if line] == ["interrupted: kept 3/9 rows"]


@pytest.mark.cli
def test_ctrl_c_in_certification_says_how_many_rows_were_kept_and_exits_130(tmp_path):
    run = tmp_path / "run"
    tsv = run / "certify.tsv"
    cmd = [sys.executable, "-m", "ssmooth.cli.train", "~experiment", "trainer.max_epochs=1", "certify.progress=false",
           f"hydra.run.dir={run}", "certify.n=20000", "certify.n0=10", "certify.points_per_group=2",
           "certify.batch_size=4000", "certify.skip=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (tsv.is_file() and tsv.read_text().count("\n") > 4):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130 and len(lines) == 1, err
    kept = pd.read_csv(tsv, sep="\t")
    assert 4 <= len(kept) < 120
    assert lines[0] == (f"interrupted: {len(kept)}/120 rows kept in {tsv}; "
                        f"re-run the same command with hydra.run.dir={run} to resume")


@pytest.mark.cli
def test_two_jobs_started_in_the_same_second_get_different_folders(tmp_path):
    cmd = [sys.executable, "-m", "ssmooth.cli.train", "--cfg", "hydra", "--resolve"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    dirs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        dirs.append(next(line.split("dir:", 1)[1].strip() for line in out.splitlines()
                         if line.strip().startswith("dir: outputs/runs/")))
    assert dirs[0] != dirs[1]


def test_a_samplewise_checkpoint_is_certified_samplewise_unless_told_otherwise(tmp_path):
    pretrain = tmp_path / "pretrain"
    train_cli.run(compose_cfg("train", [f"output_dir={pretrain}", *TINY, "certify.enabled=false", "model.hidden=[32]"]))
    finetune = tmp_path / "finetune"
    summary = train_cli.run(compose_cfg("train", [
        f"output_dir={finetune}", *TINY, "stage=finetune", f"pretrained={pretrain / 'checkpoints' / 'last.ckpt'}",
        "noise=samplewise", "noise.num_draws=2"]))
    assert summary["sigma_policy"] == "samplewise" and "samplewise_fill" in summary["variants"]
    # the saved config says what ran: the architecture came from the pretrained checkpoint, not model=mlp's default
    assert OmegaConf.load(finetune / "config.yaml").model.hidden == [32]
    ckpt = finetune / "checkpoints" / "last.ckpt"
    constant = certify_cli.run(compose_cfg("certify", [
        f"ckpt={ckpt}", f"output_dir={tmp_path / 'cert'}", "certify.policy=constant", "certify.n=100",
        "certify.n0=8", "certify.max=4", "certify.progress=false"]))
    assert constant["sigma_policy"] == "constant" and set(constant["variants"]) == {"constant"}


CERTIFY_SMALL = ["certify.n=200", "certify.n0=10", "certify.max=9", "certify.skip=1", "certify.progress=false"]
ROW_KEYS = ["idx", "predict", "radius", "sigma"]


def tiny_checkpoint(tmp_path) -> Path:
    train_cli.run(compose_cfg("train", [f"output_dir={tmp_path / 'train'}", *TINY, "certify.enabled=false"]))
    return tmp_path / "train" / "checkpoints" / "last.ckpt"


def test_two_shards_merged_give_the_rows_of_one_process(tmp_path):
    common = [f"ckpt={tiny_checkpoint(tmp_path)}", *CERTIFY_SMALL]
    one = certify_cli.run(compose_cfg("certify", [*common, f"output_dir={tmp_path / 'one'}"]))
    for k in (0, 1):
        assert certify_cli.run(compose_cfg("certify", [*common, f"output_dir={tmp_path / f'shard{k}'}",
                                                       "certify.num_shards=2", f"certify.shard={k}"])) is None
    merged = certify_cli.run(compose_cfg("certify", [*common, f"output_dir={tmp_path / 'merged'}",
                                                     "certify.merge=true", f"certify.shard_dirs={tmp_path}/shard*"]))
    with pytest.raises(ConfigError, match=r"part\(s\) \[1\] of 2 missing"):
        certify_cli.run(compose_cfg("certify", [*common, f"output_dir={tmp_path / 'bad'}", "certify.merge=true",
                                                f"certify.shard_dirs=[{tmp_path / 'shard0'}]"]))
    reference = pd.read_csv(tmp_path / "one" / "certify.tsv", sep="\t")[ROW_KEYS]
    assert pd.read_csv(tmp_path / "merged" / "certify.tsv", sep="\t")[ROW_KEYS].equals(reference)
    assert merged["variants"] == one["variants"]


@pytest.mark.cli
def test_two_processes_give_the_rows_of_one_process(tmp_path):
    # The real launch: Lightning Fabric starts a second process (gloo) from the command line, each certifies
    # half of the points, rank 0 merges.
    common = [f"ckpt={tiny_checkpoint(tmp_path)}", *CERTIFY_SMALL]
    one = certify_cli.run(compose_cfg("certify", [*common, f"output_dir={tmp_path / 'one'}"]))
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ssmooth.cli.certify", *common, f"hydra.run.dir={out}",
                           "distributed=ddp_cpu", "distributed.devices=2"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)  # a cap for a loaded CI machine
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = pd.read_csv(tmp_path / "one" / "certify.tsv", sep="\t")[ROW_KEYS]
    assert pd.read_csv(out / "certify.tsv", sep="\t")[ROW_KEYS].equals(reference)
    ranks = [pd.read_csv(out / "parts" / f"rank{r}" / "certify.tsv", sep="\t")["idx"].tolist() for r in (0, 1)]
    assert ranks == [reference["idx"].tolist()[0::2], reference["idx"].tolist()[1::2]]  # both ranks did work
    assert json.loads((out / "summary.json").read_text())["variants"] == one["variants"]


@pytest.mark.cli
@pytest.mark.slow
def test_ddp_training_certifies_on_every_rank_with_the_rows_of_one_process(tmp_path):
    # strategy=ddp re-runs the command in a second process, which certifies its half after fit (ddp_fork would
    # return to one process after fit).
    out = tmp_path / "ddp"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "trainer.sync_batchnorm=false", "certify.max=6", "certify.n=200"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "ssmooth.cli.train", *TINY, *ddp, f"hydra.run.dir={out}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = out / "parts"
    assert [len(pd.read_csv(parts / f"rank{r}" / "certify.tsv", sep="\t")) for r in (0, 1)] == [3, 3]
    alone = certify_cli.run(compose_cfg("certify", [f"ckpt={out / 'checkpoints' / 'last.ckpt'}",
                                                    f"output_dir={tmp_path / 'one'}", "certify.max=6",
                                                    "certify.n=200", "certify.n0=8", "certify.batch_size=64",
                                                    "certify.progress=false"]))
    columns = ["idx", "predict", "radius", "sigma"]
    rows = pd.read_csv(out / "certify.tsv", sep="\t")[columns]
    assert rows.equals(pd.read_csv(tmp_path / "one" / "certify.tsv", sep="\t")[columns])
    assert json.loads((out / "summary.json").read_text())["variants"] == alone["variants"]


def test_a_run_folder_skips_the_same_settings_refuses_others_and_continues_with_more_epochs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # dataset.root is relative: the checkpoint must store it absolute
    run = tmp_path / "run"
    base = [f"output_dir={run}", *TINY]
    first = train_cli.run(compose_cfg("train", base))
    saved = (run / "config.yaml").read_bytes()
    last = run / "checkpoints" / "last.ckpt"
    stamp = last.stat().st_mtime_ns
    meta = torch.load(last, weights_only=False)["ssmooth"]
    assert meta["dataset"]["root"] == str(tmp_path / "data")

    # the same settings (a progress flag aside): skipped, nothing rewritten
    again = train_cli.run(compose_cfg("train", [*base, "certify.progress=true"]))
    assert again == first and last.stat().st_mtime_ns == stamp

    # other settings: refused, naming the difference and both ways out; the folder untouched
    with pytest.raises(ConfigError, match=r"already holds a finished run with other settings: noise.sigma=0.5 "
                                          r"\(was 0.25\)\. Use a new folder"):
        train_cli.run(compose_cfg("train", [*base, "noise.sigma=0.5"]))
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=2 \(was 1\).*add ckpt_path=last to continue"):
        train_cli.run(compose_cfg("train", [*base, "trainer.max_epochs=2"]))
    with pytest.raises(ConfigError, match=r"certify.n=200 \(was 100\).*ssmooth-certify ckpt="):
        train_cli.run(compose_cfg("train", [*base, "certify.n=200"]))
    assert (run / "config.yaml").read_bytes() == saved and last.stat().st_mtime_ns == stamp

    # ckpt_path=last with more epochs continues the finished run; its first certification is kept aside
    more = train_cli.run(compose_cfg("train", [*base, "trainer.max_epochs=2", "ckpt_path=last"]))
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2  # one more epoch of one step, not two new ones
    assert OmegaConf.load(run / "config.yaml").trainer.max_epochs == 2
    earlier = run / "certified_after_1_epochs"
    assert json.loads((earlier / "summary_superseded.json").read_text()) == json.loads(json.dumps(first))
    assert json.loads((run / "summary.json").read_text())["points"] == more["points"]
    metrics = pd.read_csv(run / "csv" / "metrics.csv")
    assert sorted(metrics.dropna(subset=["train/loss"])["epoch"]) == [0, 1]  # the first epoch's row survived
    assert list(tmp_path.rglob("summary.json")) == [run / "summary.json"]  # a sweep report sees one run


def test_an_interrupted_run_resumes_from_the_same_command_and_keeps_its_metrics(tmp_path, monkeypatch):
    from ssmooth.lit.module import SmoothingModule

    overrides = [f"output_dir={tmp_path}", *TINY, "trainer.max_epochs=3", "certify.enabled=false",
                 "trainer.limit_train_batches=2"]

    def crash(self):
        if self.current_epoch == 2:
            raise RuntimeError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(SmoothingModule, "on_train_epoch_start", crash, raising=False)
        with pytest.raises(RuntimeError, match="killed"):
            train_cli.run(compose_cfg("train", overrides))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    train_cli.run(compose_cfg("train", overrides))  # the same command: no ckpt_path needed
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["global_step"] == 3 * 2
    metrics = pd.read_csv(tmp_path / "csv" / "metrics.csv")
    assert sorted(metrics.dropna(subset=["train/loss"])["epoch"]) == [0, 1, 2]  # every epoch once
    # finished (certification off): the same command again is a skip, not a fourth epoch
    train_cli.run(compose_cfg("train", overrides))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_certify_grid_factors_given_to_training_are_used(tmp_path):
    summary = train_cli.run(compose_cfg("train", [f"output_dir={tmp_path}", *TINY, "certify.grid_factors=[0.5,1]"]))
    assert summary["sigma_policy"] == "samplewise"
    assert set(pd.read_csv(tmp_path / "certify_raw.tsv", sep="\t")["sigma"]) <= {0.125, 0.25}


def test_certify_refuses_bad_input_naming_it(tmp_path):
    train_cli.run(compose_cfg("train", [f"output_dir={tmp_path / 'train'}", *TINY, "certify.enabled=false"]))
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"

    def refused(overrides, match):
        cfg = compose_cfg("certify", [f"output_dir={tmp_path / 'cert'}", "certify.n=100", "certify.n0=8", *overrides])
        with pytest.raises(ConfigError, match=match):
            certify_cli.run(cfg)
        assert not (tmp_path / "cert").exists()

    refused([f"ckpt={tmp_path / 'train'}"], rf"{tmp_path / 'train'} is a folder, not a checkpoint file; it holds {ckpt}")
    refused([f"ckpt={ckpt}", "certify.grid_factors=[]"], r"certify.grid_factors=\[\]")
    refused([f"ckpt={ckpt}", "certify.policy=samplewise"], r"trained at one level.*certify.grid_factors")
    refused([f"ckpt={ckpt}", "certify.start=1000"], r"certify.start=1000 is past the end")
    refused([f"ckpt={ckpt}", "dataset.source=torchvision"], r"digits.*cannot be loaded from source 'torchvision'")


def test_a_model_whose_width_is_not_num_classes_is_refused():
    from ssmooth.build import check_output_width

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7))
    with pytest.raises(ConfigError, match=r"^model=x outputs 7 classes but the dataset has num_classes=10$"):
        check_output_width(model, (1, 8, 8), 10, "model=x")
    check_output_width(model, (1, 8, 8), 7, "model=x")


def test_nan_pixels_are_refused_before_training(tmp_path):
    images = np.zeros((4, 28, 28), dtype=np.float32)
    images[2, 5, 5] = np.nan
    for split in ("train", "test"):
        (tmp_path / "mnist").mkdir(exist_ok=True)
        np.savez(tmp_path / "mnist" / f"mnist_{split}.npz", images=images, labels=np.arange(4))
    run_expecting_config_error(["dataset=mnist", "model=lenet", "dataset.source=npz", f"dataset.npz_dir={tmp_path}"],
                               tmp_path / "run", r"mnist_(train|test).npz: 1 pixel values are NaN or infinite")


@pytest.mark.parametrize("argv, message", [
    (["trainer.max_epoch=1"], "error: unknown key 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"),
    (["-m", "objective=gaussian,macerr"], "error: objective=macerr: no such config; choose one of consistency, "
                                          "gaussian, macer, smoothadv"),
    (["noise.sigma=0.25,0.5"], "error: Ambiguous value for argument 'noise.sigma=0.25,0.5': sweep over it with -m, "
                               "or write a list as key=[a,b]"),
    (["+trainer.max_epochz=1", "certify.nn=3"], "error: unknown key 'certify.nn'; did you mean 'certify.n'?"),
])
def test_a_bad_command_line_is_one_line_and_exit_2_before_hydra_starts(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ssmooth-train", *argv])
    with pytest.raises(SystemExit) as exit_:
        train_cli.main()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [message]


def test_help_lists_the_groups_each_command_takes(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ssmooth-certify", "--help"])
    certify_cli.main()
    text = capsys.readouterr().out
    assert text.startswith("ssmooth-certify: certify a saved checkpoint") and "certify: default" in text
    assert "model:" not in text and "experiment:" not in text  # groups ssmooth-certify would refuse
    monkeypatch.setattr(sys, "argv", ["ssmooth-train", "-h"])
    train_cli.main()
    text = capsys.readouterr().out
    assert re.search(r"^  experiment: .*cifar10_gaussian \|", text, re.M) and "(default: demo)" in text
    assert re.search(r"^  model: cifar_resnet \| .*lenet \| mlp.*\(default: mlp\)$", text, re.M)


def test_config_differences_name_each_changed_leaf():
    from ssmooth.build import config_differences

    saved = {"noise": {"sigma": 0.25}, "trainer": {"max_epochs": 1, "devices": 1}, "output_dir": "a"}
    requested = {"noise": {"sigma": 0.5}, "trainer": {"max_epochs": 1, "devices": 1}, "output_dir": "b",
                 "certify": {"shard_dirs": None, "new_switch": False, "new_level": 0.5}}
    assert config_differences(saved, requested, ignore=("output_dir",)) == [
        "certify.new_level=0.5 (was <absent>)", "noise.sigma=0.5 (was 0.25)"]
    assert config_differences(requested, saved, ignore=("output_dir", "certify")) == ["noise.sigma=0.25 (was 0.5)"]
