"""Row files: flushed, resumable after a kill mid-line, never a duplicated index, radii written exactly."""
import os

import pandas as pd
import pytest

from ssmooth.certify.results import ROW_COLUMNS, RowWriter, merge_rows


def row(idx, radius=0.5):
    return {"idx": idx, "label": 1, "predict": 1, "radius": radius, "correct": 1, "sigma": 0.25, "time": 0.1}


def test_resume_after_a_torn_line_keeps_complete_rows_and_skips_them(tmp_path):
    path = tmp_path / "certify.tsv"
    with RowWriter(path) as writer:
        writer.write([row(0), row(5)])
    with open(path, "a") as f:
        f.write("9\t1\t1\t0.3")  # killed in the middle of a row
    writer = RowWriter(path)
    assert writer.done == {0, 5}
    writer.write([row(5), row(9), row(12)])  # 5 again: never written twice
    writer.close()
    frame = pd.read_csv(path, sep="\t")
    assert frame["idx"].tolist() == [0, 5, 9, 12]


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_interrupted_repair_never_touches_complete_rows(tmp_path, monkeypatch, when):
    path = tmp_path / "certify.tsv"
    with RowWriter(path) as writer:
        writer.write([row(i, radius=0.1 * i) for i in range(5)])
    complete = path.read_bytes()
    inode = path.stat().st_ino
    with open(path, "ab") as f:
        f.write(b"5\t1\t1\t0.123")  # a kill in the middle of a row
    truncate = os.truncate

    def interrupted(p, length):
        if when == "after":
            truncate(p, length)
        raise KeyboardInterrupt  # Ctrl-C (or a kill) during the repair

    monkeypatch.setattr(os, "truncate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        RowWriter(path)
    # Either the tail is still there or it is gone; the complete rows are byte-identical, in the same file.
    assert path.read_bytes() in (complete, complete + b"5\t1\t1\t0.123")
    assert path.stat().st_ino == inode
    monkeypatch.setattr(os, "truncate", truncate)
    with RowWriter(path) as writer:
        assert writer.done == {0, 1, 2, 3, 4}
    assert path.read_bytes() == complete


def test_a_torn_header_restarts_the_file_and_a_garbled_row_is_refused(tmp_path):
    path = tmp_path / "certify.tsv"
    path.write_text("idx\tlab")
    with RowWriter(path) as writer:
        assert writer.done == set()
    assert path.read_text() == "\t".join(ROW_COLUMNS) + "\n"
    with open(path, "a") as f:
        f.write("3\t1\n")  # a complete line that is not a row: never guess, stop
    with pytest.raises(ValueError, match="line 2: not a row of 7 fields"):
        RowWriter(path)


def test_radius_is_written_at_full_precision(tmp_path):
    path = tmp_path / "certify.tsv"
    radius = 0.123456789012345678
    with RowWriter(path) as writer:
        writer.write([row(0, radius)])
    assert pd.read_csv(path, sep="\t")["radius"][0] == radius  # rounding up would overstate the certificate


def test_a_file_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "certify.tsv"
    path.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="columns"):
        RowWriter(path, ROW_COLUMNS)


def test_merge_drops_distributed_sampler_duplicates(tmp_path):
    for rank, indices in enumerate([[0, 2, 4], [1, 3, 0]]):  # the sampler padded rank 1 with index 0 again
        with RowWriter(tmp_path / f"rank{rank}.tsv") as writer:
            writer.write([row(i) for i in indices])
    merged = merge_rows([tmp_path / "rank0.tsv", tmp_path / "rank1.tsv"], tmp_path / "merged.tsv")
    assert merged["idx"].tolist() == [0, 1, 2, 3, 4]
    assert pd.read_csv(tmp_path / "merged.tsv", sep="\t")["idx"].is_unique
