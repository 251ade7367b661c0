"""ssmooth-certify does the pipeline's work at the pipeline's speed: the checkpoint's own forward batch size,
unless the command line sets one."""
from ssmooth.cli import certify as certify_cli
from ssmooth.evaluate import CertifyConfig

RECIPE = {"config": {"certify": {"batch_size": 4000}}}  # e.g. the MNIST recipes


def test_the_checkpoints_batch_size_is_the_default(monkeypatch):
    monkeypatch.setattr(certify_cli, "command_line_keys", lambda: set())
    assert certify_cli.batch_size_of_checkpoint(CertifyConfig(), RECIPE).batch_size == 4000
    assert certify_cli.batch_size_of_checkpoint(CertifyConfig(), {}).batch_size == 1000  # imported: no run config
    assert certify_cli.batch_size_of_checkpoint(CertifyConfig(batch_size=250), RECIPE).batch_size == 250


def test_a_batch_size_on_the_command_line_wins(monkeypatch):
    monkeypatch.setattr(certify_cli, "command_line_keys", lambda: {"certify.batch_size"})
    assert certify_cli.batch_size_of_checkpoint(CertifyConfig(batch_size=1000), RECIPE).batch_size == 1000
