"""subset.py: the chunk rule, exact budgets, clust_rand, both interfaces, the CSV round trip."""

import csv
import errno
import json
import os
import random

import numpy as np
import pandas as pd
import pytest
from _step3_helpers import (
    SPLIT_LIST,
    dump_args,
    listdir_all,
    make_workspace,
    read_json,
    read_text,
    ref_clust_rand,
    ref_lp1,
    ref_lp1_approx,
    ref_split,
    write_pickle_plain,
)

import process_pickle
import subset
from small2large import lp, record_io, selection, subset_files
from utils import UserError

# ---------------------------------------------------------------------------------------------
# Pure maths against independent references


def test_chunk_bounds_matches_numpy_array_split():
    for k in (1, 2, 3, 4, 10, 20, 33, 100):
        for n in range(0, 230):
            parts = np.array_split(np.arange(n), k)
            for part in range(min(k, 3)):
                start, length = selection.chunk_bounds(n, k, part)
                assert (start, length) == ((parts[part][0] if len(parts[part]) else start), len(parts[part]))
                assert np.array_equal(np.arange(n)[start:start + length], parts[part])
    # vectorised form gives the same as the scalar one
    ns = np.arange(0, 300)
    s, ln = selection.chunk_bounds(ns, 3, 1)
    assert [(int(a), int(b)) for a, b in zip(s, ln)] == [selection.chunk_bounds(int(n), 3, 1) for n in ns]


def test_chunk_bounds_hand_values():
    assert [selection.chunk_bounds(10, 3, p) for p in range(3)] == [(0, 4), (4, 3), (7, 3)]   # 10 = 4 + 3 + 3
    assert [selection.chunk_bounds(11, 3, p) for p in range(3)] == [(0, 4), (4, 4), (8, 3)]   # 11 = 4 + 4 + 3
    assert [selection.chunk_bounds(2, 3, p) for p in range(3)] == [(0, 1), (1, 1), (2, 0)]    # smaller than k
    assert selection.chunk_bounds(1, 100, 0) == (0, 1)   # every cluster keeps >= 1 record
    assert selection.chunk_bounds(101, 100, 0) == (0, 2)
    with pytest.raises(UserError):
        selection.chunk_bounds(5, 2, 2)


def test_num_chunks_table_and_coarse_percentages():
    assert [selection.num_chunks(p) for p in selection.SPLITS] == [3, 4, 10, 20, 33, 100]
    assert {selection.num_chunks(p) for p in range(41, 67)} == {2}
    assert {selection.num_chunks(p) for p in range(67, 101)} == {1}
    assert selection.num_chunks(34) == 3 and selection.num_chunks(2) == 50


def test_exact_allocation_hand_values_and_properties():
    assert selection.exact_allocation([5, 3, 2], 3).tolist() == [1, 1, 1]      # quotas 1.5, .9, .6
    assert selection.exact_allocation([50, 30, 20], 10).tolist() == [5, 3, 2]
    assert selection.exact_allocation([1, 1, 1, 1], 2).tolist() == [1, 1, 0, 0]  # equal remainders: lower cluster first
    assert selection.exact_allocation([4, 0, 6], 10).tolist() == [4, 0, 6]
    rng = np.random.default_rng(1)
    for _ in range(200):
        sizes = rng.integers(0, 40, rng.integers(1, 30))
        if sizes.sum() == 0:
            continue
        b = int(rng.integers(0, sizes.sum() + 1))
        a = selection.exact_allocation(sizes, b)
        quota = sizes * b / sizes.sum()
        assert a.sum() == b and (a <= sizes).all() and (a >= 0).all()
        assert (np.abs(a - quota) < 1).all()  # largest remainder: floor or ceil of the quota
    with pytest.raises(UserError):
        selection.exact_allocation([2, 2], 5)


def test_sort_members_breaks_ties_by_dataset_index():
    cluster = np.array([0, 1, 0, 0, 1, 0])
    metric = np.array([0.5, 0.1, 0.5, 0.2, 0.1, 0.5])
    order, starts, sizes = selection.sort_members(cluster, metric)
    assert order.tolist() == [3, 0, 2, 5, 1, 4] and starts.tolist() == [0, 4] and sizes.tolist() == [4, 2]


