"""Known answers for certified accuracy and ACR, and a fake sweep through tables, plot and the CLI."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from ssmooth.cli.report import main
from ssmooth.report import (
    UNKNOWN_DATASET,
    UNSOUND_MARK,
    average_certified_radius,
    certified_accuracy,
    certified_accuracy_curve,
    envelope,
    envelopes,
    format_table,
    group_by_dataset,
    load_sources,
    load_summaries,
    paired_difference,
    plot_certified_accuracy,
    plot_run,
    print_table,
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

    # One envelope per scope: the any-input one covers every sound certificate for any input (here also the
    # sample-wise job's constant certificate), the other the transductive one alone; never the upper bound.
    any_input = [v["certified_accuracy"] for s in summaries for n, v in s["variants"].items() if n == "constant"]
    expected = np.max(any_input, axis=0)
    best, names = envelope(summaries)
    np.testing.assert_allclose(best, expected)
    transductive = summaries[2]["variants"]["samplewise_fill"]["certified_accuracy"]
    np.testing.assert_allclose(envelope(summaries, scope="this test set")[0], transductive)
    assert list(envelopes(summaries)) == ["any input", "this test set"]
    assert "| r | any input % | reached by | this test set % | reached by |" in text
    table = _markdown_table(text, "r")
    assert [float(r[0]) for r in table] == radii
    assert [r[1] for r in table] == [f"{100 * e:.1f}" for e in expected]
    assert [r[3] for r in table] == [f"{100 * e:.1f}" for e in transductive]
    assert all(r[4] in ("", "samplewise/2 samplewise_fill") for r in table)
    assert not any("samplewise_fill" in r[2] for r in table)  # a transductive curve never carries the other


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
            exact.append((variant_name, radius, correct))
    assert len(exact) == 4
    for x, y in drawn["curves"].values():
        assert np.all(np.diff(x) > 0) and np.all(np.diff(y) <= 0)
    # one envelope per scope, each the max of its own certificates only
    assert list(drawn["envelopes"]) == ["any input", "this test set"]
    for scope, kinds in [("any input", {"constant"}), ("this test set", {"samplewise_fill"})]:
        x, y = drawn["envelopes"][scope]
        probe = np.concatenate([x, np.linspace(0, x[-1], 97)])
        env = np.array([y[np.searchsorted(x, r, side="left")] for r in probe])  # y[i] holds on (x[i-1], x[i]]
        best = np.max([certified_accuracy(r, c, probe) for name, r, c in exact if name in kinds], axis=0)
        np.testing.assert_allclose(env, best)
    assert drawn["envelope"] is drawn["envelopes"]["any input"]


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
    best_mnist = np.max([v["certified_accuracy"] for s in groups["mnist"] for n, v in s["variants"].items()
                         if n == "constant"], axis=0)
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


# ------------------------------------------------------------------------------------------- what a new user hit


def _run(folder: Path, name: str, rows: pd.DataFrame, radii, **summary) -> Path:
    folder.mkdir(parents=True)
    rows.to_csv(folder / "certify.tsv", sep="\t", index=False)
    variants = {"constant": _variant(rows, radii, sound=True, kind="constant", setting="any input")}
    (folder / "summary.json").write_text(json.dumps({**_summary(name, 0.5, "constant", "constant", variants,
                                                                radii), **summary}))
    return folder


def test_two_sources_with_one_name_keep_both_curves(tmp_path):
    # a fixed-n and an adaptive run of one model: the same name in both summaries, each folder given itself
    rng = np.random.default_rng(9)
    radii = standard_radii("mnist")
    fixed = _run(tmp_path / "fixed", "lenet", _fake_rows(rng, 40, 0.5, 0.9), radii, sampling="fixed")
    adaptive = _run(tmp_path / "adaptive", "lenet", _fake_rows(rng, 40, 0.5, 0.8), radii, sampling="adaptive")
    summaries = load_sources([fixed, adaptive])
    assert sorted(s["name"] for s in summaries) == ["lenet [adaptive]", "lenet [fixed]"]
    drawn = plot_certified_accuracy(summaries, tmp_path / "plot.png")
    assert len(drawn["curves"]) == 2
    assert sum("adaptive sampling" in label for label in drawn["curves"]) == 1
    # summaries handed over directly, with one name and one sampling: still two curves, told apart by folder
    same = [json.loads((run / "summary.json").read_text()) | {"path": str(run), "sampling": "fixed"}
            for run in (fixed, adaptive)]
    labels = list(plot_certified_accuracy(same, tmp_path / "same.png")["curves"])
    assert len(labels) == 2 and "[fixed]" in labels[0] and "[adaptive]" in labels[1]


def test_plot_run_draws_exact_steps_not_lines_between_grid_points(tmp_path):
    # Two of five points certified at 1.6 and 1.7: 40 % at r = 1.5, and 0 from r = 1.75 on. Joining the grid
    # points 1.5 (40 %) and 2 (0 %) with a line would show 20 % at 1.75.
    radii = standard_radii("cifar10")
    rows = pd.DataFrame({"idx": range(5), "label": [1, 2, 3, 4, 5], "predict": [1, 2, 3, 4, -1],
                         "radius": [1.6, 1.7, 0.3, 0.4, 0.0], "correct": [1, 1, 1, 1, 0]})
    run = _run(tmp_path / "run", "r", rows, radii, dataset="cifar10")
    summary = json.loads((run / "summary.json").read_text())  # as the certify command holds it: no "path"
    drawn = plot_run(summary, run, title="r")
    assert Path(drawn["path"]) == run / "certified_accuracy.png" and Path(drawn["pdf"]).is_file()
    (x, y), = drawn["curves"].values()
    step = lambda r: y[np.searchsorted(x, r, side="left")] if r <= x[-1] else 0.0  # noqa: E731
    assert step(1.5) == pytest.approx(0.4) and step(1.75) == 0.0 and step(1.65) == pytest.approx(0.2)
    assert drawn["envelopes"] == {}


def test_cli_one_log_without_out_writes_beside_it(tmp_path, capsys):
    rng = np.random.default_rng(10)
    log = _log(_cifar_log(rng, 30, 0, 20, 0.5, 0.7), tmp_path / "cohen" / "noise_0.25.tsv")
    assert main([str(log), "--dataset", "cifar10"]) == 0
    out = tmp_path / "cohen" / "noise_0.25_report"
    assert (out / "report.md").is_file() and (out / "report.tex").is_file()
    assert f"report written into {out}" in capsys.readouterr().out


def _with_best_level(sweep: Path, **extra) -> Path:
    """The sample-wise job of the sweep with the best single level of its grid, as the certify step records it."""
    run = sweep / "samplewise" / "2"
    summary = json.loads((run / "summary.json").read_text())
    summary["variants"]["constant_best"] = {**summary["variants"]["constant"], "kind": "constant_best",
                                            "sound": True, "setting": "any input", "sigma": 0.25, **extra}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_best_single_level_says_it_was_chosen_on_the_evaluated_points(sweep):
    _with_best_level(sweep)
    summaries = load_summaries(sweep)
    markdown = format_table(summaries)
    best = next(line for line in markdown.splitlines() if "| constant_best" in line)
    assert "level chosen on the evaluated points" in best
    caption = re.search(r"\\caption\{(.*)\}", format_table(summaries, fmt="latex")).group(1)
    assert "level chosen on the evaluated points" in caption
    console = Console(file=io.StringIO(), width=120)
    print_table(summaries, console=console)
    assert "level chosen on the evaluated points" in console.file.getvalue()
    # a note recorded by the certificate itself is shown as it is
    _with_best_level(sweep, note="level chosen on the evaluated points (ACR, labels used)")
    assert "level chosen on the evaluated points (ACR, labels used)" in format_table(load_summaries(sweep))


def test_paired_difference_known_answer():
    rows = pd.DataFrame({"idx": [0, 1, 2, 3], "radius": [1.0, 0.5, 0.8, 0.3], "correct": [1, 1, 0, 1],
                         "predict": [1, 1, 2, -1]})
    baseline = pd.DataFrame({"idx": [3, 2, 1, 0, 9], "radius": [0.2, 0.4, 0.5, 0.5, 1.0], "correct": 1})
    # per point (idx 0..3): mine 1.0, 0.5, 0 (wrong), 0 (abstain); baseline 0.5, 0.5, 0.4, 0.2; idx 9 not shared
    d = paired_difference(rows, baseline)
    differences = np.array([0.5, 0.0, -0.4, -0.2])
    assert d["num_points"] == 4 and d["better"] == 1 and d["worse"] == 2
    assert d["mean"] == pytest.approx(differences.mean())
    assert d["se"] == pytest.approx(differences.std(ddof=1) / 2)
    with pytest.raises(ValueError, match="share no"):
        paired_difference(rows, baseline[baseline["idx"] == 9])


def _stage(root: Path, name: str, variants: dict[str, pd.DataFrame], main: str, radii, **fields) -> None:
    run = root / name
    run.mkdir(parents=True)
    entries = {}
    for variant, rows in variants.items():
        rows.to_csv(run / f"certify_{variant}.tsv", sep="\t", index=False)
        kind = {"samplewise_fill": "samplewise_fill"}.get(variant, variant)
        entries[variant] = _variant(rows, radii, sound=True, kind=kind, sigma=0.5, rows_file=f"certify_{variant}.tsv",
                                    setting="this test set" if variant == "samplewise_fill" else "any input",
                                    forward_passes=4_004_000)
    (run / "summary.json").write_text(json.dumps({**_summary(f"demo/{name}", 0.5, "x", main, entries, radii),
                                                  "dataset": "cifar10", **fields}))


def test_terminal_table_is_short_marked_and_without_repeats(tmp_path):
    """A pipeline's stages: the selector stage certifies the constant level again (one row, not two); the
    terminal table stays within 120 columns on a wide terminal, marks the headline, names adaptive runs and
    explains the kinds in one line; report.md pairs every certificate with the best single level."""
    rng = np.random.default_rng(11)
    radii = standard_radii("cifar10")
    constant, best = _fake_rows(rng, 40, 0.5, 0.9), _fake_rows(rng, 40, 0.25, 0.9)
    _stage(tmp_path, "finetune_samplewise", {"samplewise_fill": _fake_rows(rng, 40, 0.5, 0.9),
                                             "constant": constant, "constant_best": best}, "samplewise_fill", radii)
    _stage(tmp_path, "selector", {"inductive": _fake_rows(rng, 40, 0.5, 0.9), "constant": constant}, "inductive",
           radii)
    _stage(tmp_path, "adaptive_run", {"constant": _fake_rows(rng, 40, 0.5, 0.9)}, "constant", radii,
           sampling="adaptive")
    summaries = load_sources([tmp_path])
    console = Console(file=io.StringIO(), width=200)
    print_table(summaries, console=console)
    lines = console.file.getvalue().splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 120
    rows = [line for line in lines if line.startswith(" demo/")]
    assert len(rows) == 5  # fill, constant, best level, inductive, adaptive: the selector's constant is not repeated
    assert sum("demo/selector" in row for row in rows) == 1
    header = next(line for line in lines if "holds for" in line).split()
    assert header[:4] == ["job", "certificate", "holds", "for"] and header[-4:] == ["ACR", "abstain", "%", "passes"]
    assert [h for h in header if re.fullmatch(r"\d+(\.\d+)?", h)] == ["0", "0.5", "1", "1.5", "2"]
    assert "transductive fill *" in next(row for row in rows if "finetune_samplewise" in row and "transductive" in row)
    assert "constant σ=0.5 adaptive" in next(row for row in rows if "adaptive_run" in row)
    assert all(row.rstrip().endswith("4.0M") for row in rows)
    assert "any input†" in next(row for row in rows if "best level" in row)
    legend = next(line for line in lines if line.startswith("constant: one σ"))
    assert "transductive" in legend and "inductive" in legend and "best level" in legend
    assert any("also certified, identically, by demo/selector" in line for line in lines)

    text = Path(write_report(tmp_path, tmp_path / "out")["markdown"]).read_text()
    paired = _markdown_table(text, "job | certificate | against")
    assert {r[0] for r in paired} == {"demo/adaptive_run", "demo/finetune_samplewise", "demo/selector"}
    fill = next(r for r in paired if r[1].startswith("samplewise_fill"))
    expected = paired_difference(read_rows(tmp_path / "finetune_samplewise" / "certify_samplewise_fill.tsv"),
                                 best)
    assert fill[3] == f"{expected['mean']:+.4f}" and fill[6] == "40"
