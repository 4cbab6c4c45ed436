"""process_pickle.py: the paper's CSV, byte for byte; the truncation report; --plot."""

import collections
import csv
import io
import os
import sys

import numpy as np
import pandas as pd
import pytest
from _step3_helpers import dump_args, listdir_all, make_workspace, ref_lp1, ref_lp1_approx

import process_pickle
from small2large import rankings
from utils import UserError


def paper_style_csv(records, labels, p, m):
    """The CSV as the paper's process_pickle.py wrote it, from its description: csv.writer rows, None for
    the two empty columns, and the integer 0 for LP(1) when P0 == P3."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["index", "sample", "len_response", "cluster_num", None, f"{m}_P0", f"{m}_P1", f"{m}_P2", f"{m}_P3", None, f"{m}_L1"])
    p0, p1, p2, p3 = (x.tolist() for x in p)
    for i, r in enumerate(records):
        if r["input"]:
            s = "Instruction: " + r["instruction"] + "\nInput: " + r["input"] + "\nResponse: " + r["output"]
        else:
            s = "Instruction: " + r["instruction"] + "\nResponse: " + r["output"]
        l1 = (p0[i] - p1[i]) / (p0[i] - p3[i]) if p0[i] - p3[i] != 0 else 0
        w.writerow([i, s, len(r["output"]), int(labels[i]), None, p0[i], p1[i], p2[i], p3[i], None, l1])
    return buf.getvalue()


def test_csv_is_the_papers_format_byte_for_byte(tmp_path, capsys):
    ws = make_workspace(str(tmp_path / "in"), n=140, k=5)
    path = process_pickle.main(dump_args(ws["paths"], "--model_name", "alpaca-llama2-7b", "--output_dir", str(tmp_path / "rk")))
    assert path == os.path.join(str(tmp_path / "rk"), "alpaca-llama2-7b-l1_ranking.csv")
    with open(path, newline="", encoding="utf-8") as f:
        text = f.read()
    assert text == paper_style_csv(ws["records"], ws["labels"], ws["p"], "alpaca-llama2-7b")
    assert text.startswith("index,sample,len_response,cluster_num,,alpaca-llama2-7b_P0,alpaca-llama2-7b_P1,"
                           "alpaca-llama2-7b_P2,alpaca-llama2-7b_P3,,alpaca-llama2-7b_L1\r\n")
    df = pd.read_csv(path)
    assert list(df.columns) == ["index", "sample", "len_response", "cluster_num", "Unnamed: 4", "alpaca-llama2-7b_P0",
                                "alpaca-llama2-7b_P1", "alpaca-llama2-7b_P2", "alpaca-llama2-7b_P3", "Unnamed: 9",
                                "alpaca-llama2-7b_L1"]
    assert df["Unnamed: 4"].isna().all() and df["Unnamed: 9"].isna().all()
    r0, r1 = ws["records"][0], ws["records"][1]   # record 0 has an input, record 1 has none
    assert df["sample"][0] == f"Instruction: {r0['instruction']}\nInput: {r0['input']}\nResponse: {r0['output']}"
    assert df["sample"][1] == f"Instruction: {r1['instruction']}\nResponse: {r1['output']}"
    assert df["len_response"].tolist() == [len(r["output"]) for r in ws["records"]]
    assert df["cluster_num"].tolist() == ws["labels"].tolist()
    out = capsys.readouterr().out
    assert "fully truncated (perplexity 1.0 in every dump, LP(1) = 0): 4 records (2.9% of 140)" in out


def test_sample_text_examples():
    assert rankings.sample_text({"instruction": "A", "input": "B", "output": "C"}) == "Instruction: A\nInput: B\nResponse: C"
    assert rankings.sample_text({"instruction": "A", "input": "", "output": "C"}) == "Instruction: A\nResponse: C"


def test_numpy_cluster_numbers_from_a_sklearn_clustering_are_accepted(tmp_path):
    """The paper's clustering pickles hold numpy int32 labels (scikit-learn); they load safely."""
    import pickle

    ws = make_workspace(str(tmp_path / "in"), n=50, k=3)
    with open(ws["paths"]["clustering"], "wb") as f:
        pickle.dump([{"embed_sentence": "s", "cluster_num": np.int32(c)} for c in ws["labels"]], f, protocol=pickle.HIGHEST_PROTOCOL)
    path = process_pickle.main(dump_args(ws["paths"], "--output_dir", str(tmp_path / "rk")))
    assert path.endswith("model-l1_ranking.csv")   # the paper's default model name
    assert pd.read_csv(path)["cluster_num"].tolist() == ws["labels"].tolist()