def test_selection_matches_reference_loop_on_every_split(tmp_path):
    ws = make_workspace(str(tmp_path), n=400, k=9, ties=True)
    labels, (p0, p1, _, p3) = ws["labels"], ws["p"]
    metrics = {"lp1": np.array(ref_lp1(p0, p1, p3)), "lp1_approx": np.array(ref_lp1_approx(p0, p1))}
    ranking = selection.Ranking(labels, metrics, None, "m")
    splits = [selection.Split(kind, p, part) for kind in ("lp1", "lp1_approx") for p, part in SPLIT_LIST]
    got = selection.select(ranking, splits, exact=False, exclude_truncated=False, n_records=len(labels), every_split=True)
    for s, idx in zip(splits, got):
        assert idx.tolist() == ref_split(labels, metrics[s.kind], s.percentage, s.part), s


def test_clust_rand_matches_reference_stream(tmp_path):
    ws = make_workspace(str(tmp_path), n=300, k=6)
    labels, (p0, p1, _, p3) = ws["labels"], ws["p"]
    l1 = np.array(ref_lp1(p0, p1, p3))
    ranking = selection.Ranking(labels, {"lp1": l1}, None, "m")
    pcts = list(selection.SPLITS)
    splits = [selection.Split("clust_rand", p) for p in pcts]
    # (a): one stream, per cluster the six draws in the order 33, 25, 10, 5, 3, 1
    got = selection.select(ranking, splits, False, False, len(labels), every_split=True)
    ref = ref_clust_rand(labels, l1, pcts)
    for p, idx in zip(pcts, got):
        assert idx.tolist() == ref[p]
    # (b): one draw per cluster per run
    for p in (10, 1):
        (idx,) = selection.select(ranking, [selection.Split("clust_rand", p)], False, False, len(labels), every_split=False)
        assert idx.tolist() == ref_clust_rand(labels, l1, [p])[p]
    assert ref_clust_rand(labels, l1, [10])[10] != ref[10]  # the two interfaces really differ


def test_selection_is_invariant_to_dataset_order_without_ties(tmp_path):
    rng = np.random.default_rng(3)
    n = 250
    labels = rng.integers(0, 8, n)
    metric = rng.normal(size=n)
    perm = rng.permutation(n)
    r1 = selection.Ranking(labels, {"lp1": metric}, None, "m")
    r2 = selection.Ranking(labels[perm], {"lp1": metric[perm]}, None, "m")
    for p, part in SPLIT_LIST:
        a = selection.select(r1, [selection.Split("lp1", p, part)], False, False, n, True)[0]
        b = selection.select(r2, [selection.Split("lp1", p, part)], False, False, n, True)[0]
        assert a.tolist() == perm[b].tolist()


def test_records_json_equals_json_dumps():
    recs = [{"instruction": "a{}\"é\n\t\\", "input": "", "output": "x"}, {"instruction": "b", "input": "c", "output": "d"},
            {"x": 1, "y": [1, 2.5, None]}, {}, {"instruction": "q", "output": "w", "input": ""}, {"k{0}": "v"},
            {"instruction": "b", "input": "c", "output": 5}, {"instruction": "日本", "input": "\u2028", "output": "🙂"}]
    for need in (range(len(recs)), [5, 0], [2, 3], [3], [0, 6, 1], [7, 1]):
        need = list(need)
        el = subset_files.record_elements(recs, need)
        for idx in ([], need, need[::-1] + need):
            assert subset_files.records_json(el, idx) == json.dumps([recs[i] for i in idx], indent=4)


# ---------------------------------------------------------------------------------------------
# Interface (a): the CSV


def _run_a(ws, tmp_path, *extra, model="tiny-m"):
    rk = str(tmp_path / "rk")
    process_pickle.main(dump_args(ws["paths"], "--model_name", model, "--output_dir", rk))
    out = str(tmp_path / "out")
    res = subset.main(["--dataset", ws["paths"]["dataset"], "--l1_ranking_file", os.path.join(rk, f"{model}-l1_ranking.csv"),
                       "--output_dir", out, *extra])
    return out, res


