"""Importing published checkpoints: same logits as the published network behind its own normalization, for every
family and layout; errors that name the mismatch; the imported file certifies and finetunes like our own."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssmooth.checkpoints import ImportMismatch, default_normalization, import_published, write_checkpoint
from ssmooth.cli import importer
from ssmooth.data import DATASETS

REPO = Path(__file__).resolve().parents[1]
CIFAR, MNIST, IMAGENET = DATASETS["cifar10"], DATASETS["mnist"], DATASETS["imagenet"]


def save_published(path: Path, network: dict, layout: str, arch: str | None = None, prefix: str = "1.") -> Path:
    """``network`` (published key names, no prefix) in a family's file layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "macer":
        content = {"net": dict(network), "epoch": 440}
    else:  # Cohen, SmoothAdv, Consistency: Sequential(normalization, network) with an optimizer state beside it
        content = {"epoch": 90, "arch": arch, "state_dict": {prefix + k: v for k, v in network.items()},
                   "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "params": [0, 1]}]}}
    torch.save(content, path)
    return path


def channel(values) -> torch.Tensor:
    return torch.tensor(values).view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------- MNIST LeNet (no data)


def lenet_weights(seed: int = 0, classes: int = 10) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,), "conv2.weight": (50, 20, 5, 5),
              "conv2.bias": (50,), "fc1.weight": (500, 800), "fc1.bias": (500,), "fc2.weight": (classes, 500),
              "fc2.bias": (classes,)}
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def lenet_reference(w: dict, x: torch.Tensor) -> torch.Tensor:
    """The published LeNet's forward pass, written out from its layer names."""
    x = F.max_pool2d(F.relu(F.conv2d(x, w["conv1.weight"], w["conv1.bias"])), 2)
    x = F.max_pool2d(F.relu(F.conv2d(x, w["conv2.weight"], w["conv2.bias"])), 2)
    x = F.relu(F.linear(x.flatten(1), w["fc1.weight"], w["fc1.bias"]))
    return F.linear(x, w["fc2.weight"], w["fc2.bias"])


@pytest.mark.parametrize("family, layout", [("consistency", "cohen"), ("macer", "macer")])
def test_mnist_lenet_gives_the_reference_logits_on_raw_pixels(family, layout, tmp_path):
    weights = lenet_weights()
    path = save_published(tmp_path / "checkpoint.pth.tar", weights, layout, arch="lenet")
    model, meta = import_published(path, family, "mnist", sigma=0.5)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), lenet_reference(weights, x), rtol=1e-6, atol=1e-6)
    assert meta["imported"]["normalization"]["kind"] == "none" and meta["model"] == {"name": "lenet",
                                                                                    "normalize": False}
    assert meta["noise"] == {"kind": "constant", "sigma": 0.5, "grid": []}
    assert meta["imported"]["family"] == family
    assert meta["imported"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_written_checkpoint_rebuilds_the_same_model_as_certify_does(tmp_path):
    from ssmooth.build import build_model
    from ssmooth.lit.module import load_checkpoint, model_state

    weights = lenet_weights(seed=1)
    path = save_published(tmp_path / "checkpoint.pth.tar", weights, "cohen", arch="lenet")
    # an explicit override: mean subtraction only, which no config flag can express; the buffers must carry it
    model, meta = import_published(path, "consistency", "mnist", 0.25, normalization="mean_only")
    ckpt = write_checkpoint(tmp_path / "imported.ckpt", model, meta)
    meta_read, state = load_checkpoint(ckpt)
    rebuilt = build_model(meta_read["model"], MNIST)
    rebuilt.load_state_dict(model_state(state))
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), lenet_reference(weights, x - MNIST.mean[0]),
                                   rtol=1e-5, atol=1e-5)
    assert meta_read["imported"]["normalization"] == {"kind": "mean_only", "mean": [0.1307], "std": [1.0]}


def test_normalization_follows_family_dataset_and_folder():
    assert default_normalization("cohen", "cifar10") == "mean_std"
    assert default_normalization("cohen", "imagenet") == "mean_std"
    assert default_normalization("consistency", "mnist") == "none"
    assert default_normalization("macer", "cifar10") == "none"
    assert default_normalization("smoothadv", "imagenet") == "mean_only"
    assert default_normalization("smoothadv", "cifar10", "pretrained/cifar10/PGD_2steps/eps_64/noise_0.25/"
                                 "checkpoint.pth.tar") == "mean_only"
    for folder in ("finetune_cifar_from_imagenetPGD2steps", "self_training"):
        assert default_normalization("smoothadv", "cifar10", f"models/cifar10/{folder}/noise_0.5/c.pth.tar") \
            == "mean_std"


def lenet_with(change) -> dict:
    weights = lenet_weights()
    change(weights)
    return weights


