"""ssmooth-certify keeps its folder a contract on the command line: a changed setting or another checkpoint exits 2
with one line, Ctrl-C exits 130 with one line saying what was kept, and the same command then resumes."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ssmooth.cli import train as train_cli
from ssmooth.cli.common import CONFIG_DIR

TINY_TRAIN = [
    "~experiment", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
    "dataset.train_subset=8", "dataset.batch_size=4", "dataset.num_workers=0", "certify.enabled=false",
]


def train_checkpoint(out: Path, seed: int) -> Path:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"output_dir={out}", f"seed={seed}", *TINY_TRAIN])
    train_cli.run(cfg)
    return out / "checkpoints" / "last.ckpt"


def certify(ckpt, out, *extra, wait=True):
    cmd = [sys.executable, "-m", "ssmooth.cli.certify", f"ckpt={ckpt}", f"hydra.run.dir={out}", "certify.n0=10",
           "certify.skip=3", "certify.max=60", "certify.points_per_group=2", "certify.batch_size=2000", "certify.progress=false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    # SIGINT back to its default, as in a terminal: a parent started in the background (nohup ... &) passes on an
    # ignored SIGINT, and Python then installs no KeyboardInterrupt handler.
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.cli
def test_changed_settings_and_another_checkpoint_exit_2_and_ctrl_c_exits_130(tmp_path):
    ckpt = train_checkpoint(tmp_path / "a", seed=0)
    other = train_checkpoint(tmp_path / "b", seed=1)
    out = tmp_path / "cert"
    # Ctrl-C part-way: one line, exit 130, the rows so far kept.
    proc = certify(ckpt, out, "certify.n=20000", wait=False)
    tsv = out / "certify.tsv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (tsv.is_file() and len(tsv.read_text().splitlines()) > 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert re.match(r"^interrupted: .*\b\d+/20 rows\b.*resume", last), err
    assert "Traceback" not in err
    kept = tsv.read_bytes()
    # Changed n, then another checkpoint: refused before any work, the folder untouched.
    for checkpoint, n, key in ((ckpt, 5000, "n 20000 in the folder, 5000 now"), (other, 20000, "checkpoint_sha256")):
        done = certify(checkpoint, out, f"certify.n={n}")
        assert done.returncode == 2 and key in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert tsv.read_bytes() == kept
    # The same command resumes and finishes: test positions 0, 3, ..., 57.
    done = certify(ckpt, out, "certify.n=20000")
    assert done.returncode == 0, done.stderr
    assert tsv.read_bytes().startswith(kept)
    assert json.loads((out / "summary.json").read_text())["points"]["count"] == 20