def test_interface_a_writes_every_split_with_the_papers_names(tmp_path, capsys):
    ws = make_workspace(str(tmp_path / "in"), n=200, k=5)
    out, res = _run_a(ws, tmp_path, "--lp1", "--lp1_approx", "--clust_rand")
    names = [f"{p}_{part}_{kind}-tiny-m.json" for kind in ("lp1", "lp1_approx") for p, part in SPLIT_LIST]
    names += [f"{p}_clust_rand-tiny-m.json" for p in (33, 25, 10, 5, 3, 1)]
    assert sorted(os.listdir(out)) == sorted(names)
    labels, (p0, p1, _, p3) = ws["labels"], ws["p"]
    l1, la = ref_lp1(p0, p1, p3), ref_lp1_approx(p0, p1)
    recs = read_json(ws["paths"]["dataset"])
    for p, part in SPLIT_LIST:
        for kind, metric in (("lp1", l1), ("lp1_approx", la)):
            path = os.path.join(out, f"{p}_{part}_{kind}-tiny-m.json")
            want = [recs[i] for i in ref_split(labels, metric, p, part)]
            assert read_text(path) == json.dumps(want, indent=4)   # the paper's exact text format
    cr = ref_clust_rand(labels, np.array(l1), [33, 25, 10, 5, 3, 1])
    for p, idx in cr.items():
        assert read_json(os.path.join(out, f"{p}_clust_rand-tiny-m.json")) == [recs[i] for i in idx]
    text = capsys.readouterr().out
    n10 = len(ref_split(labels, np.array(l1), 10, "low"))
    assert f"10_low_lp1-tiny-m.json: {n10} records ({100 * n10 / 200:.1f}% of 200)" in text   # per split: kept + share
    assert "fully truncated records" in text and "4 records" in text


def test_interface_a_reads_the_papers_csv_format(tmp_path):
    """A CSV exactly as the paper's process_pickle.py wrote it (csv.writer, None for the empty columns, the
    integer 0 for LP(1) when P0 == P3), with a model name containing dashes and dots."""
    ws = make_workspace(str(tmp_path / "in"), n=90, k=4)
    p0, p1, p2, p3 = ws["p"]
    m = "alpaca-opt-1.3b"
    path = tmp_path / "paper.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "sample", "len_response", "cluster_num", None, f"{m}_P0", f"{m}_P1", f"{m}_P2", f"{m}_P3", None, f"{m}_L1"])
        for i, r in enumerate(ws["records"]):
            l1 = (p0[i] - p1[i]) / (p0[i] - p3[i]) if p0[i] - p3[i] != 0 else 0
            w.writerow([i, "Instruction: x\nResponse: y, \"z\"", len(r["output"]), int(ws["labels"][i]), None,
                        float(p0[i]), float(p1[i]), float(p2[i]), float(p3[i]), None, float(l1) if l1 else 0])
    assert list(pd.read_csv(path).columns)[4] == "Unnamed: 4"
    out = str(tmp_path / "out")
    res = subset.main(["--dataset", ws["paths"]["dataset"], "--l1_ranking_file", str(path), "--lp1", "--output_dir", out])
    assert os.path.join(out, f"10_low_lp1-{m}.json") in res
    ranking = selection.read_ranking_csv(str(path), 90, "d")
    assert ranking.model_name == m
    assert res[os.path.join(out, f"1_low_lp1-{m}.json")].tolist() == ref_split(ws["labels"], ranking.metrics["lp1"], 1, "low")


def test_csv_round_trip_keeps_float64_exactly(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=300, k=5, ties=False)
    p0, p1, p2, p3 = ws["p"]
    p0[20:25] = [1e-300, 1.0000000000000002, 123456789.123456789, 0.1 + 0.2, 2.2250738585072014e-308]
    write_pickle_plain(ws["paths"]["epoch0"], p0.tolist())
    rk = str(tmp_path / "rk")
    path = process_pickle.main(dump_args(ws["paths"], "--model_name", "m", "--output_dir", rk))
    r = selection.read_ranking_csv(path, 300, "d")
    assert np.array_equal(r.metrics["lp1"], lp.lp1(p0, p1, p3))            # bit for bit
    assert np.array_equal(r.metrics["lp1_approx"], (p0 - p1) / p0)
    assert np.array_equal(r.cluster, ws["labels"])
    df = pd.read_csv(path)
    for e, p in enumerate((p0, p1, p2, p3)):
        assert df[f"m_P{e}"].dtype == np.float64 and np.array_equal(df[f"m_P{e}"].to_numpy(), p)


