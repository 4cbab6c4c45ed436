"""examples/quickstart.sh end to end at a reduced size (120 records, 1 target epoch, small models),
then a rerun that must reuse every step. Every output is checked against the paper's formats and
against independent recomputations (subset sizes from the cluster sizes, the LP(1) choice per
cluster, the noise each subset picked)."""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "data"))

import make_sample  # noqa: E402

from small2large.record_io import load_records  # noqa: E402
from utils import safe_load_pickle  # noqa: E402

N, N_HELDOUT, K, P = 120, 40, 6, 10
ENV = {
    "QS_RECORDS": str(N), "QS_HELDOUT": str(N_HELDOUT), "QS_CLUSTERS": str(K), "QS_PERCENTAGE": str(P),
    "QS_TARGET_EPOCHS": "1", "QS_SELECTOR_HIDDEN": "32", "QS_TARGET_HIDDEN": "64", "QS_TARGET_LAYERS": "2",
    "QS_BATCH": "8", "QS_NEW_TOKENS": "24",
}
KINDS = ("lp1", "lp1_approx", "clust_rand")


def _run(runs_dir):
    env = {**os.environ, **ENV, "QS_RUNS": str(runs_dir), "PYTHON": sys.executable}
    return subprocess.run(["bash", os.path.join(ROOT, "examples", "quickstart.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    runs = tmp_path_factory.mktemp("qs")
    proc = _run(runs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = os.path.realpath(os.path.join(runs, "latest"))
    return runs, run, proc.stdout


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _subset_path(run, kind):
    name = f"{P}_clust_rand-selector.json" if kind == "clust_rand" else f"{P}_low_{kind}-selector.json"
    return os.path.join(run, "subsets", name)


def _inputs(run):
    train = load_records(os.path.join(run, "data", "train.json"))
    clus = safe_load_pickle(os.path.join(run, "clustering", "sample-clustering.pkl"))
    dumps = [safe_load_pickle(os.path.join(run, "dump-pplxs", f"epoch-{e}.pkl")) for e in ("pre", 1, 2, 3)]
    return train, clus, dumps


@pytest.mark.slow
def test_outputs_in_the_papers_formats(quickstart):
    runs, run, out = quickstart
    train, clus, dumps = _inputs(run)
    full = json.loads(_read(os.path.join(ROOT, "data", "sample_train.json")))
    assert train == full[:N]
    # clustering: the paper's list of {"embed_sentence", "cluster_num"}, dataset order
    assert isinstance(clus, list) and len(clus) == N
    for c, r in zip(clus, train):
        assert set(c) == {"embed_sentence", "cluster_num"}
        assert isinstance(c["cluster_num"], int) and 0 <= c["cluster_num"] < K
        assert r["output"].strip() in c["embed_sentence"]
    # dumps: plain lists of N positive floats; the selector learned (P3 < P0 on average)
    for d in dumps:
        assert isinstance(d, list) and len(d) == N
        assert all(type(x) is float and math.isfinite(x) and x > 0 for x in d)
    assert np.mean(dumps[3]) < np.mean(dumps[0])
    # ranking CSV: the paper's columns, N rows, L1 = (P0-P1)/(P0-P3) of the dumps
    with open(os.path.join(run, "l1-rankings", "selector-l1_ranking.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    m = "selector"
    assert rows[0] == ["index", "sample", "len_response", "cluster_num", "", f"{m}_P0", f"{m}_P1", f"{m}_P2",
                       f"{m}_P3", "", f"{m}_L1"]
    assert len(rows) == N + 1
    p0, p1, p3 = (np.array(d) for d in (dumps[0], dumps[1], dumps[3]))
    lp1 = (p0 - p1) / (p0 - p3)
    np.testing.assert_allclose([float(r[-1]) for r in rows[1:]], lp1, rtol=1e-12)
    assert [int(r[3]) for r in rows[1:]] == [c["cluster_num"] for c in clus]
    # plot, trained target folders
    with open(os.path.join(run, "lp-plot.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for name in (*KINDS, "full"):
        d = os.path.join(run, "targets", name)
        for fn in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"):
            assert os.path.isfile(os.path.join(d, fn)), (name, fn)
    # the closing message names the outputs
    assert "comparison" in out and os.path.join(run, "compare.md") in out
    assert os.path.join(run, "eval", "summary.md") in out


@pytest.mark.slow
def test_subsets_sizes_and_choice(quickstart):
    _, run, _ = quickstart
    train, clus, dumps = _inputs(run)
    labels = np.array([c["cluster_num"] for c in clus])
    p0, p1, p3 = (np.array(d) for d in (dumps[0], dumps[1], dumps[3]))
    metric = {"lp1": (p0 - p1) / (p0 - p3), "lp1_approx": (p0 - p1) / p0}
    k = round(100 / P)
    keep = {c: math.ceil(int((labels == c).sum()) / k) for c in np.unique(labels)}  # chunk 0 of array_split
    key = [json.dumps(r, sort_keys=True) for r in train]
    for kind in KINDS:
        sub = json.loads(_read(_subset_path(run, kind)))
        assert len(sub) == sum(keep.values()), kind
        idx = [key.index(json.dumps(r, sort_keys=True)) for r in sub]  # every record is an original one
        got = {c: sum(1 for i in idx if labels[i] == c) for c in keep}
        assert got == keep, kind  # each cluster contributes ceil(n_c / k)
        if kind in metric:  # per cluster, the lowest-metric records (ties by index)
            want = []
            for c in sorted(keep):
                members = sorted(np.flatnonzero(labels == c), key=lambda i: (metric[kind][i], i))
                want += [int(i) for i in members[: keep[c]]]
            assert sorted(set(idx)) == sorted(set(want)), kind


@pytest.mark.slow
def test_comparison_table(quickstart):
    _, run, out = quickstart
    text = _read(os.path.join(run, "compare.md"))
    assert "| training data | records | share |" in text and text.split("## Held-out perplexity of")[1] in out
    res = json.loads(_read(os.path.join(run, "compare.json")))["results"]
    assert [r["name"] for r in res] == ["untrained target", f"{P}_lp1", f"{P}_lp1_approx", f"{P}_clust_rand",
                                        f"{P}_lp1_nounlearned", "full"]   # the --exclude_unlearned row
    for r in res:
        assert math.isfinite(r["heldout_ppl"]) and r["heldout_ppl"] > 1
        assert f"| {r['name']} |" in text
    assert res[-1]["records"] == N
    assert res[-1]["heldout_ppl"] < res[0]["heldout_ppl"]  # training on the full data helps
    train, _, _ = _inputs(run)
    for r in res[1:4]:
        assert r["train_runtime"] is not None and r["train_runtime"] > 0
        sub = load_records(r["data"])
        meta = make_sample.annotate(sub)
        assert r["picked"]["n"] == len(sub) == r["records"]
        assert r["picked"]["noisy"] == sum(m["noisy"] for m in meta)
        assert sum(r["picked"]["families"].values()) == len(sub)
    assert "noisy (corrupted output)" in text and "Held-out perplexity by task family" in text
    assert "Held-out exact match by task family" in text


@pytest.mark.slow
def test_exact_match_recomputed_from_the_responses(quickstart):
    """evaluate.py's responses (one JSONL per model, every held-out prompt) give the exact-match figures of
    the comparison when recomputed here, and the untrained model answers nothing right."""
    _, run, _ = quickstart
    heldout = load_records(os.path.join(run, "data", "heldout.json"))
    summary = json.loads(_read(os.path.join(run, "eval", "summary.json")))
    res = {r["name"]: r for r in json.loads(_read(os.path.join(run, "compare.json")))["results"]}
    names = {"untrained": "untrained target", f"{P}_lp1": f"{P}_lp1", f"{P}_lp1_approx": f"{P}_lp1_approx",
             f"{P}_clust_rand": f"{P}_clust_rand", f"{P}_lp1_nounlearned": f"{P}_lp1_nounlearned", "full": "full"}
    assert [m["name"] for m in summary["models"]] == list(names)
    for m in summary["models"]:
        with open(m["generations"], encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        assert [r["gold"] for r in rows] == [h["output"] for h in heldout]
        assert all(r["prompt"].endswith("### Response:") for r in rows)
        hits = sum(r["response"].strip() == h["output"].strip() for r, h in zip(rows, heldout))
        em = res[names[m["name"]]]["exact_match"]
        assert em["correct"] == hits and em["value"] == hits / N_HELDOUT
        assert em["ci95"][0] <= em["value"] <= em["ci95"][1]
        assert res[names[m["name"]]]["exact_match_norm"]["correct"] >= hits
    assert res["untrained target"]["exact_match"]["correct"] == 0


@pytest.mark.slow
def test_rerun_reuses_every_step(quickstart):
    runs, run, _ = quickstart
    before = {p: os.path.getmtime(os.path.join(run, p))
              for p in ("compare.md", "eval/summary.json", "dump-pplxs/epoch-3.pkl")}
    proc = _run(runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done earlier") == 14
    assert "QS_FRESH=1" in proc.stdout  # says how to start over
    assert "| full |" in proc.stdout  # the table is shown again
    assert os.path.realpath(os.path.join(runs, "latest")) == run
    assert before == {p: os.path.getmtime(os.path.join(run, p)) for p in before}


@pytest.mark.slow
def test_score_table_report_and_exclude_unlearned(quickstart):
    """Issue 9's block: the score table, the report, and a subset without the unlearned records."""
    from small2large import score_table

    _, run, out = quickstart
    train, _, _ = _inputs(run)
    df, _ = score_table.read_score_table(os.path.join(run, "l1-rankings", "selector-scores.parquet"), train)
    flagged = df["unlearned"].to_numpy()
    assert flagged.sum() >= K   # at least one per cluster (ceil of 5%)
    sub = load_records(os.path.join(run, "subsets", f"{P}_low_lp1-selector-nounlearned.json"))
    key = [json.dumps(r, sort_keys=True) for r in train]
    idx = [key.index(json.dumps(r, sort_keys=True)) for r in sub]
    assert idx and not flagged[idx].any()
    md = _read(os.path.join(run, "report", "report.md"))
    assert "# Selection report: 1 selector(s)" in md and os.path.isfile(os.path.join(run, "report", "report.html"))
    assert os.path.join(run, "report", "report.md") in out