@pytest.mark.parametrize("family, layout, network, arch, prefix, match", [
    ("consistency", "cohen", lenet_with(lambda w: w.update({"fc3.weight": w.pop("fc2.weight")})), "lenet", "1.",
     r"missing key\(s\) \['fc2.weight'\]; unexpected key\(s\) \['fc3.weight'\]"),
    ("consistency", "cohen", lenet_with(lambda w: w.update({"fc2.weight": torch.zeros(100, 500)})), "lenet", "1.",
     r"key 'fc2.weight' has shape \(100, 500\) in the file, the network needs \(10, 500\)"),
    ("macer", "cohen", lenet_weights(), "lenet", "1.", r"looks like a cohen/smoothadv/consistency file, not macer"),
    ("consistency", "macer", lenet_weights(), None, "", r"looks like a macer file, not consistency"),
    ("consistency", "cohen", lenet_weights(), "cifar_resnet110", "1.", r"arch 'cifar_resnet110' is not the mnist"),
    ("consistency", "cohen", lenet_weights(), "lenet", "", r"key 'conv1.weight' lacks the prefix '1.module.' or '1.'"),
    ("cohen", "cohen", lenet_weights(), "lenet", "1.", r"cohen published no mnist networks"),
])
def test_mismatches_are_named(family, layout, network, arch, prefix, match, tmp_path):
    path = save_published(tmp_path / "checkpoint.pth.tar", network, layout, arch=arch, prefix=prefix)
    with pytest.raises(ImportMismatch, match=match):
        import_published(path, family, "mnist", sigma=0.25)


def test_bad_arguments_and_foreign_files_are_named(tmp_path):
    path = save_published(tmp_path / "checkpoint.pth.tar", lenet_weights(), "macer")
    with pytest.raises(ImportMismatch, match=r"family 'lecun'"):
        import_published(path, "lecun", "mnist", 0.25)
    with pytest.raises(ImportMismatch, match=r"normalization 'std_only'"):
        import_published(path, "macer", "mnist", 0.25, normalization="std_only")
    with pytest.raises(ImportMismatch, match=r"sigma=0"):
        import_published(path, "macer", "mnist", 0)
    junk = tmp_path / "junk.pth.tar"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ImportMismatch, match=r"junk.pth.tar could not be read"):
        import_published(junk, "macer", "mnist", 0.25)
    model, meta = import_published(path, "macer", "mnist", 0.25)
    ours = write_checkpoint(tmp_path / "ours.ckpt", model, meta)
    with pytest.raises(ImportMismatch, match=r"already an ssmooth checkpoint"):
        import_published(ours, "macer", "mnist", 0.25)


def test_cli_writes_a_checkpoint_and_rejects_bad_input_in_one_line(tmp_path, capsys):
    path = save_published(tmp_path / "noise_0.50" / "checkpoint.pth.tar", lenet_weights(), "macer")
    out = tmp_path / "imported.ckpt"
    args = [str(path), "--family", "macer", "--dataset", "mnist", "--sigma", "0.5", "--out", str(out)]
    importer.main(args)
    assert "normalization none" in capsys.readouterr().out
    assert torch.load(out, weights_only=False)["ssmooth"]["noise"]["sigma"] == 0.5
    for bad, named in ([*args], "exists"),  ([*args[:2], "consistency", *args[3:], "--force"], "looks like a macer file"), \
            ([*args[:6], "x", *args[7:]], "invalid float value: 'x'"):
        with pytest.raises(SystemExit) as exit_info:
            importer.main(bad)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and named in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # a subprocess pays the full import of torch and Lightning; main() is tested in-process above
@pytest.mark.cli
def test_console_script_imports_a_file(tmp_path):
    path = save_published(tmp_path / "checkpoint.pth.tar", lenet_weights(), "cohen", arch="lenet")
    out = tmp_path / "imported.ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "ssmooth.cli.importer", str(path), "--family", "consistency",
                           "--dataset", "mnist", "--sigma", "0.25", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"ssmooth-certify ckpt={out}" in done.stdout and out.is_file()


