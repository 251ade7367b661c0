"""A run that stopped before its first row (a crash, a bad setting found late) leaves a fingerprint and empty row
files: the next run, even with other settings, starts there instead of being refused. A row is never lost."""
import json

import pytest

from ssmooth.certify.distributed import start_part
from ssmooth.certify.runfolder import FingerprintMismatch, fingerprint, open_run_folder


def fp(**kw):
    base = dict(checkpoint_sha256="a" * 64, dataset="mnist", split="test", subset={"skip": 1, "max": -1, "start": 0},
                indices=[0, 1, 2], labels=[7, 2, 1], n0=100, n=1000, alpha=0.001, policy="constant", sigma=0.25,
                pixels_sha256="b" * 64, seed=0, version="0.1.0")
    return fingerprint(**{**base, **kw})


def crashed_run(folder, header="idx\tlabel\tpredict\n"):
    open_run_folder(folder, fp()).close()
    (folder / "certify.tsv").write_text(header)  # the header only: the crash came before the first row


@pytest.mark.parametrize("header", ["idx\tlabel\tpredict\n", "", "idx\tla"])
def test_a_folder_without_rows_takes_other_settings(tmp_path, header):
    crashed_run(tmp_path, header)
    with open_run_folder(tmp_path, fp(n=2000)) as folder:
        assert not folder.resumed
    assert json.loads((tmp_path / "fingerprint.json").read_text())["n"] == 2000
    assert not (tmp_path / "certify.tsv").exists()


def test_a_folder_with_one_row_or_a_summary_is_still_refused(tmp_path):
    crashed_run(tmp_path)
    (tmp_path / "certify.tsv").write_text("idx\tlabel\tpredict\n0\t7\t7\n")
    with pytest.raises(FingerprintMismatch, match="n 1000 in the folder, 2000 now"):
        open_run_folder(tmp_path, fp(n=2000))
    (tmp_path / "certify.tsv").write_text("idx\tlabel\tpredict\n")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(FingerprintMismatch):
        open_run_folder(tmp_path, fp(n=2000))


def test_a_part_without_rows_takes_other_settings(tmp_path):
    start_part(tmp_path, part=0, num_parts=2, indices=[0, 2], fp=fp())
    (tmp_path / "certify.tsv").write_text("idx\tlabel\tpredict\n")
    start_part(tmp_path, part=1, num_parts=3, indices=[1], fp=fp(n=2000))
    record = json.loads((tmp_path / "part.json").read_text())
    assert (record["part"], record["num_parts"], record["fingerprint"]["n"]) == (1, 3, 2000)
