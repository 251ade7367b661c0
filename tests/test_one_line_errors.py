"""What a new user types wrong: one line naming the setting and exit 2, before any folder is made."""
import sys

import pytest

from ssmooth.cli import certify as certify_cli
from ssmooth.cli import importer
from ssmooth.cli import train as train_cli
from ssmooth.cli.common import ConfigError, certify_config


def one_line_exit_2(main, argv, monkeypatch, capsys, tmp_path) -> str:
    monkeypatch.chdir(tmp_path)  # a command that went ahead would make outputs/ here
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert not (tmp_path / "outputs").exists()
    return lines[0]


@pytest.mark.parametrize("command, main", [("ssmooth-certify", certify_cli.main), ("ssmooth-train", train_cli.main)])
@pytest.mark.parametrize("argv, message", [
    (["certify.n=1e4"], "error: certify.n=10000.0 must be an integer (write 10000)"),
    (["certify.progress=3"], "error: certify.progress=3 must be true or false"),
    (["certify.radii=[0.5,a]"], "error: certify.radii=[0.5, 'a'] must be a list of numbers or null"),
    # +n=1000 would add a key that nothing reads: the run would go ahead at the default n
    (["n=1000"], "error: unknown key 'n'; did you mean 'certify.n'?"),
])
def test_a_wrong_type_or_an_unqualified_key_is_one_line(command, main, argv, message, monkeypatch, capsys, tmp_path):
    ckpt = ["ckpt=missing.ckpt"] if command == "ssmooth-certify" else []
    assert one_line_exit_2(main, [command, *ckpt, *argv], monkeypatch, capsys, tmp_path) == message


def test_an_unknown_key_never_suggests_adding_it(monkeypatch, capsys, tmp_path):
    line = one_line_exit_2(certify_cli.main, ["ssmooth-certify", "ckpt=x", "zzzq=1"], monkeypatch, capsys, tmp_path)
    assert line.startswith("error: unknown key 'zzzq'; no setting has this name") and "+" not in line


def test_certify_without_a_checkpoint_is_one_line(monkeypatch, capsys, tmp_path):
    line = one_line_exit_2(certify_cli.main, ["ssmooth-certify", "certify.max=10"], monkeypatch, capsys, tmp_path)
    assert line.startswith("error: ckpt=... is required")


def test_import_of_an_unknown_dataset_is_one_line(monkeypatch, capsys, tmp_path):
    argv = [str(tmp_path / "checkpoint.pth.tar"), "--family", "cohen", "--dataset", "cifar", "--sigma", "0.25",
            "--out", str(tmp_path / "out.ckpt")]
    with pytest.raises(SystemExit) as exit_:
        importer.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: cohen published no cifar networks that can be imported (only ['cifar10', 'imagenet'])"]


def test_certify_config_checks_types_from_python_too():
    with pytest.raises(ConfigError, match=r"certify.alpha='0.001' must be a number"):
        certify_config({"alpha": "0.001"})
    assert certify_config({"alpha": 1e-3, "sigma": 1, "radii": [0, 0.5]}).sigma == 1  # an int is a number