def test_plot(tmp_path):
    """process_pickle.py --plot (the README's command) writes a PNG next to the CSV."""
    ws = make_workspace(str(tmp_path / "in"), n=300, k=5)
    png = str(tmp_path / "lp.png")
    process_pickle.main(dump_args(ws["paths"], "--output_dir", str(tmp_path / "rk"), "--plot", png))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 20_000


def test_plot_draws_each_metric_and_the_trajectories(tmp_path):
    """What the figure shows, read back from its axes: each histogram panel holds np.histogram of its own
    metric (80 bins over the 0.5-99.5 percentiles), each trajectory is one record's (P0, P1, P2, P3) in
    that order, coloured by its LP(1), and the red line is the median of all records per epoch."""
    import matplotlib

    ws = make_workspace(str(tmp_path / "in"), n=400, k=5, ties=False)
    p0, p1, p2, p3 = ws["p"]
    fig = rankings.plot_lp(str(tmp_path / "lp.png"), "m", p0, p1, p2, p3)
    hist_axes = {ax.get_xlabel().split(" =")[0]: ax for ax in fig.axes[:2]}
    assert sorted(hist_axes) == ["LP(1)", "LP(1)-approx"]
    l1 = np.array(ref_lp1(p0, p1, p3))
    drawn = {}
    for name, v in (("LP(1)", l1), ("LP(1)-approx", np.array(ref_lp1_approx(p0, p1)))):
        lo, hi = np.percentile(v, [0.5, 99.5])
        counts, edges = np.histogram(v[(v >= lo) & (v <= hi)], bins=80)
        bars = hist_axes[name].patches
        heights = [b.get_height() for b in bars]
        drawn[name] = heights
        assert heights == counts.tolist(), f"the {name} panel's bars are not the histogram of {name}"
        assert np.allclose([b.get_x() for b in bars] + [bars[-1].get_x() + bars[-1].get_width()], edges, rtol=0, atol=1e-12)
    assert drawn["LP(1)"] != drawn["LP(1)-approx"]   # the two metrics are told apart on this data
    # trajectories: one line per sampled record, its P0..P3 in epoch order, coloured by its own LP(1)
    p = np.stack([p0, p1, p2, p3], axis=1)
    rows = collections.defaultdict(list)   # trajectory -> records (only the 4 fully truncated ones share one)
    for i, r in enumerate(p.tolist()):
        rows[tuple(r)].append(i)
    lines = fig.axes[2].get_lines()
    median = [ln for ln in lines if ln.get_label() == "median of all records"]
    traj = [ln for ln in lines if ln.get_label() != "median of all records"]
    assert len(median) == 1 and np.array_equal(median[0].get_ydata(), np.median(p, axis=0))
    assert len(traj) == 300
    cmap = matplotlib.colormaps["viridis"]
    for j, ln in enumerate(traj):
        assert list(ln.get_xdata()) == [0, 1, 2, 3]
        y = tuple(float(t) for t in ln.get_ydata())
        assert rows[y], f"trajectory {j} {y} is not (P0, P1, P2, P3) of any record left to draw (reversed or mixed epochs?)"
        i = rows[y].pop()   # each record is drawn at most once
        assert ln.get_color()[:3] == cmap(float(np.clip(l1[i], 0, 1)))[:3], f"trajectory {j} is not coloured by its LP(1)"


def test_plot_without_matplotlib_is_a_clear_error_and_writes_nothing(tmp_path, monkeypatch):
    ws = make_workspace(str(tmp_path / "in"), n=30, k=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "rk"
    with pytest.raises(UserError, match="--plot needs matplotlib"):
        process_pickle.main(dump_args(ws["paths"], "--output_dir", str(out), "--plot", str(tmp_path / "x.png")))
    assert not out.exists() and not (tmp_path / "x.png").exists()


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        process_pickle.parse_args(["-h"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--epoch0", "--epoch3", "--clustering", "--model_name", "--output_dir", "--plot"):
        assert flag in text


def test_output_dir_gets_only_the_csv(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=40, k=2)
    process_pickle.main(dump_args(ws["paths"], "--model_name", "m", "--output_dir", str(tmp_path / "rk")))
    assert listdir_all(str(tmp_path / "rk")) == ["m-l1_ranking.csv", "m-scores.parquet"]   # no temporary file left
    process_pickle.main(dump_args(ws["paths"], "--model_name", "m", "--output_dir", str(tmp_path / "rk2"), "--no_scores"))
    assert listdir_all(str(tmp_path / "rk2")) == ["m-l1_ranking.csv"]
    with open(tmp_path / "rk" / "m-l1_ranking.csv", "rb") as f:
        assert f.read().count(b"\r\n") >= 41   # the csv module's \r\n line ends, as the paper's files
