"""report.py: its correlations and overlaps against independent scipy / pandas / plain-Python computations on a
small case (ties, a cluster of unknown records, tiny clusters), its files (Markdown, self-contained HTML, PNGs),
bad input, and a few entries of the paper-data matrices (when ../shared/paper exists)."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from _step3_helpers import ref_split
from scipy import stats

import report
from small2large import report_stats, score_table
from small2large.dumps import load_pplxs
from utils import UserError, run_cli

N_SEL = 3


def _case(tmp_path, n=240, seed=0):
    """Three selectors whose LP(1) rankings agree partly; clusters 0..5, a tiny cluster 6 (2 records) and
    cluster 9 as 'unknown'; rounded perplexities make ties."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, n)
    labels[:2] = 6
    labels[rng.random(n) < 0.1] = 9
    records = [{"instruction": f"Task {i}", "input": "", "output": "word " * (1 + i % 13)} for i in range(n)]
    base = rng.normal(size=n)
    paths, lp1s = [], []
    for s in range(N_SEL):
        p0 = np.exp(rng.normal(2.0, 0.3, n))
        p3 = p0 * rng.uniform(0.1, 0.6, n)
        frac = 1 / (1 + np.exp(-(base + 0.8 * s * rng.normal(size=n))))
        p1 = np.round(p0 - frac * (p0 - p3), 2)
        p2 = (p1 + p3) / 2
        p0[5] = p1[5] = p2[5] = p3[5] = 1.0   # a truncated record: LP(1) = 0 for all, a tie
        df = score_table.build_score_table(records, labels, [p0, p1, p2, p3])
        path = str(tmp_path / f"sel{s}-scores.parquet")
        score_table.write_score_table(path, df, score_table.table_meta(df, f"sel{s}"))
        paths.append(path)
        lp1s.append(df["lp1"].to_numpy())
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    return paths, np.stack(lp1s, axis=1), labels, records, str(data)


def _ref_within(x, labels, fn, exclude=(9,), min_size=3):
    """Mean over clusters (>= min_size members, not excluded) of scipy's per-cluster coefficient (pandas groupby)."""
    m = x.shape[1]
    out = np.eye(m)
    df = pd.DataFrame(x).assign(c=labels)
    for i in range(m):
        for j in range(i + 1, m):
            vals = []
            for c, g in df.groupby("c"):
                if c in exclude or len(g) < min_size:
                    continue
                v = fn(g[i], g[j]).statistic
                if np.isfinite(v):
                    vals.append(v)
            out[i, j] = out[j, i] = np.mean(vals)
    return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One report over the small case, with --dataset and --published (figures included)."""
    tmp_path = tmp_path_factory.mktemp("report")
    paths, x, labels, records, data = _case(tmp_path)
    sel = ref_split(labels, x[:, 1], 10, "low")
    sel5 = ref_split(labels, x[:, 0], 5, "low")
    pub = {"subsets": {"sel1/lp1/10_low": {"indices": sel}, "sel0/lp1/5_low": {"indices": sel[:5]},
                       "other/lp1/10_low": {"indices": [0]}}}
    (tmp_path / "published.json").write_text(json.dumps(pub))
    nums = report.main(["--scores", *paths, "--dataset", data, "--output_dir", str(tmp_path / "rep"),
                        "--unknown_cluster", "9", "--budgets", "5", "10", "33", "--n_traj", "30",
                        "--published", str(tmp_path / "published.json")])
    return tmp_path, nums, x, labels, sel, sel5


def test_numbers_match_independent_computation(full_run):
    tmp_path, nums, x, labels, _, _ = full_run
    for i in range(N_SEL):
        for j in range(N_SEL):
            assert nums["spearman"][i, j] == pytest.approx(stats.spearmanr(x[:, i], x[:, j]).statistic, abs=1e-12)
            assert nums["kendall"][i, j] == pytest.approx(stats.kendalltau(x[:, i], x[:, j]).statistic, abs=1e-12)
    assert nums["within_spearman"] == pytest.approx(_ref_within(x, labels, stats.spearmanr), abs=1e-12)
    assert nums["within_kendall"] == pytest.approx(_ref_within(x, labels, stats.kendalltau), abs=1e-12)
    assert nums["within_clusters"] == 6   # clusters 0..5; 6 is too small, 9 is unknown
    assert 0.2 < nums["spearman"][0, 2] < 0.95   # the case is not degenerate
    for p in (5.0, 10.0, 33.0):
        sets = [set(ref_split(labels, x[:, s], p, "low")) for s in range(N_SEL)]
        for i in range(N_SEL):
            for j in range(N_SEL):
                inter = len(sets[i] & sets[j])
                assert nums["jaccard"][p][i, j] == pytest.approx(inter / len(sets[i] | sets[j]), abs=1e-15)
                assert nums["share"][p][i, j] == pytest.approx(inter / len(sets[i]), abs=1e-15)
    assert nums["names"] == ["sel0", "sel1", "sel2"]
    out = tmp_path / "rep"
    files = sorted(os.listdir(out))
    assert "report.md" in files and "report.html" in files
    pngs = [f for f in files if f.endswith(".png")]
    assert len(pngs) == 2 * N_SEL + 2   # distributions + composition per selector, rank agreement, overlap
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for f in pngs:
        assert f"]({f})" in md
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert html.count("src='data:image/png;base64,") == len(pngs) and "src='http" not in html and ".png'" not in html
    assert f"| sel0 | 1.000 | {nums['spearman'][0, 1]:.3f} |" in md
    # the lowest / highest scored records of a few clusters, as text
    c = 0
    mem = np.flatnonzero(labels == c)
    lowest = mem[np.lexsort((mem, x[mem, 0]))][0]
    assert f"#{lowest}: Instruction: Task {lowest} | Response: " in md
    assert nums["seconds"] > 0 and os.path.join(str(out), "report.md") in nums["paths"]


def test_exact_within_kendall_equals_scipy_for_a_large_cluster(monkeypatch):
    """The pairwise-sign tau-b (small clusters) and scipy's O(n log n) one (large clusters) agree."""
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(size=(60, 3)), 1)
    labels = np.zeros(60, np.int64)
    a = report_stats.within_cluster_correlations(x, labels)
    monkeypatch.setattr(report_stats, "WITHIN_EXACT_MAX", 10)
    b = report_stats.within_cluster_correlations(x, labels)
    assert a[1] == pytest.approx(b[1], abs=1e-12) and a[2] == b[2] == 1
    assert a[1][0, 1] == pytest.approx(stats.kendalltau(x[:, 0], x[:, 1]).statistic, abs=1e-12)


