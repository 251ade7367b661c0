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
    UNSOUND_MARK,
    average_certified_radius,
    certified_accuracy,
    certified_accuracy_curve,
    envelope,
    format_table,
    load_summaries,
    plot_certified_accuracy,
    read_rows,
    standard_radii,
    summarize_rows,
    write_report,
)

RADII = [0.0, 0.25, 0.5, 0.75, 1.0]


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
    assert set(paths) == {"markdown", "latex", "plot"}
    assert all(Path(p).is_file() for p in paths.values())
    assert Path(paths["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = Path(paths["markdown"]).read_text()
    assert "](certified_accuracy.png)" in text

    summaries = load_summaries(sweep)
    radii = summaries[0]["radii"]
    rows = _markdown_table(text, "job")
    assert [(r[0], r[1].split(" (")[0]) for r in rows] == [
        ("mnist_gaussian_s0.25", "constant"),
        ("mnist_gaussian_s0.5", "constant"),
        ("samplewise/2", "samplewise_fill"),  # the headline variant first
        ("samplewise/2", "constant"),
        ("samplewise/2", "samplewise_raw"),
    ]
    for row in rows:
        assert len(row) == 2 + len(radii) + 4
    assert rows[0][2] == f"{100 * summaries[0]['variants']['constant']['certified_accuracy'][0]:.1f}"

    # The envelope at each radius is the best headline variant over the jobs (the unsound one is left out).
    mains = [s["variants"][s["main"]]["certified_accuracy"] for s in summaries]
    expected = np.max(mains, axis=0)
    best, names = envelope(summaries)
    np.testing.assert_allclose(best, expected)
    assert names[0] in {s["name"] for s in summaries}
    table = _markdown_table(text, "r")
    assert [float(r[0]) for r in table] == radii
    assert [r[1] for r in table] == [f"{100 * e:.1f}" for e in expected]


def test_plot_curves_are_exact_and_envelope_is_their_max(sweep, tmp_path):
    summaries = load_summaries(sweep)
    drawn = plot_certified_accuracy(summaries, tmp_path / "plot.png", title="sweep")
    assert (tmp_path / "plot.png").is_file()
    assert set(drawn["curves"]) == {s["name"] for s in summaries}
    exact = []
    for summary in summaries:  # every job has rows: its curve is exact and equals the summary on the grid
        main = summary["variants"][summary["main"]]
        rows = read_rows(Path(summary["path"]) / "certify.tsv")
        radius, correct = rows["radius"].to_numpy(), rows["correct"].to_numpy().astype(bool)
        x, y = drawn["curves"][summary["name"]]
        np.testing.assert_allclose(y, certified_accuracy(radius, correct, x))
        np.testing.assert_allclose(certified_accuracy(radius, correct, summary["radii"]), main["certified_accuracy"])
        exact.append((radius, correct))
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


def test_latex_is_a_tabular_with_the_right_columns(sweep):
    summaries = load_summaries(sweep)
    latex = format_table(summaries, fmt="latex")
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", latex).group(1)
    assert len(spec) == 2 + len(summaries[0]["radii"]) + 4
    body = [line for line in latex.splitlines() if line.endswith(r"\\")]
    assert len(body) == 1 + 5  # header and one row per job and variant
    assert all(line.count(" & ") == len(spec) - 1 for line in body)
    assert r"\toprule" in latex and latex.rstrip().endswith(r"\end{tabular}")
    assert r"mnist\_gaussian\_s0.25" in latex and r"samplewise\_raw (unsound upper bound)" in latex


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
    rows = [r.strip("|").split(" | ") for r in format_table([first, other]).splitlines()[2:]]
    assert [c.strip() for c in rows[0][2:5]] == ["90.0", "80.0", "70.0"]
    assert [c.strip() for c in rows[1][2:5]] == ["60.0", "", "50.0"]  # 0.25 is not on b's grid
    rows = [r.strip("|").split(" | ") for r in format_table([first, other], radii=[0.5, 1.0]).splitlines()[2:]]
    assert [c.strip() for c in rows[1][2:4]] == ["50.0", ""]
    best, names = envelope([first, other])
    np.testing.assert_allclose(best, [0.9, 0.8, 0.7])
    assert names == ["a", "a", "a"]


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
    assert {p.name for p in out.iterdir()} == {"report.md", "report.tex", "certified_accuracy.png"}
    header = (out / "report.md").read_text().split("| job |", 1)[1].splitlines()[0]
    assert "r=0 | r=0.5 | r=1 |" in header
    printed = capsys.readouterr().out
    assert "certified accuracy" in printed and str(out / "report.md") in printed