def test_csv_rows_in_another_order_select_the_same(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=150, k=4)
    rk = str(tmp_path / "rk")
    path = process_pickle.main(dump_args(ws["paths"], "--model_name", "m", "--output_dir", rk))
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    shuffled = tmp_path / "shuffled.csv"
    df.sample(frac=1.0, random_state=0).to_csv(shuffled, index=False)
    a = subset.main(["--dataset", ws["paths"]["dataset"], "--l1_ranking_file", path, "--lp1", "--clust_rand", "--output_dir", str(tmp_path / "a")])
    b = subset.main(["--dataset", ws["paths"]["dataset"], "--l1_ranking_file", str(shuffled), "--lp1", "--clust_rand", "--output_dir", str(tmp_path / "b")])
    assert [v.tolist() for v in a.values()] == [v.tolist() for v in b.values()]


# ---------------------------------------------------------------------------------------------
# Interface (b): the dumps


def test_interface_b_equals_interface_a_for_lp_kinds(tmp_path, capsys):
    ws = make_workspace(str(tmp_path / "in"), n=220, k=6)
    out_a, res_a = _run_a(ws, tmp_path, "--lp1", "--lp1_approx", model="m")
    for p in (33, 10, 1):
        out_b = str(tmp_path / f"b{p}")
        res_b = subset.main(dump_args(ws["paths"], "--percentage", str(p), "--model_name", "m", "--lp1", "--lp1_approx",
                                      "--clust_rand", "--output_dir", out_b))
        assert sorted(os.listdir(out_b)) == sorted([f"{p}_low_lp1-m.json", f"{p}_low_lp1_approx-m.json", f"{p}_clust_rand-m.json"])
        for kind in ("lp1", "lp1_approx"):
            name = f"{p}_low_{kind}-m.json"
            assert read_text(os.path.join(out_b, name)) == read_text(os.path.join(out_a, name))
        l1 = np.array(ref_lp1(*[ws["p"][i] for i in (0, 1, 3)]))
        assert res_b[os.path.join(out_b, f"{p}_clust_rand-m.json")].tolist() == ref_clust_rand(ws["labels"], l1, [p])[p]
    # --part mid / high
    out = str(tmp_path / "mid")
    res = subset.main(dump_args(ws["paths"], "--percentage", "33", "--part", "high", "--lp1", "--output_dir", out, "--model_name", "m"))
    assert read_text(os.path.join(out, "33_high_lp1-m.json")) == read_text(os.path.join(out_a, "33_high_lp1-m.json"))
    assert len(res) == 1


def test_interface_b_lp1_approx_needs_only_two_dumps(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=100, k=4)
    pth = ws["paths"]
    res = subset.main(["--dataset", pth["dataset"], "--clustering", pth["clustering"], "--epoch0", pth["epoch0"], "--epoch1",
                       pth["epoch1"], "--percentage", "10", "--lp1_approx", "--output_dir", str(tmp_path / "o")])
    (idx,) = res.values()
    assert idx.tolist() == ref_split(ws["labels"], np.array(ref_lp1_approx(ws["p"][0], ws["p"][1])), 10, "low")


def test_coarse_percentage_warns(tmp_path, capsys):
    ws = make_workspace(str(tmp_path / "in"), n=200, k=3)
    for p, k_, warned in (("45", 2, True), ("70", 1, True), ("33", 3, False)):
        subset.main(dump_args(ws["paths"], "--percentage", p, "--lp1", "--output_dir", str(tmp_path / p)))
        text = capsys.readouterr().out
        assert ("warning:" in text) == warned, (p, text)
        if warned:
            assert f"= {k_} chunks per cluster" in text and "--exact" in text
    (idx,) = subset.main(dump_args(ws["paths"], "--percentage", "70", "--lp1", "--output_dir", str(tmp_path / "x"))).values()
    assert len(idx) == 200   # 67..100 -> k = 1 -> everything
    capsys.readouterr()
    (idx,) = subset.main(dump_args(ws["paths"], "--percentage", "45", "--lp1", "--exact", "--output_dir", str(tmp_path / "e"))).values()
    assert len(idx) == 90 and "warning:" not in capsys.readouterr().out   # --exact: 45% of 200
    assert os.listdir(tmp_path / "e") == ["45_low_lp1-model-exact.json"]


# ---------------------------------------------------------------------------------------------
# Beyond the paper: --exact, --exclude_truncated