def test_published_comparison(full_run):
    tmp_path, nums, x, labels, sel, sel5 = full_run
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"| sel1 | lp1/10_low | {len(sel)} | {len(sel)} | 1.0000 | 1.0000 |" in md
    n5 = len(sel5)
    inter = len(set(sel[:5]) & set(sel5))
    assert f"| sel0 | lp1/5_low | 5 | {n5} | {inter / (5 + n5 - inter):.4f} | {inter / 5:.4f} |" in md
    assert "other" not in md.split("Published subsets")[1]


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    paths, x, labels, records, data = _case(tmp_path)
    other = [dict(r) for r in records]
    other[3]["output"] = "changed"
    df = score_table.build_score_table(other, labels, [np.full(len(other), 3.0), np.full(len(other), 2.0)])
    score_table.write_score_table(str(tmp_path / "other.parquet"), df, score_table.table_meta(df, "other"))
    with pytest.raises(UserError, match="describe different records"):
        report.main(["--scores", paths[0], str(tmp_path / "other.parquet"), "--output_dir", str(tmp_path / "r")])
    with pytest.raises(UserError, match="two score tables are named 'sel0'"):
        report.main(["--scores", paths[0], paths[0], "--output_dir", str(tmp_path / "r")])
    with pytest.raises(UserError, match="record 3 differs"):
        report.main(["--scores", str(tmp_path / "other.parquet"), "--dataset", data, "--output_dir", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as e:
        report.parse_args(["--scores", paths[0], "--names", "a", "b"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        report.parse_args(["-h"])
    helptext = capsys.readouterr().out
    for flag in ("--scores", "--names", "--output_dir", "--dataset", "--published", "--metric", "--budgets",
                 "--unknown_cluster", "--min_cluster_size", "--example_clusters", "--n_examples", "--n_traj", "--seed"):
        assert flag in helptext


def test_a_two_dump_table_is_reported_without_lp1(tmp_path):
    paths, x, labels, records, data = _case(tmp_path)
    rng = np.random.default_rng(3)
    p0 = np.exp(rng.normal(2, 0.3, len(labels)))
    df = score_table.build_score_table(records, labels, [p0, p0 * rng.uniform(0.2, 0.9, len(labels))])
    score_table.write_score_table(str(tmp_path / "cheap.parquet"), df, score_table.table_meta(df, "cheap"))
    nums = report.main(["--scores", paths[0], str(tmp_path / "cheap.parquet"), "--output_dir", str(tmp_path / "r"),
                        "--no-figures"])
    assert "spearman" not in nums   # one selector with LP(1): nothing to compare
    assert "No lp1 column (dumps P0..P1)" in (tmp_path / "r" / "report.md").read_text()
    nums = report.main(["--scores", paths[0], str(tmp_path / "cheap.parquet"), "--metric", "lp1_approx",
                        "--output_dir", str(tmp_path / "r2"), "--no-figures"])
    assert not [f for f in os.listdir(tmp_path / "r2") if f.endswith(".png")]
    assert nums["spearman"][0, 1] == pytest.approx(
        stats.spearmanr(df["lp1_approx"], pd.read_parquet(paths[0])["lp1_approx"]).statistic, abs=1e-12)


def test_dataset_with_other_column_names(tmp_path, capsys):
    """A Dolly-style local JSON (instruction, context, response): the column flags of the other step-3 scripts
    (data.add_data_arguments) map it; the report equals the one from the same records in Alpaca columns."""
    paths, x, labels, records, alpaca = _case(tmp_path, n=60)
    dolly = tmp_path / "dolly.json"
    dolly.write_text(json.dumps([{"instruction": r["instruction"], "context": r["input"], "response": r["output"]}
                                 for r in records]))
    common = ["--scores", paths[0], "--no-figures", "--example_clusters", "2"]
    report.main(common + ["--dataset", alpaca, "--output_dir", str(tmp_path / "a")])
    report.main(common + ["--dataset", str(dolly), "--input_field", "context", "--output_field", "response",
                          "--output_dir", str(tmp_path / "d")])
    want = (tmp_path / "a" / "report.md").read_text()
    assert want.count("Task ") == 8   # 2 clusters x (2 lowest + 2 highest) records shown as text
    assert (tmp_path / "d" / "report.md").read_text() == want
    capsys.readouterr()
    rc = run_cli(report.main, common + ["--dataset", str(dolly), "--output_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "--output_field" in err, err
    with pytest.raises(SystemExit) as e:
        report.parse_args(common + ["--output_field", "response"])   # a column of no dataset
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------
# The paper's data


@pytest.mark.paper
def test_paper_matrix_entries(paper_dir):
    """Dolly, three selectors: report.py's LP(1) Spearman and 10% Jaccard equal scipy / set computations and
    the README's matrix entries (rounded to 2 decimals)."""
    with open(os.path.join(paper_dir, "dolly", "clusters.json")) as f:
        labels = np.array(json.load(f), dtype=np.int64)   # Dolly: no null
    x = []
    models = ("opt-350m", "opt-13b", "llama2-7b")
    for m in models:
        p = []
        for e in ("pre", "1", "2", "3"):
            p.append(load_pplxs(os.path.join(paper_dir, "dolly", "dump-pplxs", m, f"epoch-{e}.pkl")))
        x.append(np.where(p[0] != p[3], (p[0] - p[1]) / np.where(p[0] != p[3], p[0] - p[3], 1.0), 0.0))
    x = np.stack(x, axis=1)
    sp = report_stats.spearman_matrix(x)
    subs = [report_stats.lowest_subset(labels, x[:, i], 10) for i in range(3)]
    jac, _ = report_stats.overlap_matrices(subs, len(labels))
    readme = {("opt-350m", "opt-13b"): (0.77, 0.41), ("opt-350m", "llama2-7b"): (0.73, 0.36),
              ("opt-13b", "llama2-7b"): (0.85, 0.46)}
    for (a, b), (want_sp, want_j) in readme.items():
        i, j = models.index(a), models.index(b)
        assert sp[i, j] == pytest.approx(stats.spearmanr(x[:, i], x[:, j]).statistic, abs=1e-12)
        si, sj = set(subs[i].tolist()), set(subs[j].tolist())
        assert jac[i, j] == pytest.approx(len(si & sj) / len(si | sj), abs=1e-15)
        assert round(sp[i, j], 2) == want_sp and round(jac[i, j], 2) == want_j
    assert all(len(s) == 1628 for s in subs)   # the paper's 10_low size for Dolly