def test_imported_checkpoint_certifies_and_finetunes(tmp_path, shared_data):
    from hydra import compose, initialize_config_dir

    from ssmooth.cli import certify as certify_cli
    from ssmooth.cli import train as train_cli
    from ssmooth.cli.common import CONFIG_DIR

    path = save_published(tmp_path / "checkpoint.pth.tar", lenet_weights(), "cohen", arch="lenet")
    model, meta = import_published(path, "consistency", "mnist", 0.25, normalization="mean_only")
    ckpt = write_checkpoint(tmp_path / "imported.ckpt", model, meta)
    data = ["dataset.source=npz", f"dataset.npz_dir={shared_data}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        certify_cfg = compose("certify", [f"ckpt={ckpt}", f"output_dir={tmp_path / 'cert'}", *data, "certify.n0=8",
                                          "certify.n=100", "certify.max=2", "certify.progress=false"])
        finetune_cfg = compose("train", [
            "~experiment", "dataset=mnist", "model=lenet", "stage=finetune", f"pretrained={ckpt}", *data,
            f"output_dir={tmp_path / 'finetune'}", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "dataset.train_subset=8", "dataset.batch_size=4",
            "logger=none", "certify.enabled=false"])
    summary = certify_cli.run(certify_cfg)
    assert summary["points"]["count"] == 2 and summary["sigma"] == 0.25
    train_cli.run(finetune_cfg)
    finetuned = torch.load(tmp_path / "finetune" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    # the imported normalization (mean only) is the finetuned model's too
    assert finetuned["model.normalize.std"].tolist() == [1.0] and finetuned["model.normalize.mean"].tolist() == \
        pytest.approx([0.1307])


# ------------------------------------------------------------------------------- CIFAR-10 ResNet-110 (published)


@pytest.fixture(scope="module")
def cohen(published_checkpoints):
    """The published Cohen-format file, its network keys, the probe, and our imported model."""
    cohen_file = published_checkpoints / "cohen_cifar10_resnet110_random.pth.tar"
    state = torch.load(cohen_file, map_location="cpu", weights_only=True)["state_dict"]
    network = {k[len("1."):]: v for k, v in state.items()}
    probe = torch.load(published_checkpoints / "cohen_cifar10_resnet110_random.probe.pt", map_location="cpu",
                       weights_only=True)
    model, meta = import_published(cohen_file, "cohen", "cifar10", sigma=0.25)
    return network, probe, model, meta


def test_cohen_resnet110_gives_the_published_logits(cohen):
    network, probe, model, meta = cohen
    with torch.no_grad():
        logits = model(probe["x"])
    # Random weights give logits near 3e10; float32 rounding of that scale is what "equal" can mean here.
    scale = probe["logits"].abs().max()
    assert (logits - probe["logits"]).abs().max() <= 1e-6 * scale
    assert logits.argmax(1).tolist() == probe["logits"].argmax(1).tolist()
    assert len(network) == 668 and meta["model"] == {"name": "cifar_resnet", "depth": 110, "normalize": True}
    assert sum(p.numel() for p in model.body.parameters()) == 1_730_714
    assert meta["imported"]["normalization"] == {"kind": "mean_std", "mean": list(CIFAR.mean), "std": list(CIFAR.std)}
    assert meta["imported"]["arch"] == "cifar_resnet110" and meta["imported"]["key_prefix"] == "1."


@pytest.mark.parametrize("family, layout, prefix, folder, normalization, expected", [
    ("smoothadv", "cohen", "1.", "PGD_2steps", None, "mean_only"),
    ("smoothadv", "cohen", "1.", "self_training", None, "mean_std"),
    ("consistency", "cohen", "1.module.", "", None, "mean_std"),
    ("macer", "macer", "", "", None, "none"),
    ("cohen", "cohen", "1.", "", "none", "none"),  # an explicit override wins
])
def test_each_family_puts_its_own_normalization_in_front(family, layout, prefix, folder, normalization, expected,
                                                         cohen, tmp_path):
    network, probe, cohen_model, _ = cohen
    path = save_published(tmp_path / folder / "checkpoint.pth.tar", network, layout, "cifar_resnet110", prefix)
    model, meta = import_published(path, family, "cifar10", 0.5, normalization=normalization)
    x = probe["x"]
    mean, std = channel(CIFAR.mean), channel(CIFAR.std)
    normalized = {"mean_std": (x - mean) / std, "mean_only": x - mean, "none": x}[expected]
    with torch.no_grad():
        reference = cohen_model.body(normalized)  # the network the probe validated, fed by hand
        logits = model(x)
    assert (logits - reference).abs().max() <= 1e-6 * reference.abs().max()
    assert meta["imported"]["normalization"]["kind"] == expected
    assert meta["model"]["normalize"] == (expected != "none")


def test_arch_that_disagrees_with_the_keys_is_named(cohen, tmp_path):
    network = cohen[0]
    path = save_published(tmp_path / "checkpoint.pth.tar", network, "cohen", arch="cifar_resnet20")
    with pytest.raises(ImportMismatch, match=r"arch 'cifar_resnet20' says depth 20, its keys hold 110"):
        import_published(path, "cohen", "cifar10", 0.25)
    with pytest.raises(ImportMismatch, match=r"arch 'resnet50' is not the cifar10 network"):
        import_published(save_published(path, network, "cohen", arch="resnet50"), "cohen", "cifar10", 0.25)


# ---------------------------------------------------------------------------------- ImageNet ResNet-50 (no data)


def test_imagenet_resnet50_matches_torchvision_behind_each_normalization(tmp_path):
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    for module in reference.modules():  # non-trivial BatchNorm statistics, so that eval mode is checked
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    # ImageNet models were saved from DataParallel inside Sequential(normalization, network): "1.module."
    path = save_published(tmp_path / "checkpoint.pth.tar", reference.state_dict(), "cohen", "resnet50", "1.module.")
    x = torch.rand(2, 3, 64, 64)  # small images: global pooling makes the check independent of 224x224
    mean, std = channel(IMAGENET.mean), channel(IMAGENET.std)
    for family, inputs in (("cohen", (x - mean) / std), ("smoothadv", x - mean)):
        model, meta = import_published(path, family, "imagenet", 0.5)
        with torch.no_grad():
            expected = reference(inputs)
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        assert meta["dataset"]["num_classes"] == 1000 and meta["model"]["name"] == "resnet50"
        assert meta["imported"]["key_prefix"] == "1.module."
