"""Certification split over ranks or shards gives the rows of one process; a bad part is refused at merge."""
import io
import json
import shutil
import threading

import pandas as pd
import pytest
import torch
from torch import nn

from ssmooth.certify.distributed import MergeError, part_positions, read_record
from ssmooth.data import IndexedDataset
from ssmooth.evaluate import CertifyConfig, certify_model, certify_on_ranks, certify_part

GRID = [0.125, 0.25, 0.5]
COLUMNS = ["idx", "predict", "radius", "sigma"]


def model():
    # a linear classifier centred on the pixel cube: the points fall in different classes at different margins
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        net[1].weight.mul_(8)
        net[1].bias.copy_(-net[1].weight.sum(1) * 0.5)
    return net


def points(num=11):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(num, 1, 4, 4, generator=g)
    return IndexedDataset(images, torch.arange(num) % 3, torch.arange(200, 200 + 3 * num, 3))


def config(**kw):
    base = dict(n0=16, n=300, alpha=0.05, batch_size=256, points_per_group=3, progress=False, selection_samples=8,
                radii=[0, 0.25, 0.5])
    return CertifyConfig(**{**base, **kw})


KW = dict(num_classes=3, base_sigma=0.25, grid=GRID, dataset="toy")


def rows(folder, policy):
    frame = pd.read_csv(folder / "certify.tsv", sep="\t")
    return frame[COLUMNS + (["radius_raw"] if policy == "samplewise" else [])]


def on_two_ranks(net, data, out, cfg):
    """certify_on_ranks as two ranks would run it, in two threads of this process (the CLI test uses processes)."""
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def rank(r):
        try:
            results[r] = certify_on_ranks(net, data, out, cfg, rank=r, world_size=2, barrier=barrier.wait, **KW)
        except Exception as err:  # noqa: BLE001 - surfaced by the assert below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[1] is None
    return results[0]


def in_shards(net, data, out, cfg, num_shards=2):
    dirs = [out / f"shard{k}" for k in range(num_shards)]
    for k, folder in enumerate(dirs):
        shard_cfg = CertifyConfig(**{**cfg.__dict__, "num_shards": num_shards, "shard": k})
        certify_part(net, data, folder, shard_cfg, part=k, num_parts=num_shards, **KW)
    return certify_model(net, data, out / "merged", cfg, merge_from=dirs, **KW), dirs