def test_exact_hits_the_requested_share(tmp_path, capsys):
    ws = make_workspace(str(tmp_path / "in"), n=1000, k=40)
    labels = ws["labels"]
    l1 = np.array(ref_lp1(*[ws["p"][i] for i in (0, 1, 3)]))
    out, res = _run_a(ws, tmp_path, "--lp1", "--clust_rand", "--exact", model="m")
    sizes = np.bincount(labels)
    for p in (1, 3, 5, 10, 25, 33):
        idx = res[os.path.join(out, f"{p}_low_lp1-m-exact.json")]
        assert len(idx) == round(p * 10)  # p% of 1000
        alloc = selection.exact_allocation(sizes[sizes > 0], round(p * 10))
        got = np.bincount(labels[idx], minlength=len(sizes))[sizes > 0]
        assert got.tolist() == alloc.tolist()
        # each cluster keeps its lowest-LP members (ties by index)
        want = []
        for c, a in zip(np.flatnonzero(sizes), alloc):
            members = sorted(np.flatnonzero(labels == c).tolist(), key=lambda i: (l1[i], i))
            want += members[:a]
        assert idx.tolist() == want
        assert len(res[os.path.join(out, f"{p}_clust_rand-m-exact.json")]) == round(p * 10)
    # 33% mid / high: per cluster the central / highest members, as many as the exact allocation gives it
    alloc = selection.exact_allocation(sizes[sizes > 0], 330)
    recs = read_json(ws["paths"]["dataset"])
    for part in ("mid", "high"):
        name = f"33_{part}_lp1-m-exact.json"
        got = res[os.path.join(out, name)].tolist()
        want = []
        for c, a in zip(np.flatnonzero(sizes), alloc):
            members = sorted(np.flatnonzero(labels == c).tolist(), key=lambda i: (l1[i], i))
            start = (len(members) - a) // 2 if part == "mid" else len(members) - a   # mid: centred, the odd one lower
            chunk = members[start:start + a]
            assert got[len(want):len(want) + a] == chunk, f"{name}: cluster {c} ({len(members)} members, keeps {a}): " \
                f"records {got[len(want):len(want) + a]} instead of its {part} chunk {chunk} (sorted positions {start}..{start + a - 1})"
            want += chunk
        assert got == want and len(got) == 330
        assert read_json(os.path.join(out, name)) == [recs[i] for i in want]   # the file holds these records
    # the paper's rule overshoots on the same data
    paper = selection.select(selection.Ranking(labels, {"lp1": l1}, None, "m"), [selection.Split("lp1", 1)], False, False, 1000, True)[0]
    assert len(paper) > 10


def test_exclude_truncated(tmp_path, capsys):
    ws = make_workspace(str(tmp_path / "in"), n=200, k=4)
    trunc = set(range(10, 14))
    out, res = _run_a(ws, tmp_path, "--lp1", "--lp1_approx", "--clust_rand", model="m")
    text = capsys.readouterr().out
    assert "fully truncated records (perplexity 1.0 in every dump, LP(1) = 0): 4 records (2.0% of 200)" in text
    assert trunc & set(res[os.path.join(out, "1_low_lp1-m.json")].tolist())   # chosen as "hardest" by default
    out2 = str(tmp_path / "nt")
    res2 = subset.main(dump_args(ws["paths"], "--percentage", "1", "--lp1", "--lp1_approx", "--clust_rand",
                                 "--exclude_truncated", "--model_name", "m", "--output_dir", out2))
    assert sorted(os.listdir(out2)) == ["1_clust_rand-m-notrunc.json", "1_low_lp1-m-notrunc.json", "1_low_lp1_approx-m-notrunc.json"]
    eligible = np.ones(200, bool)
    eligible[list(trunc)] = False
    l1 = np.array(ref_lp1(*[ws["p"][i] for i in (0, 1, 3)]))
    for path, idx in res2.items():
        assert not trunc & set(idx.tolist())
        if "clust_rand" in path:
            assert idx.tolist() == ref_clust_rand(ws["labels"], l1, [1], eligible)[1]
        elif "_lp1-" in path:
            assert idx.tolist() == ref_split(ws["labels"], l1, 1, "low", eligible)
    assert "left out (--exclude_truncated)" in capsys.readouterr().out


