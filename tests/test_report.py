"""Known answers for certified accuracy and ACR, and a fake sweep through tables, plot and the CLI."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ssmooth.cli.report import main
from ssmooth.report import (
    UNKNOWN_DATASET,
    UNSOUND_MARK,
    average_certified_radius,
    certified_accuracy,
    certified_accuracy_curve,
    envelope,
    format_table,
    group_by_dataset,
    load_sources,
    load_summaries,
    plot_certified_accuracy,
    radius_grid,
    read_log,
    read_rows,
    standard_radii,
    subset_note,
    summarize_rows,
    title_of,
    write_report,
)

RADII = [0.0, 0.25, 0.5, 0.75, 1.0]
@pytest.fixture
def published(published_logs) -> Path:
    """Three published per-image logs and the table computed from them (skipped, saying how to give them, when
    they are missing)."""
    return published_logs


# ------------------------------------------------------------------------------------------- known answers


def test_certified_accuracy_known_answer():
    # point:          certified  boundary  abstain  wrong  certified
    radius = np.array([0.5, 0.25, 0.0, 1.0, 0.8])
    correct = np.array([1, 1, 0, 0, 1])
    acc = certified_accuracy(radius, correct, RADII)
    # r = 0.25 counts the point whose radius is exactly 0.25; the wrong point's radius 1.0 never counts.
    np.testing.assert_allclose(acc, [3 / 5, 3 / 5, 2 / 5, 1 / 5, 0.0])
    assert average_certified_radius(radius, correct) == pytest.approx((0.5 + 0.25 + 0.8) / 5)


def test_summarize_rows_counts_abstain_as_wrong():
    rows = pd.DataFrame({
        "idx": [0, 20, 40, 60],
        "label": [3, 1, 4, 1],
        "predict": [3, -1, 4, 7],
        "radius": [0.6, 0.0, 0.25, 0.9],
        "correct": [1, 1, 1, 0],  # the abstain wrongly flagged correct must still count as wrong
    })
    summary = summarize_rows(rows, RADII)
    assert summary["num_points"] == 4
    assert summary["abstain_rate"] == pytest.approx(0.25)
    np.testing.assert_allclose(summary["certified_accuracy"], [0.5, 0.5, 0.25, 0.0, 0.0])
    assert summary["acr"] == pytest.approx((0.6 + 0.25) / 4)
    assert isinstance(summary["certified_accuracy"], list)
    as_tuple = summarize_rows((rows["radius"], rows["correct"], rows["predict"]), RADII)
    assert as_tuple == summary


def test_empty_rows_give_zeros():
    assert certified_accuracy([], [], RADII).tolist() == [0.0] * len(RADII)
    assert average_certified_radius([], []) == 0.0


def test_certified_accuracy_curve_is_exact_between_breakpoints():
    rng = np.random.default_rng(0)
    radius = np.round(rng.uniform(0, 2, 200), 3)
    correct = rng.random(200) < 0.7
    x, y = certified_accuracy_curve(radius, correct)
    assert x[0] == 0 and np.all(np.diff(x) > 0) and np.all(np.diff(y) <= 0)
    np.testing.assert_allclose(y, certified_accuracy(radius, correct, x))
    # Constant on (x[i-1], x[i]]: equal to y[i] just above x[i-1]; 0 beyond the last breakpoint.
    above = np.nextafter(x[:-1], np.inf)
    np.testing.assert_allclose(certified_accuracy(radius, correct, above), y[1:])
    assert certified_accuracy(radius, correct, [x[-1] + 1e-9])[0] == 0


def test_standard_radii():
    assert standard_radii("cifar10") == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25]
    assert standard_radii("CIFAR-10") == standard_radii("cifar10")
    assert standard_radii("mnist") == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    assert standard_radii("digits") == [i * 0.25 for i in range(9)]


def test_report_imports_no_torch_nor_plotting():
    code = (
        "import sys, ssmooth.report, ssmooth.cli.report; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'hydra', 'matplotlib'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------- a fake sweep


def _brute_force(radius, correct, radii):
    return [float(np.mean(correct & (radius >= r))) for r in radii]


def _fake_rows(rng, n, sigma, accuracy):
    label = rng.integers(0, 10, n)
    abstain = rng.random(n) < 0.1
    right = rng.random(n) < accuracy
    predict = np.where(abstain, -1, np.where(right, label, (label + 1) % 10))
    radius = np.where(abstain, 0.0, np.round(sigma * rng.uniform(0, 3.8, n), 4))
    return pd.DataFrame({
        "idx": np.arange(n) * 20, "label": label, "predict": predict, "radius": radius,
        "correct": (predict == label).astype(int), "sigma": sigma, "time": 0.01,
    })


def _variant(rows, radii, column="radius", **extra):
    radius, correct = rows[column].to_numpy(), rows["correct"].to_numpy().astype(bool)
    return {
        "certified_accuracy": _brute_force(radius, correct, radii),
        "acr": float(np.mean(radius * correct)),
        "abstain_rate": float(np.mean(rows["predict"] == -1)),
        "num_points": len(rows),
        **extra,
    }


def _summary(name, sigma, policy, main, variants, radii):
    summary = {
        "dataset": "mnist", "model": "lenet", "objective": "gaussian", "sigma_policy": policy, "sigma": sigma,
        "n0": 100, "n": 100000, "alpha": 0.001,
        "points": {"split": "test", "skip": 20, "max": -1, "count": 40, "indices": list(range(0, 800, 20))},
        "radii": radii, "main": main, "variants": variants, "wall_time_s": 123.4,
    }
    if name is not None:
        summary["name"] = name
    return summary


@pytest.fixture
def sweep(tmp_path):
    """Two constant-sigma jobs and one sample-wise job without a name (its folder names it)."""
    rng = np.random.default_rng(1)
    radii = standard_radii("mnist")
    root = tmp_path / "sweep"
    for folder, sigma, accuracy in [("0", 0.25, 0.95), ("1", 0.5, 0.85)]:
        run = root / folder
        run.mkdir(parents=True)
        rows = _fake_rows(rng, 40, sigma, accuracy)
        rows.to_csv(run / "certify.tsv", sep="\t", index=False)
        variants = {"constant": _variant(rows, radii, sound=True)}
        summary = _summary(f"mnist_gaussian_s{sigma}", sigma, "constant", "constant", variants, radii)
        (run / "summary.json").write_text(json.dumps(summary))

    run = root / "samplewise" / "2"
    run.mkdir(parents=True)
    constant = _fake_rows(rng, 40, 0.5, 0.9)
    constant.to_csv(run / "certify_constant.tsv", sep="\t", index=False)
    rows = _fake_rows(rng, 40, 0.5, 0.9)
    rows["radius_raw"] = rows["radius"]
    rows["radius"] = np.round(rows["radius_raw"] * rng.uniform(0.5, 1.0, 40), 4)  # allocation only lowers
    rows.to_csv(run / "certify.tsv", sep="\t", index=False)
    variants = {
        "constant": _variant(constant, radii, sound=True),
        "samplewise_raw": _variant(rows, radii, column="radius_raw", sound=False),
        "samplewise_fill": _variant(rows, radii, sound=True, allocation="fill", num_conflicting_pairs=12,
                                    mean_r_over_R=0.97),
    }
    (run / "summary.json").write_text(json.dumps(_summary(None, 0.5, "samplewise", "samplewise_fill", variants,
                                                          radii)))
    return root


def _markdown_table(text: str, first_cell: str) -> list[list[str]]:
    """The body rows of the markdown table whose header starts with ``first_cell``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return body


