"""Train the level selectors of the MNIST any-input measurement from a finished sample-wise finetuning.
usage: python train_selectors.py RUN_DIR SIGMA TARGETS(table|radius) OUT_NAME [override ...]"""
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from ssmooth.pipeline import train_selector

DATA = os.environ.get("SSMOOTH_DATA", "data")  # a folder with mnist/mnist_train.npz and mnist_test.npz

run, sigma, targets, name, *extra = sys.argv[1:]
conf = str(Path(__import__("ssmooth").__file__).resolve().parent.parent / "conf")
with initialize_config_dir(config_dir=conf, version_base="1.3"):
    cfg = compose("train", overrides=[
        "experiment=mnist_samplewise", f"noise.sigma={sigma}", "dataset.source=npz",
        f"dataset.npz_dir={DATA}", "certify.enabled=false", "logger=csv", "certify.n=10000",
        f"output_dir={run}/{name}", f"name=mnist_s{sigma}/{name}", f"selector.targets={targets}",
        "trainer.max_epochs=3", *extra])
print(train_selector(cfg, Path(run) / "finetune_samplewise" / "checkpoints" / "last.ckpt"))