def test_no_partial_output_when_building_fails(tmp_path, monkeypatch):
    """Every subset is built in memory before the first file is written: an interruption while building
    leaves no file at all."""
    ws = make_workspace(str(tmp_path / "in"), n=100, k=3)
    rk = str(tmp_path / "rk")
    process_pickle.main(dump_args(ws["paths"], "--model_name", "m", "--output_dir", rk))
    real = subset_files.records_json
    for fail_at, argv in (
        (2, dump_args(ws["paths"], "--percentage", "10", "--lp1", "--lp1_approx", "--clust_rand", "--output_dir", str(tmp_path / "b"))),
        (5, ["--dataset", ws["paths"]["dataset"], "--l1_ranking_file", os.path.join(rk, "m-l1_ranking.csv"), "--lp1",
             "--output_dir", str(tmp_path / "a")]),
    ):
        calls = []

        def boom(el, idx, fail_at=fail_at, calls=calls):
            calls.append(1)
            if len(calls) == fail_at:
                raise KeyboardInterrupt
            return real(el, idx)

        monkeypatch.setattr(subset, "records_json", boom)
        with pytest.raises(KeyboardInterrupt):
            subset.main(argv)
        assert len(calls) == fail_at
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_random_module_state_is_not_touched(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=60, k=3)
    random.seed(123)
    a = random.random()
    random.seed(123)
    subset.main(dump_args(ws["paths"], "--percentage", "10", "--clust_rand", "--output_dir", str(tmp_path / "o")))
    assert random.random() == a


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _snapshot(d):
    """{relative path: (bytes, mtime_ns)} of every file under d, hidden ones included."""
    return {p: (read_bytes(os.path.join(d, p)), os.stat(os.path.join(d, p)).st_mtime_ns) for p in listdir_all(d)}


def test_a_failed_write_changes_no_file(tmp_path, monkeypatch):
    """A full disk at the 10th of the 22 files (half of it written, then ENOSPC): the output folder is
    exactly as before (the 22 files of an earlier run untouched, no new or temporary file), and a folder
    that did not exist is not created. Without the failure the same run replaces all 22."""
    ws = make_workspace(str(tmp_path / "in"), n=200, k=5)
    out, first = _run_a(ws, tmp_path, "--lp1", "--lp1_approx", "--clust_rand")
    before = _snapshot(out)
    assert len(before) == 22
    # a second run whose every file differs (other records and scores), into the same folder
    ws2 = make_workspace(str(tmp_path / "in2"), n=200, k=5, seed=1)
    rk2 = str(tmp_path / "rk2")
    process_pickle.main(dump_args(ws2["paths"], "--model_name", "tiny-m", "--output_dir", rk2))
    argv = ["--dataset", ws2["paths"]["dataset"], "--l1_ranking_file", os.path.join(rk2, "tiny-m-l1_ranking.csv"),
            "--lp1", "--lp1_approx", "--clust_rand"]
    real, calls = record_io.write_subset, []

    def disk_full_at_10th(path, text):
        calls.append(path)
        if len(calls) == 10:
            with open(path, "w") as f:   # a truncated file, then the error
                f.write(text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, text)

    monkeypatch.setattr(record_io, "write_subset", disk_full_at_10th)
    for target in (out, str(tmp_path / "new" / "data")):
        calls.clear()
        with pytest.raises(UserError, match=r"cannot write .*_lp1_approx-tiny-m\.json: .*No space left on device; no file"):
            subset.main([*argv, "--output_dir", target])
        assert len(calls) == 10
    after = _snapshot(out)
    assert sorted(after) == sorted(before), f"files added or removed by the failed run: {set(after) ^ set(before)}"
    changed = [p for p in before if after[p] != before[p]]
    assert not changed, f"the failed run changed {len(changed)} of the earlier run's files: {changed}"
    assert not os.path.exists(tmp_path / "new" / "data")
    monkeypatch.setattr(record_io, "write_subset", real)
    second = subset.main([*argv, "--output_dir", out])
    assert listdir_all(out) == sorted(before)
    assert all(read_bytes(p) != before[os.path.relpath(p, out)][0] for p in second)   # all 22 replaced
    assert [os.path.basename(p) for p in second] == [os.path.basename(p) for p in first]


