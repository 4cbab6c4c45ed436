"""Benchmark step 3: process_pickle.py + subset.py (a) with --lp1 --lp1_approx --clust_rand, against a
re-implementation of the paper's approach (csv.writer row loop; pandas read_csv, a boolean filter and two
sort_values per cluster, numpy.array_split, json.dumps(indent=4) per split).

    python bench/bench_subset.py                      # 52,000 synthetic records, 1000 clusters, best of 3
    python bench/bench_subset.py --n 5000 --k 100 --repeat 1  # quick

Both sides run as fresh processes (interpreter start, imports, reading and writing files included), one
after the other, on the same inputs; the outputs are compared byte for byte (the synthetic scores have no
ties, so the paper's unstable sort and our (metric, index) order agree). Prints both times and the ratio.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = ("pre", "1", "2", "3")
SPLITS = {33: ("low", "mid", "high"), 25: ("low",), 10: ("low",), 5: ("low",), 3: ("low",), 1: ("low",)}
MODEL = "bench-model"


def make_inputs(d: str, n: int, k: int, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(5000)] + ["é", "quote\"", "tab\t", "new\nline"], dtype=object)
    pool = words[rng.integers(0, len(words), 200_000)].tolist()

    def texts(lo, hi):
        lens, starts = rng.integers(lo, hi, n), rng.integers(0, len(pool) - hi, n)
        return [" ".join(pool[s:s + k]) for s, k in zip(starts.tolist(), lens.tolist())]

    has_input = rng.random(n) < 0.4
    records = [{"instruction": a, "input": b if h else "", "output": c}
               for a, b, c, h in zip(texts(3, 20), texts(0, 12), texts(5, 80), has_input.tolist())]
    with open(os.path.join(d, "data.json"), "w") as f:
        json.dump(records, f)
    p0 = np.exp(rng.normal(1.5, 0.6, n))
    p1 = p0 * rng.uniform(0.3, 0.95, n)
    p2 = p1 * rng.uniform(0.5, 1.0, n)
    p3 = p2 * rng.uniform(0.5, 1.0, n)
    p0[:3] = p1[:3] = p2[:3] = p3[:3] = 1.0  # a few fully truncated records (P0 == P3 -> LP(1) = 0)
    for e, p in zip(EPOCHS, (p0, p1, p2, p3)):
        with open(os.path.join(d, f"epoch-{e}.pkl"), "wb") as f:
            pickle.dump(p.tolist(), f)
    labels = rng.integers(0, k, n)
    with open(os.path.join(d, "clustering.pkl"), "wb") as f:
        pickle.dump([{"embed_sentence": "", "cluster_num": int(c)} for c in labels], f)


# ---- the paper's approach, re-implemented for timing (same maths and file formats) -----------------


def paper_process_pickle(d: str, out_csv: str) -> None:
    import csv

    with open(os.path.join(d, "data.json")) as f:
        data = json.load(f)
    sys.path.insert(0, ROOT)
    from utils import safe_load_pickle  # the paper used pickle.load; this project never does

    p = [safe_load_pickle(os.path.join(d, f"epoch-{e}.pkl")) for e in EPOCHS]
    clus = safe_load_pickle(os.path.join(d, "clustering.pkl"))
    m = MODEL
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "sample", "len_response", "cluster_num", None, f"{m}_P0", f"{m}_P1", f"{m}_P2", f"{m}_P3", None, f"{m}_L1"])
        for i, r in enumerate(data):
            s = (f"Instruction: {r['instruction']}\nInput: {r['input']}\nResponse: {r['output']}" if r["input"]
                 else f"Instruction: {r['instruction']}\nResponse: {r['output']}")
            den = p[0][i] - p[3][i]
            l1 = (p[0][i] - p[1][i]) / den if den != 0 else 0
            w.writerow([i, s, len(r["output"]), clus[i]["cluster_num"], None, p[0][i], p[1][i], p[2][i], p[3][i], None, l1])


def paper_subset(d: str, csv_path: str, out: str) -> None:
    import numpy as np
    import pandas as pd

    random.seed(42)
    with open(os.path.join(d, "data.json")) as f:
        data = json.load(f)
    df = pd.read_csv(csv_path)
    df = df.dropna(how="all", axis=1)
    m = df.columns[-1][:-3]
    df[f"{m}_Proxy"] = (df[f"{m}_P0"] - df[f"{m}_P1"]) / df[f"{m}_P0"]
    res = {}
    for c in range(df["cluster_num"].max() + 1):
        fc = df[df["cluster_num"] == c]
        il = fc.sort_values(by=[f"{m}_L1"])["index"].tolist()
        ip = fc.sort_values(by=[f"{m}_Proxy"])["index"].tolist()
        for p, parts in SPLITS.items():
            k = round(100 / p)
            for kind, lst in (("lp1", il), ("lp1_approx", ip)):
                sp = np.array_split(lst, k)
                for part in parts:
                    res.setdefault(f"{p}_{part}_{kind}-{m}.json", []).extend(sp[("low", "mid", "high").index(part)])
        for p in SPLITS:
            res.setdefault(f"{p}_clust_rand-{m}.json", []).extend(random.sample(il, len(np.array_split(il, round(100 / p))[0])))
    for name, idx in res.items():
        with open(os.path.join(out, name), "w") as f:
            f.write(json.dumps([data[i] for i in idx], indent=4))


def run_side(side: str, d: str, out: str) -> float:
    t = time.perf_counter()
    csv_dir = os.path.join(out, "l1-rankings")
    os.makedirs(csv_dir, exist_ok=True)
    csv_path = os.path.join(csv_dir, f"{MODEL}-l1_ranking.csv")
    if side == "paper":
        paper_process_pickle(d, csv_path)
        paper_subset(d, csv_path, out)
    else:
        sys.path.insert(0, ROOT)
        import process_pickle
        import subset

        e = [os.path.join(d, f"epoch-{x}.pkl") for x in EPOCHS]
        process_pickle.main(["--dataset", os.path.join(d, "data.json"), "--epoch0", e[0], "--epoch1", e[1], "--epoch2", e[2],
                             "--epoch3", e[3], "--clustering", os.path.join(d, "clustering.pkl"), "--model_name", MODEL,
                             "--output_dir", csv_dir])
        subset.main(["--dataset", os.path.join(d, "data.json"), "--l1_ranking_file", csv_path,
                     "--lp1", "--lp1_approx", "--clust_rand", "--output_dir", out])
    return time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=52000, help="records (Alpaca: 52,002)")
    ap.add_argument("--k", type=int, default=1000, help="clusters (paper: 1000 for Alpaca)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side; the best is reported")
    ap.add_argument("--side", choices=("paper", "ours"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side:  # child process: one side, once
        print(f"{run_side(a.side, a.data, a.out):.3f}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "in")
        os.makedirs(d)
        make_inputs(d, a.n, a.k)
        best, inner = {}, {}
        for r in range(a.repeat):
            for side in ("paper", "ours"):
                out = os.path.join(tmp, f"{side}-{r}")
                os.makedirs(out)
                t = time.perf_counter()
                res = subprocess.run([sys.executable, __file__, "--side", side, "--data", d, "--out", out],
                                     capture_output=True, text=True, check=True)
                wall = time.perf_counter() - t
                best[side] = min(best.get(side, wall), wall)
                inner[side] = min(inner.get(side, 1e9), float(res.stdout.strip().splitlines()[-1]))
        names = sorted(os.listdir(os.path.join(tmp, "paper-0")))
        same = all(filecmp.cmp(os.path.join(tmp, "paper-0", x), os.path.join(tmp, "ours-0", x), shallow=False)
                   for x in names if x != "l1-rankings")
        same_csv = filecmp.cmp(*(os.path.join(tmp, f"{s}-0", "l1-rankings", f"{MODEL}-l1_ranking.csv") for s in ("paper", "ours")),
                               shallow=False)
    print(f"{a.n} records, {a.k} clusters, process_pickle + subset (a) --lp1 --lp1_approx --clust_rand, best of {a.repeat}")
    print(f"{'':28s}{'paper (pandas)':>16s}{'ours':>10s}{'ratio':>8s}")
    print(f"{'wall, fresh process (s)':28s}{best['paper']:16.2f}{best['ours']:10.2f}{best['paper'] / best['ours']:7.2f}x")
    print(f"{'in-process, after imports (s)':28s}{inner['paper']:16.2f}{inner['ours']:10.2f}{inner['paper'] / inner['ours']:7.2f}x")
    print(f"outputs identical: {len(names) - 1} subsets {'yes' if same else 'NO'}, ranking CSV {'yes' if same_csv else 'NO'}")


if __name__ == "__main__":
    main()
