"""A merged run's time is the parts' time: the sum (compute spent) and the slowest (time waited), not the merge's."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "certify"))

from test_distributed import config, in_shards, model, points  # noqa: E402

from ssmooth.certify.distributed import merged_wall_time, read_record  # noqa: E402


def test_merged_wall_time_known_answer(tmp_path):
    folders = []
    for k, wall in enumerate((3.0, 5.0, 4.0)):
        folder = tmp_path / f"part{k}"
        folder.mkdir()
        (folder / "part.json").write_text(json.dumps({"part": k, "wall_time_s": wall}))
        folders.append(folder)
    merged = merged_wall_time({"wall_time_s": 1.0}, folders)
    assert merged["wall_time_s"] == 6.0  # the slowest part, then the merge
    assert merged["parts_wall_time_s"] == {"count": 3, "sum": 12.0, "slowest": 5.0}
    assert merged["merge_wall_time_s"] == 1.0
    (folders[1] / "part.json").write_text(json.dumps({"part": 1}))  # written before parts kept their time
    assert merged_wall_time({"wall_time_s": 1.0}, folders) == {"wall_time_s": 1.0}


def test_a_merged_summary_carries_its_parts_time(tmp_path):
    summary, dirs = in_shards(model(), points(5), tmp_path, config(policy="constant"), num_shards=2)
    walls = [read_record(d)["wall_time_s"] for d in dirs]
    assert all(w > 0 for w in walls)
    assert summary["parts_wall_time_s"] == {"count": 2, "sum": round(sum(walls), 2), "slowest": max(walls)}
    assert json.loads((tmp_path / "merged" / "summary.json").read_text())["wall_time_s"] == summary["wall_time_s"]
    assert summary["wall_time_s"] >= max(walls)
