"""The selection report on the paper's 7 released selectors, for Alpaca and Dolly (the README's matrices).

    python examples/paper_report.py PAPER_DIR --output_dir runs/paper-report

For each dataset: a clustering pickle from the fixture's clusters.json (records of unknown cluster,
null, go into one extra cluster numbered K, after the last, as tests/test_paper_data.py does), then
process_pickle.py on every model's four dumps (the paper's CSV and the score table), then report.py
over the 7 score tables with --dataset, --published and --unknown_cluster K (Alpaca: 8,404 null
records; Dolly has none). Writes {output_dir}/{dataset}/report/report.md (and .html, PNGs) and
{output_dir}/matrices.md: the LP(1) Spearman and 10% Jaccard matrices of both datasets. Nothing of the
paper's folder is copied.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils import UserError, atomic_write, run_cli, write_pickle  # noqa: E402

MODELS = ("opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "llama2-7b", "llama2-13b")
DATASETS = ("alpaca", "dolly")


def clustering_from_labels(paper_dir: str, dataset: str, path: str) -> int | None:
    """Write a clustering pickle from clusters.json (null -> cluster K); returns K if there were nulls."""
    with open(os.path.join(paper_dir, dataset, "clusters.json"), encoding="utf-8") as f:
        labels = json.load(f)
    k = max(c for c in labels if c is not None) + 1
    write_pickle(path, [{"embed_sentence": "", "cluster_num": k if c is None else c} for c in labels])
    return k if any(c is None for c in labels) else None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paper_dir", help="the paper fixture's folder (alpaca/, dolly/: data.json.gz, dump-pplxs/, clusters.json)")
    p.add_argument("--output_dir", default="runs/paper-report", help="where the tables and reports go (default runs/paper-report)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS, help="datasets to run (default both)")
    return p.parse_args(argv)


def main(args):
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    import process_pickle
    import report

    lines = ["# LP(1) agreement of the paper's 7 selectors", ""]
    for ds in args.datasets:
        src = os.path.join(args.paper_dir, ds)
        if not os.path.isdir(src):
            raise UserError(f"{src}: no such folder (give the paper fixture's folder)")
        work = os.path.join(args.output_dir, ds)
        clus = os.path.join(work, "clustering.pkl")
        unknown = clustering_from_labels(args.paper_dir, ds, clus)
        data = os.path.join(src, "data.json.gz")
        t0 = time.perf_counter()
        tables = []
        for m in MODELS:
            d = os.path.join(src, "dump-pplxs", m)
            process_pickle.main(["--dataset", data, "--clustering", clus, "--model_name", m,
                                 "--output_dir", os.path.join(work, "l1-rankings"),
                                 *(x for e, f in zip(range(4), ("pre", "1", "2", "3"))
                                   for x in (f"--epoch{e}", os.path.join(d, f"epoch-{f}.pkl")))])
            tables.append(os.path.join(work, "l1-rankings", f"{m}-scores.parquet"))
        t1 = time.perf_counter()
        nums = report.main(["--scores", *tables, "--dataset", data, "--output_dir", os.path.join(work, "report"),
                            "--published", os.path.join(src, "published.json"),
                            *(["--unknown_cluster", str(unknown)] if unknown is not None else [])])
        names = nums["names"]
        lines += [f"## {ds}: LP(1) Spearman, all records", "", _md(names, nums["spearman"])]
        lines += ["", f"## {ds}: 10% lp1 subsets, Jaccard", "", _md(names, nums["jaccard"][10.0]), "",
                  f"({ds}: process_pickle.py x 7 in {t1 - t0:.1f} s, report.py in {nums['seconds']:.1f} s, "
                  f"correlations in {nums['seconds_correlations']:.1f} s)", ""]
    path = os.path.join(args.output_dir, "matrices.md")
    with atomic_write(path) as f:
        f.write("\n".join(lines))
    print(f"Generated {path}")
    return path


def _md(names, mat) -> str:
    rows = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows += ["| " + n + " | " + " | ".join(f"{v:.2f}" for v in row) + " |" for n, row in zip(names, mat)]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(run_cli(main))
