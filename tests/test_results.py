"""Row files: flushed, resumable after a kill mid-line, never a duplicated index, radii written exactly."""
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
