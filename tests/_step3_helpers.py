"""Shared by the step-1/step-3 tests: synthetic inputs on disk and independent reference selections
(plain Python loops with numpy.array_split, written from the paper's description, not from subset.py)."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np

from small2large import rankings

SPLIT_LIST = [(33, "low"), (33, "mid"), (33, "high"), (25, "low"), (10, "low"), (5, "low"), (3, "low"), (1, "low")]
PART_NO = {"low": 0, "mid": 1, "high": 2}


def make_workspace(d, n=120, k=7, seed=0, ties=True, cluster_sizes=None):
    """Write data.json, epoch-{pre,1,2,3}.pkl and clustering.pkl under ``d``; return a dict of paths and
    the arrays. Cluster sizes vary (1, 2, 3, ... members) so that n mod k != 0 and clusters smaller than
    k occur; ``ties`` rounds the perplexities so that many LP values tie."""
    rng = np.random.default_rng(seed)
    if cluster_sizes is not None:
        labels = np.repeat(np.arange(len(cluster_sizes)), cluster_sizes)
        rng.shuffle(labels)
        n = len(labels)
    else:
        labels = rng.integers(0, k, n)
        labels[rng.random(n) < 0.1] = k + 2
        labels[:3] = [k, k + 1, k + 1]  # tiny clusters (1 and 2 members)
    p0 = np.exp(rng.normal(1.5, 0.5, n))
    p1 = p0 * rng.uniform(0.3, 0.95, n)
    p2 = p1 * rng.uniform(0.5, 1.0, n)
    p3 = p2 * rng.uniform(0.5, 1.0, n)
    if ties:
        p0, p1, p2, p3 = (np.round(x, 1) + 0.05 for x in (p0, p1, p2, p3))
        p3[5:9] = p0[5:9]  # P0 == P3: LP(1) = 0
    p0[10:14] = p1[10:14] = p2[10:14] = p3[10:14] = 1.0  # fully truncated records
    records = [{"instruction": f"Task {i}: say {'é' if i % 7 == 0 else 'x'} \"{i}\".", "input": "" if i % 3 else f"in\n{i}",
                "output": f"Answer {i} " * (1 + i % 5)} for i in range(n)]
    os.makedirs(d, exist_ok=True)
    paths = {"dataset": os.path.join(d, "data.json"), "clustering": os.path.join(d, "clustering.pkl")}
    with open(paths["dataset"], "w") as f:
        json.dump(records, f, indent=4)
    for name, p in zip(("pre", "1", "2", "3"), (p0, p1, p2, p3)):
        paths[f"epoch{'0' if name == 'pre' else name}"] = os.path.join(d, f"epoch-{name}.pkl")
        with open(paths[f"epoch{'0' if name == 'pre' else name}"], "wb") as f:
            pickle.dump([float(x) for x in p], f)
    with open(paths["clustering"], "wb") as f:
        pickle.dump([{"embed_sentence": "x", "cluster_num": int(c)} for c in labels], f)
    return {"paths": paths, "records": records, "labels": labels, "p": (p0, p1, p2, p3)}


def dump_args(paths, *extra):
    out = ["--dataset", paths["dataset"], "--clustering", paths["clustering"]]
    for e in ("epoch0", "epoch1", "epoch2", "epoch3"):
        out += [f"--{e}", paths[e]]
    return out + list(extra)


def ref_lp1(p0, p1, p3):
    return [(a - b) / (a - d) if a - d != 0 else 0.0 for a, b, d in zip(p0.tolist(), p1.tolist(), p3.tolist())]


def ref_lp1_approx(p0, p1):
    return [(a - b) / a for a, b in zip(p0.tolist(), p1.tolist())]


def ref_sorted_clusters(labels, metric, eligible=None):
    """{cluster: [dataset indices sorted by (metric, index)]}, clusters ascending."""
    out = {}
    for c in sorted(set(labels.tolist())):
        members = [i for i in range(len(labels)) if labels[i] == c and (eligible is None or eligible[i])]
        if members:
            out[c] = sorted(members, key=lambda i: (metric[i], i))
    return out


def ref_split(labels, metric, percentage, part, eligible=None):
    k = round(100 / percentage)
    sel = []
    for members in ref_sorted_clusters(labels, metric, eligible).values():
        sel += [int(x) for x in np.array_split(np.array(members, dtype=np.int64), k)[PART_NO[part]]]
    return sel


def ref_clust_rand(labels, lp1_values, percentages, eligible=None):
    """random.seed(42) once; per cluster, one random.sample per percentage in the given order."""
    random.seed(42)
    out = {p: [] for p in percentages}
    for members in ref_sorted_clusters(labels, lp1_values, eligible).values():
        for p in percentages:
            out[p] += random.sample(members, len(np.array_split(np.array(members), round(100 / p))[0]))
    return out


def listdir_all(d):
    res = []
    for root, _, files in os.walk(d):
        res += [os.path.relpath(os.path.join(root, f), d) for f in files]
    return sorted(res)


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_json(path):
    return json.loads(read_text(path))


def write_pickle_plain(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


# ---------------------------------------------------------------------------------------------
# The paper-data test: one (dataset, model) pair per task, run in worker processes


_CHECKER = {}


def paper_checker(paper_dir):
    """check_subsets.main of the fixture as a function argv -> (exit status, printed text), run in this
    process; the fixture's own big JSON files and dumps are parsed once per process and shared between
    calls (check_subsets.py's logic is untouched)."""
    if paper_dir in _CHECKER:
        return _CHECKER[paper_dir]
    import contextlib
    import functools
    import importlib.util
    import io
    import sys

    spec = importlib.util.spec_from_file_location("check_subsets", os.path.join(paper_dir, "check_subsets.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cache = {}
    root = os.path.abspath(paper_dir) + os.sep

    class CachedJson:
        def __getattr__(self, name):
            return getattr(json, name)

        def load(self, f):
            name = os.path.abspath(str(getattr(f, "name", "")))
            if not name.startswith(root):
                return json.load(f)
            if name not in cache:
                cache[name] = json.load(f)
            return cache[name]

    mod.json = CachedJson()
    mod.load_pplx = functools.cache(mod.load_pplx)

    def run(argv):
        old = sys.argv
        sys.argv = ["check_subsets.py", "--fixture", paper_dir, *argv]
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                try:
                    code = mod.main()
                except SystemExit as e:
                    code = e.code
        finally:
            sys.argv = old
        return code, buf.getvalue()

    _CHECKER[paper_dir] = run
    return run


def regenerate_and_check(paper_dir, dataset, model, clustering_pkl, out_dir, keys):
    """process_pickle.py + subset.py (a) --lp1 --lp1_approx --clust_rand on the paper's dump of ``model``,
    then check_subsets.py on every published subset in ``keys`` ("model/kind/split").
    Returns (printed text of our scripts, files written, [(key, exit status, report)])."""
    import contextlib
    import io

    import process_pickle
    import subset

    data = os.path.join(paper_dir, dataset, "data.json.gz")
    dumps = os.path.join(paper_dir, dataset, "dump-pplxs", model)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        csv_path = process_pickle.main(
            ["--dataset", data, "--clustering", clustering_pkl, "--model_name", model, "--output_dir", os.path.join(out_dir, "rk")]
            + [x for e, name in zip(rankings.EPOCHS, ("pre", "1", "2", "3"))
               for x in (f"--{e}", os.path.join(dumps, f"epoch-{name}.pkl"))])
        written = subset.main(["--dataset", data, "--l1_ranking_file", csv_path, "--lp1", "--lp1_approx", "--clust_rand",
                               "--output_dir", os.path.join(out_dir, "data")])
    check = paper_checker(paper_dir)
    results = []
    for key in keys:
        _, kind, split = key.split("/")
        name = f"{split}_clust_rand-{model}.json" if kind == "clust_rand" else f"{split}_{kind}-{model}.json"
        path = os.path.join(out_dir, "data", name)
        if not os.path.exists(path):
            results.append((key, None, f"{name} was not written"))
            continue
        code, report = check(["--dataset", dataset, "--model", model, "--kind", kind, "--split", split, "--subset", path])
        results.append((key, code, report))
    return buf.getvalue(), sorted(os.path.basename(p) for p in written), results