def test_kill_9_while_writing_leaves_only_a_hidden_folder(tmp_path):
    """A real SIGKILL at the 10th of 22 files (subprocess): the output folder holds no subset file, only the
    hidden .subset-*.tmp folder with the 9 finished files (and the 10th's temporary file)."""
    import signal
    import subprocess
    import sys

    ws = make_workspace(str(tmp_path / "in"), n=120, k=4)
    rk = str(tmp_path / "rk")
    process_pickle.main(dump_args(ws["paths"], "--model_name", "m", "--output_dir", rk))
    out = tmp_path / "out"
    argv = ["--dataset", ws["paths"]["dataset"], "--l1_ranking_file", os.path.join(rk, "m-l1_ranking.csv"),
            "--lp1", "--lp1_approx", "--clust_rand", "--output_dir", str(out)]
    script = (
        "import os, signal, sys, subset\nfrom small2large import record_io as data\n"
        "real, n = data.write_subset, [0]\n"
        "def write(path, text):\n"
        "    n[0] += 1\n"
        "    if n[0] == 10:\n"
        "        with open(path + '.partial', 'w') as f: f.write(text[:100])\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(path, text)\n"
        "data.write_subset = write\n"
        "subset.main(sys.argv[1:])\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    top = os.listdir(out)
    assert len(top) == 1 and top[0].startswith(".subset-") and top[0].endswith(".tmp"), top
    assert len(os.listdir(out / top[0])) == 10   # 9 finished files + the partial 10th, all hidden in the folder


# ---------------------------------------------------------------------------------------------
# The dumps interface and the score table compute the same signals (scores.build_score_table)


def _score_table(ws, path, n_dumps):
    from small2large import score_table

    recs = record_io.load(ws["paths"]["dataset"]).views
    df = score_table.build_score_table(recs, ws["labels"], [np.asarray(p) for p in ws["p"][:n_dumps]])
    score_table.write_score_table(path, df, score_table.table_meta(df, "m"))
    return path


def test_interface_b_with_three_dumps_equals_the_score_table(tmp_path):
    """--epoch2 without --epoch3: Pn is P2 for LP(1), clust_rand's sorting and the unlearned flags, as in
    the score table (was: no LP(1), clust_rand by LP(1)-approx, unlearned from P1)."""
    ws = make_workspace(str(tmp_path / "in"), n=200, k=5)
    pth = ws["paths"]
    table = _score_table(ws, str(tmp_path / "m-scores.parquet"), 3)
    three = ["--dataset", pth["dataset"], "--clustering", pth["clustering"], "--epoch0", pth["epoch0"],
             "--epoch1", pth["epoch1"], "--epoch2", pth["epoch2"]]
    for i, kinds in enumerate((["--lp1_approx", "--clust_rand"], ["--lp1"])):
        kinds = kinds + ["--percentage", "10", "--model_name", "m", "--exclude_unlearned"]
        res_b = subset.main(three + kinds + ["--output_dir", str(tmp_path / f"b{i}")])
        subset.main(["--dataset", pth["dataset"], "--scores", table, *kinds, "--output_dir", str(tmp_path / f"c{i}")])
        names = sorted(os.listdir(tmp_path / f"b{i}"))
        assert names == sorted(os.listdir(tmp_path / f"c{i}")) and len(names) == 2 - i
        for name in names:
            assert read_text(tmp_path / f"b{i}" / name) == read_text(tmp_path / f"c{i}" / name), name
        if i == 0:
            res_rand = res_b
    # LP(1) from P2, by hand

    trunc = (ws["p"][0] == 1.0) & (ws["p"][1] == 1.0) & (ws["p"][2] == 1.0)
    unlearned = lp.unlearned_mask(ws["p"][0], ws["p"][2], ws["labels"], truncated=trunc)
    l1 = np.array(ref_lp1(ws["p"][0], ws["p"][1], ws["p"][2]))
    got = res_b[str(tmp_path / "b1" / "10_low_lp1-m-nounlearned.json")].tolist()
    assert got == ref_split(ws["labels"], l1, 10, "low", eligible=~unlearned)
    # clust_rand draws from the clusters sorted by that LP(1), not by LP(1)-approx
    want = ref_clust_rand(ws["labels"], l1, [10], eligible=~unlearned)[10]
    assert res_rand[str(tmp_path / "b0" / "10_clust_rand-m-nounlearned.json")].tolist() == want


def test_clust_rand_on_a_one_dump_table_is_a_user_error(tmp_path, capsys):
    from utils import run_cli

    ws = make_workspace(str(tmp_path / "in"), n=60, k=3)
    table = _score_table(ws, str(tmp_path / "p0.parquet"), 1)
    rc = run_cli(subset.main, ["--dataset", ws["paths"]["dataset"], "--scores", table, "--metric", "p0",
                               "--clust_rand", "--percentage", "10", "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "--clust_rand draws from clusters sorted by LP(1) or LP(1)-approx: needs at least two dumps" in err
    assert not os.path.exists(tmp_path / "o") or not os.listdir(tmp_path / "o")