def test_load_summaries_names_and_sorts(sweep):
    summaries = load_summaries(sweep)
    assert [s["name"] for s in summaries] == ["mnist_gaussian_s0.25", "mnist_gaussian_s0.5", "samplewise/2"]
    assert Path(summaries[2]["path"]) == sweep / "samplewise" / "2"
    single = load_summaries(sweep / "samplewise" / "2")
    assert [s["name"] for s in single] == ["2"]
    with pytest.raises(FileNotFoundError):
        load_summaries(sweep / "missing")


def test_load_summaries_skips_broken_json(sweep):
    (sweep / "broken").mkdir()
    (sweep / "broken" / "summary.json").write_text("{not json")
    with pytest.warns(UserWarning, match="broken"):
        assert len(load_summaries(sweep)) == 3


def test_read_rows_one_row_per_index(sweep):
    path = sweep / "0" / "certify.tsv"
    frame = pd.read_csv(path, sep="\t")
    pd.concat([frame, frame.iloc[:5]]).to_csv(path, sep="\t", index=False)  # padding duplicates
    rows = read_rows(path)
    assert len(rows) == 40 and rows["idx"].is_unique


def test_write_report_rows_envelope_and_plot(sweep, tmp_path):
    paths = write_report(sweep, tmp_path / "out")
    assert {"markdown", "latex", "plot", "plots", "pdfs"} <= set(paths)
    assert Path(paths["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(paths["pdfs"][0]).read_bytes()[:5] == b"%PDF-"
    text = Path(paths["markdown"]).read_text()
    assert "](certified_accuracy.png)" in text and "](certified_accuracy.pdf)" in text

    summaries = load_summaries(sweep)
    radii = standard_radii("mnist")
    rows = _markdown_table(text, "job")
    assert [(r[0], r[1].split(" (")[0]) for r in rows] == [
        ("mnist_gaussian_s0.25", "constant"),
        ("mnist_gaussian_s0.5", "constant"),
        ("samplewise/2", "samplewise_fill"),  # the headline variant first
        ("samplewise/2", "constant"),
        ("samplewise/2", "samplewise_raw"),
    ]
    assert rows[0][5] == f"{100 * summaries[0]['variants']['constant']['certified_accuracy'][0]:.1f}"
    # method, sigma and certificate kind of each variant
    assert rows[0][2:5] == ["Gaussian", "0.25", "constant"]
    assert rows[2][4] == "transductive (fill)" and rows[3][4] == "constant"
    assert rows[4][4] == "per-point levels, unallocated"

    # The envelope covers EVERY sound variant (here also the sample-wise job's constant certificate), never
    # the unsound upper bound.
    sound = [v["certified_accuracy"] for s in summaries for v in s["variants"].values() if v["sound"]]
    expected = np.max(sound, axis=0)
    best, names = envelope(summaries)
    np.testing.assert_allclose(best, expected)
    table = _markdown_table(text, "r")
    assert [float(r[0]) for r in table] == radii
    assert [r[1] for r in table] == [f"{100 * e:.1f}" for e in expected]


def test_title_comes_from_the_experiment_not_the_folder(sweep):
    summaries = load_summaries(sweep)
    title = title_of(summaries)
    assert "MNIST" in title and "Gaussian" in title and "0.25" in title and "0.5" in title
    assert sweep.name not in title
    for s in summaries:
        s["name"] = f"demo/{s['name']}"
    assert title_of(summaries).startswith("demo: ")


def test_plot_curves_are_exact_and_envelope_is_their_max(sweep, tmp_path):
    summaries = load_summaries(sweep)
    drawn = plot_certified_accuracy(summaries, tmp_path / "plot.png", title="sweep")
    assert (tmp_path / "plot.png").is_file() and (tmp_path / "plot.pdf").is_file()
    # one curve per sound variant: two constant jobs, and the sample-wise job's fill and constant certificates
    assert len(drawn["curves"]) == 4 and not any("samplewise_raw" in label for label in drawn["curves"])
    assert any(label.startswith("samplewise/2: Gaussian, σ=0.5, constant") for label in drawn["curves"])
    exact = []
    for summary in summaries:  # every sound variant has rows: its curve is exact and equals the summary
        for variant_name, rows_file in [("constant", "certify.tsv"), ("constant", "certify_constant.tsv"),
                                        ("samplewise_fill", "certify.tsv")]:
            path = Path(summary["path"]) / rows_file
            if variant_name not in summary["variants"] or not path.is_file():
                continue
            if rows_file == "certify.tsv" and summary["main"] != variant_name:
                continue
            rows = read_rows(path)
            radius, correct = rows["radius"].to_numpy(), rows["correct"].to_numpy().astype(bool)
            np.testing.assert_allclose(certified_accuracy(radius, correct, summary["radii"]),
                                       summary["variants"][variant_name]["certified_accuracy"])
            exact.append((radius, correct))
    assert len(exact) == 4
    for x, y in drawn["curves"].values():
        assert np.all(np.diff(x) > 0) and np.all(np.diff(y) <= 0)
    x, y = drawn["envelope"]
    probe = np.concatenate([x, np.linspace(0, x[-1], 97)])
    env = np.array([y[np.searchsorted(x, r, side="left")] for r in probe])  # y[i] holds on (x[i-1], x[i]]
    np.testing.assert_allclose(env, np.max([certified_accuracy(r, c, probe) for r, c in exact], axis=0))


def test_plot_from_summaries_without_rows(sweep, tmp_path):
    for tsv in sweep.rglob("*.tsv"):
        tsv.unlink()
    summaries = load_summaries(sweep)
    drawn = plot_certified_accuracy(summaries, tmp_path / "grid.png")
    x, y = drawn["envelope"]
    np.testing.assert_allclose(x, summaries[0]["radii"])
    np.testing.assert_allclose(y, envelope(summaries)[0])


def test_latex_is_a_booktabs_table_with_caption_and_label(sweep):
    summaries = load_summaries(sweep)
    latex = format_table(summaries, fmt="latex", include_unsound=False)
    assert r"\begin{table}" in latex and r"\caption{" in latex and r"\label{tab:certified-accuracy-mnist}" in latex
    assert r"\toprule" in latex and r"\midrule" in latex and r"\bottomrule" in latex
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", latex).group(1)
    body = [line for line in latex.splitlines() if line.endswith(r"\\")]
    assert len(body) == 1 + 4  # header and the four sound variants: the upper bound is left out
    assert all(line.count(" & ") == len(spec) - 1 for line in body)
    assert r"mnist\_gaussian\_s0.25" in latex and "samplewise\\_raw" not in latex
    everything = format_table(summaries, fmt="latex", include_unsound=True)
    assert r"samplewise\_raw (unsound upper bound)" in everything


def test_unsound_variants_are_marked(sweep):
    summaries = load_summaries(sweep)
    for line in format_table(summaries).splitlines()[2:]:
        assert (UNSOUND_MARK in line) == ("samplewise_raw" in line)
    fill = next(line for line in format_table(summaries).splitlines() if "samplewise_fill" in line)
    assert "allocation fill, 12 conflicting pairs, mean r/R 0.970" in fill


def test_other_radii_leave_cells_blank():
    first = _summary("a", 0.25, "constant", "constant",
                     {"constant": {"certified_accuracy": [0.9, 0.8, 0.7], "acr": 0.5, "abstain_rate": 0.1,
                                   "num_points": 10, "sound": True}}, [0.0, 0.25, 0.5])
    other = _summary("b", 0.5, "constant", "constant",
                     {"constant": {"certified_accuracy": [0.6, 0.5], "acr": 0.7, "abstain_rate": 0.2,
                                   "num_points": 10, "sound": True}}, [0.0, 0.5])
    rows = _markdown_table(format_table([first, other], radii=[0, 0.25, 0.5]), "job")
    assert rows[0][5:8] == ["90.0", "80.0", "70.0"]
    assert rows[1][5:8] == ["60.0", "", "50.0"]  # 0.25 is not on b's grid
    rows = _markdown_table(format_table([first, other], radii=[0.5, 1.0]), "job")
    assert rows[1][5:7] == ["50.0", ""]
    best, names = envelope([first, other], radii=[0, 0.25, 0.5])
    np.testing.assert_allclose(best, [0.9, 0.8, 0.7])
    assert names == ["a constant"] * 3


def test_forward_passes_column_only_when_recorded(sweep):
    summaries = load_summaries(sweep)
    assert "forward passes" not in format_table(summaries)
    summaries[0]["variants"]["constant"]["forward_passes"] = 4_004_000
    rows = _markdown_table(format_table(summaries), "job")
    header = format_table(summaries).splitlines()[0]
    assert "forward passes" in header
    assert rows[0][-2] == "4,004,000" and rows[1][-2] == ""


# ------------------------------------------------------------------------------------------- published logs


def _log(rows: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows[["idx", "label", "predict", "radius", "correct", "time"]].to_csv(path, sep="\t", index=False)
    return path


def _provenance_table(text: str) -> dict[str, tuple[list[float], float]]:
    """file name -> (certified accuracy in % at the standard CIFAR-10 radii, ACR), from PROVENANCE.md."""
    table = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0].endswith(".tsv"):
            table[cells[0]] = ([float(c) for c in cells[1:-1]], float(cells[-1]))
    return table


def test_cohen_logs_match_their_published_table(published):
    provenance = _provenance_table((published / "PROVENANCE.md").read_text())
    assert len(provenance) == 3
    summaries = load_sources([published / "logs"], dataset="cifar10")
    assert [s["name"] for s in summaries] == [Path(f).stem for f in sorted(provenance)]
    radii = standard_radii("cifar10")
    for summary in summaries:
        accuracy, acr = provenance[f"{summary['name']}.tsv"]
        variant = summary["variants"]["published"]
        assert [round(100 * a, 1) for a in variant["certified_accuracy"]] == accuracy
        assert round(variant["acr"], 4) == acr
        assert variant["num_points"] == 500 and summary["points"]["indices"][:3] == [0, 20, 40]
    # the markdown table shows the same numbers, ACR to the 4 digits of the published table
    rows = _markdown_table(format_table(summaries, radii), "job")
    for row in rows:
        accuracy, acr = provenance[f"{row[0]}.tsv"]
        numbers = [c for c in row if re.fullmatch(r"\d+\.\d", c)]
        assert [float(c) for c in numbers[:len(radii)]] == accuracy
        assert f"{acr:.4f}" in row


def test_read_log_rejects_what_breaks_the_format(tmp_path):
    rng = np.random.default_rng(3)
    rows = _fake_rows(rng, 10, 0.25, 0.8)
    path = _log(rows.drop(columns=["correct"]).assign(correct=1), tmp_path / "flipped.tsv")
    with pytest.raises(ValueError, match="flipped.tsv: idx .* has correct = 1"):
        read_log(path)
    (tmp_path / "nohead.tsv").write_text("0\t3\t3\t0.5\t1\t1.0\n")
    with pytest.raises(ValueError, match="missing column"):
        read_log(tmp_path / "nohead.tsv")
    bad = rows.astype({"radius": object})
    bad.loc[2, "radius"] = "abc"
    with pytest.raises(ValueError, match="radius = 'abc'"):
        read_log(_log(bad, tmp_path / "text.tsv"))


def _cifar_log(rng, n, start, step, sigma, accuracy):
    rows = _fake_rows(rng, n, sigma, accuracy)
    rows["idx"] = start + step * np.arange(n)
    return rows


def test_datasets_are_never_mixed_and_unknown_logs_stand_alone(sweep, tmp_path):
    rng = np.random.default_rng(5)
    logs = tmp_path / "logs"
    _log(_cifar_log(rng, 30, 0, 20, 0.5, 0.7), logs / "a.tsv")
    _log(_cifar_log(rng, 30, 0, 20, 1.0, 0.5), logs / "b.tsv")
    bare = _log(_cifar_log(rng, 30, 0, 20, 1.0, 0.5), tmp_path / "bare" / "c.tsv")
    summaries = load_sources([sweep, bare], labels={logs: "cohen"}, datasets={logs: "cifar10"}) + \
        load_sources([logs], labels={logs: "cohen"}, datasets={logs: "CIFAR-10"})
    groups = group_by_dataset(summaries)
    assert list(groups) == ["cifar10", "mnist", UNKNOWN_DATASET]
    assert [s["name"] for s in groups["cifar10"]] == ["cohen/a", "cohen/b"]
    assert [s["name"] for s in groups[UNKNOWN_DATASET]] == ["c"]
    with pytest.raises(ValueError, match="one dataset"):
        envelope(summaries)

    paths = write_report([sweep, logs, bare], tmp_path / "out", labels={logs: "cohen"},
                         datasets={logs: "cifar10"})
    text = Path(paths["markdown"]).read_text()
    assert [Path(p).name for p in paths["plots"]] == ["certified_accuracy_cifar10.png",
                                                      "certified_accuracy_mnist.png",
                                                      "certified_accuracy_unknown_dataset.png"]
    assert all(Path(p).is_file() for p in paths["plots"] + paths["pdfs"])
    sections = text.split("\n## ")
    cifar = next(s for s in sections if s.startswith("CIFAR-10"))
    mnist = next(s for s in sections if s.startswith("MNIST"))
    unknown = next(s for s in sections if s.startswith(UNKNOWN_DATASET))
    assert "cohen/a" in cifar and "mnist_gaussian" not in cifar and "| c |" not in cifar
    assert "cohen/" not in mnist
    assert "| c |" in unknown and "record no dataset" in unknown and "| r |" not in unknown  # no envelope
    # each envelope is the max over its own dataset only
    best_mnist = np.max([v["certified_accuracy"] for s in groups["mnist"] for v in s["variants"].values()
                         if v["sound"]], axis=0)
    np.testing.assert_allclose(envelope(groups["mnist"], standard_radii("mnist"))[0], best_mnist)
    tex = Path(paths["latex"]).read_text()
    assert tex.count(r"\begin{table}") == 3 and tex.count(r"\label{") == 3


def test_radius_grid_is_the_union_whatever_the_order(sweep, tmp_path):
    rng = np.random.default_rng(6)
    log = _log(_cifar_log(rng, 30, 0, 20, 0.5, 0.7), tmp_path / "logs" / "a.tsv")
    union = radius_grid(["mnist", "cifar10"])
    assert union == sorted(set(standard_radii("mnist")) | set(standard_radii("cifar10")))
    assert radius_grid(["cifar10", "mnist"]) == union
    assert standard_radii("imagenet") == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    tables = [format_table(load_sources(order, dataset="cifar10")) for order in ([sweep, log], [log, sweep])]
    assert tables[0] == tables[1]
    header = next(line for line in tables[0].splitlines() if line.startswith("| job |"))
    assert [float(h[2:]) for h in header.split(" | ") if h.startswith("r=")] == union
    assert "**CIFAR-10**" in tables[0] and "**MNIST**" in tables[0]


def test_subset_note_names_the_index_sets(tmp_path):
    rng = np.random.default_rng(7)
    every20 = _log(_cifar_log(rng, 30, 0, 20, 0.5, 0.7), tmp_path / "every20.tsv")
    block = _log(_cifar_log(rng, 25, 500, 1, 0.5, 0.7), tmp_path / "block.tsv")
    same = _log(_cifar_log(rng, 30, 0, 20, 1.0, 0.7), tmp_path / "same.tsv")
    assert subset_note(load_sources([every20, same], dataset="cifar10")) is None
    note = subset_note(load_sources([every20, block, same], dataset="cifar10"))
    assert "not certified on the same test points" in note.lower()
    assert "every20, same (30 points: idx 0, 20, ..., 580)" in note
    assert "block (25 points: idx 500, 501, ..., 524)" in note
    assert "Points common to all: 2." in note  # idx 500 and 520
    paths = write_report([every20, block], tmp_path / "out", dataset="cifar10")
    assert "**Note.** Not certified on the same test points" in Path(paths["markdown"]).read_text()


def test_symlinks_are_followed_and_counted_once(sweep, tmp_path):
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "runs").symlink_to(sweep, target_is_directory=True)
    (linked / "loop").symlink_to(linked, target_is_directory=True)  # a cycle must not hang the walk
    found = load_summaries(linked)
    assert sorted(Path(s["path"]).resolve() for s in found) == sorted(Path(s["path"]).resolve()
                                                                      for s in load_summaries(sweep))
    assert "runs/samplewise/2" in [s["name"] for s in found]
    assert len(load_sources([linked, sweep])) == 3


def test_unfinished_run_rows_are_not_taken_for_a_log(sweep, tmp_path):
    (sweep / "0" / "summary.json").unlink()
    with pytest.warns(UserWarning, match="without summary.json"):
        summaries = load_sources([sweep])
    assert [s["name"] for s in summaries] == ["mnist_gaussian_s0.5", "samplewise/2"]


# ------------------------------------------------------------------------------------------- CLI


def test_cli_missing_dir_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "no_such_sweep"
    assert main([str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_no_runs_exits_2_naming_it(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "summary.json" in err and "Traceback" not in err


def test_cli_writes_report(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out), "--radii", "1", "0", "0.5"]) == 0
    assert {p.name for p in out.iterdir()} == {"report.md", "report.tex", "certified_accuracy.png",
                                               "certified_accuracy.pdf"}
    header = (out / "report.md").read_text().split("| job |", 1)[1].splitlines()[0]
    assert "r=0 | r=0.5 | r=1 |" in header
    printed = capsys.readouterr().out
    assert "certified accuracy" in printed and str(out / "report.md") in printed


def test_cli_labels_datasets_and_bad_input(sweep, tmp_path, capsys):
    rng = np.random.default_rng(8)
    log = _log(_cifar_log(rng, 30, 0, 20, 0.5, 0.7), tmp_path / "logs" / "noise_0.50.tsv")
    out = tmp_path / "report"
    assert main([str(sweep), "--label", f"Cohen 0.5@cifar10={log}", "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## CIFAR-10" in text and "| Cohen 0.5 |" in text and "noise_0.50" not in text.split("## Sources")[0]
    assert (out / "certified_accuracy_cifar10.pdf").is_file() and (out / "certified_accuracy_mnist.png").is_file()
    capsys.readouterr()

    broken = tmp_path / "broken.tsv"
    broken.write_text("idx\tlabel\tpredict\tradius\tcorrect\ttime\n0\t3\t3\toops\t1\t1.0\n")
    cases = [
        (["--label", f"noname{log}", "--out", str(out)], "expected NAME=PATH"),
        ([str(broken), "--out", str(out)], f"{broken}: radius = 'oops'"),
        ([str(sweep), str(log)], "--out is needed"),
        (["--label", f"x@cifar10={sweep / '0'}", "--out", str(out)], "recorded dataset 'mnist'"),
        ([str(sweep), "--radii", "-1"], "--radii must be >= 0"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