def resumed(net, data, out, cfg):
    certify_model(net, data, out, cfg, **KW)
    # kill part-way: keep 4 rows of every row file plus a torn fifth line, and no summary
    for tsv in out.glob("certify*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        tsv.write_text("".join(lines[:5]) + lines[5][:7])
    for name in ("certify_fill.tsv", "certify_halving.tsv", "certify_lp.tsv", "summary.json"):
        (out / name).unlink(missing_ok=True)
    if cfg.policy == "samplewise":
        (out / "certify.tsv").unlink()  # the allocated file is rewritten from certify_raw.tsv
    return certify_model(net, data, out, cfg, **KW)


@pytest.mark.parametrize("policy", ["constant", "samplewise"])
def test_five_ways_to_split_the_work_give_the_same_rows(policy, tmp_path):
    net, data, cfg = model(), points(), config(policy=policy)
    one = certify_model(net, data, tmp_path / "one", cfg, **KW)
    regrouped = certify_model(net, data, tmp_path / "regrouped", config(policy=policy, points_per_group=5,
                                                                       batch_size=100), **KW)
    ranks = on_two_ranks(net, data, tmp_path / "ranks", cfg)
    shards, _ = in_shards(net, data, tmp_path / "shards", cfg)
    again = resumed(net, data, tmp_path / "resumed", cfg)
    reference = rows(tmp_path / "one", policy)
    assert reference["predict"].nunique() > 1 and reference["radius"].nunique() > 3  # rows worth comparing
    if policy == "samplewise":
        assert reference["sigma"].nunique() > 1
    for name in ("regrouped", "ranks", "shards/merged", "resumed"):
        assert rows(tmp_path / name, policy).equals(reference), name
    for summary in (regrouped, ranks, shards, again):
        assert summary["variants"] == one["variants"]
        assert summary["points"]["indices"] == one["points"]["indices"]
    assert sorted(p.name for p in (tmp_path / "ranks" / "parts").iterdir()) == ["rank0", "rank1"]


def test_parts_take_every_position_once():
    parts = [part_positions(11, 3, k) for k in range(3)]
    assert sorted(sum(parts, [])) == list(range(11))
    assert parts[1] == [1, 4, 7, 10]
    with pytest.raises(ValueError):
        part_positions(11, 3, 3)


def test_merge_refuses_a_missing_foreign_incomplete_or_tampered_shard(tmp_path):
    net, data, cfg = model(), points(7), config(policy="constant")
    _, dirs = in_shards(net, data, tmp_path, cfg, num_shards=3)

    def merge(folders, settings=cfg, weights=net):
        return certify_model(weights, data, tmp_path / "out", settings, merge_from=folders, **KW)

    with pytest.raises(MergeError, match=r"part\(s\) \[2\] of 3 missing"):
        merge(dirs[:2])
    with pytest.raises(MergeError, match="both part 1"):
        merge([dirs[0], dirs[1], dirs[1], dirs[2]])
    with pytest.raises(MergeError, match="no part.json"):
        merge([*dirs[:2], tmp_path / "nowhere"])
    other = config(policy="constant", seed=1)
    with pytest.raises(MergeError, match=r"shard0 was certified with seed=0, this run has seed=1"):
        merge(dirs, other)
    retrained = model()
    with torch.no_grad():
        retrained[1].bias.add_(0.01)
    with pytest.raises(MergeError, match="checkpoint_sha256"):
        merge(dirs, cfg, retrained)
    # an incomplete shard: a job killed before its last row
    record = read_record(dirs[2])
    (dirs[2] / "part.json").write_text(json.dumps({**record, "complete": False}))
    with pytest.raises(MergeError, match="shard2: part 2 of 3 is incomplete"):
        merge(dirs)
    (dirs[2] / "part.json").write_text(json.dumps(record))
    # a row lost after the shard was marked complete: a gap
    tsv = dirs[2] / "certify.tsv"
    tsv.write_text("".join(tsv.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(MergeError, match=r"miss dataset index\(es\) \[215\]"):
        merge(dirs)
    assert not (tmp_path / "out" / "summary.json").exists()
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_a_shard_resumed_with_other_settings_is_refused(tmp_path):
    net, data = model(), points(5)
    cfg = config(policy="constant", num_shards=2, shard=0)
    certify_part(net, data, tmp_path, cfg, part=0, num_parts=2, **KW)
    assert read_record(tmp_path)["indices"] == [200, 206, 212]
    finished = (tmp_path / "certify.tsv").read_text()
    # killed after its first row: the record says incomplete, the second row is torn
    record = read_record(tmp_path)
    (tmp_path / "part.json").write_text(json.dumps({**record, "complete": False}))
    (tmp_path / "certify.tsv").write_text("".join(finished.splitlines(keepends=True)[:2]) + "206\t1")
    certify_part(net, data, tmp_path, cfg, part=0, num_parts=2, **KW)
    assert read_record(tmp_path)["complete"]
    resumed = pd.read_csv(tmp_path / "certify.tsv", sep="\t")[COLUMNS]
    assert resumed.equals(pd.read_csv(io.StringIO(finished), sep="\t")[COLUMNS])
    changed = config(policy="constant", num_shards=2, shard=0, n=400)
    with pytest.raises(MergeError, match="n=300"):
        certify_part(net, data, tmp_path, changed, part=0, num_parts=2, **KW)


def test_inductive_parts_merge_into_the_rows_of_one_process(tmp_path):
    # A level selector is part of the fingerprint: parts must record it exactly as the merge computes it.
    torch.manual_seed(1)
    selector = nn.Sequential(nn.Flatten(), nn.Linear(16, len(GRID))).eval()
    net, data, cfg = model(), points(7), config(policy="inductive", best_constant=False)
    kw = {**KW, "selector": (selector, GRID, 0.5)}
    one = certify_model(net, data, tmp_path / "one", cfg, **kw)
    dirs = [tmp_path / f"shard{k}" for k in range(2)]
    for k, folder in enumerate(dirs):
        certify_part(net, data, folder, CertifyConfig(**{**cfg.__dict__, "num_shards": 2, "shard": k}), part=k,
                     num_parts=2, **kw)
    merged = certify_model(net, data, tmp_path / "merged", cfg, merge_from=dirs, **kw)
    columns = COLUMNS + ["level", "radius_selector", "radius_classifier"]
    reference = pd.read_csv(tmp_path / "one" / "certify.tsv", sep="\t")[columns]
    assert reference["level"].nunique() > 1 or reference["predict"].nunique() > 1  # rows worth comparing
    assert pd.read_csv(tmp_path / "merged" / "certify.tsv", sep="\t")[columns].equals(reference)
    assert merged["variants"]["inductive"] == one["variants"]["inductive"]


def test_merge_refuses_parts_certified_on_other_pixels(tmp_path):
    net, data, cfg = model(), points(6), config(policy="constant")
    mirrored = IndexedDataset(data.images.flip(3), data.labels, data.indices)  # same indices and labels
    _, dirs = in_shards(net, mirrored, tmp_path, cfg)
    with pytest.raises(MergeError, match="shard0 was certified with pixels_sha256="):
        certify_model(net, data, tmp_path / "out", cfg, merge_from=dirs, **KW)


@pytest.mark.parametrize("key, value", [("device", "cuda"), ("certification_scheme", 1)])
def test_merge_refuses_a_part_of_another_device_kind_or_certification_scheme(tmp_path, key, value):
    net, data, cfg = model(), points(6), config(policy="constant")
    _, dirs = in_shards(net, data, tmp_path, cfg)
    record = read_record(dirs[1])
    record["fingerprint"][key] = value  # as a part certified on a GPU, or by an earlier version, records it
    (dirs[1] / "part.json").write_text(json.dumps(record))
    with pytest.raises(MergeError, match=f"shard1 was certified with {key}={value!r}, this run has {key}="):
        certify_model(net, data, tmp_path / "out", cfg, merge_from=dirs, **KW)


def test_parts_certified_on_gpus_merge_on_a_cpu(tmp_path):
    net, data, cfg = model(), points(6), config(policy="constant")
    _, dirs = in_shards(net, data, tmp_path, cfg)
    for folder in dirs:  # as parts certified on GPUs record it
        record = read_record(folder)
        record["fingerprint"]["device"] = "cuda"
        (folder / "part.json").write_text(json.dumps(record))
    merged = certify_model(net, data, tmp_path / "out", cfg, merge_from=dirs, **KW)  # this process: a CPU
    assert merged["fingerprint"]["device"] == "cuda" and merged["points"]["count"] == 6
