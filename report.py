"""A selection report from score tables: what each selector chose, why, and whether selectors agree.

    python report.py --scores l1-rankings/alpaca-opt-350m-scores.parquet l1-rankings/alpaca-llama2-7b-scores.parquet \\
        --dataset data/alpaca_data.json --output_dir report/

writes report/report.md, a self-contained report/report.html (figures embedded as base64 PNG) and the
PNG figures beside them. The score tables come from process_pickle.py (one per selector model, all for
the same dataset: their record hashes must agree).

Per selector: the distributions of LP(1), LP(1)-approx and IFD (the columns present); the P0->Pn
trajectories of a random sample; truncated and unlearned counts; for every budget, the lp1 subset
under the paper's per-cluster rule (k = round(100/p) chunks per cluster, chunk 0; subset.py --lp1):
its size, clusters covered, how far its cluster distribution is from the full data's (total
variation distance, 0 = same shares, 1 = disjoint) and how its response lengths differ (medians,
two-sample Kolmogorov-Smirnov statistic); how close the one-epoch selector's LP(1)-approx subsets come
to LP(1)'s (Jaccard).
Across selectors (the paper's question: does a small selector pick what a large one picks?): Spearman
and Kendall (tau-b) correlation of their rankings by --metric (lp1), overall and within clusters, and
for each budget the overlap of their subsets: Jaccard |A & B| / |A | B| and the share |A & B| / |A| of
the row's subset found in the column's; as tables and heat maps.
Within clusters = the mean over clusters of >= --min_cluster_size (3) members of the per-cluster
coefficient; a cluster where one selector's scores are all equal (coefficient undefined) is left out
of that pair's mean; clusters numbered --unknown_cluster are left out (records of unknown cluster,
e.g. the paper's null labels put into one extra cluster), as they are from cluster coverage.
With --dataset (any format of data.py; --instruction_field, --input_field, --output_field and
--messages_field map other column names, as in process_pickle.py): the lowest and highest scored
records of a few clusters, as text.
With --published (the paper fixture's published.json): each published lp1 / lp1_approx / clust_rand
subset against the one regenerated from the table (subset.py's selection), as Jaccard.
"""

from __future__ import annotations

import argparse
import os
import time

from small2large import claims, record_io
from small2large.record_io import load_records
from small2large.report_doc import _plt, build_report, write_outputs
from small2large.report_stats import DEFAULT_BUDGETS, load_selectors
from utils import HelpFormatter, run_cli

# ----------------------------------------------------------------------------------------
# The report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--scores", nargs="+", required=True, metavar="FILE.parquet",
                   help="score tables from process_pickle.py, one per selector, all for the same dataset")
    p.add_argument("--names", nargs="+", default=None, help="a name per score table (default: its model name)")
    p.add_argument("--output_dir", default="report", help="folder of report.md, report.html and the PNGs")
    p.add_argument("--steal_claim", action="store_true",
                   help="write --output_dir even if another run claims it (see docs/troubleshooting.md)")
    record_io.add_data_arguments(p, "the dataset (optional): checked against the tables' record hashes; adds the lowest and "
                               "highest scored records of a few clusters as text", required=False)
    p.add_argument("--published", default=None, metavar="published.json",
                   help="published subsets (the paper fixture's published.json: {'subsets': {'MODEL/KIND/SPLIT': "
                        "{'indices': [...]}}}) to compare with the regenerated ones; MODEL must be a selector's name")
    p.add_argument("--metric", default="lp1", help="the score the selectors are compared and subsets made by")
    p.add_argument("--budgets", nargs="+", type=float, default=list(DEFAULT_BUDGETS),
                   help="subset percentages compared (default 1 5 10 33; the paper's rule, k = round(100/p))")
    p.add_argument("--unknown_cluster", nargs="*", type=int, default=[],
                   help="cluster number(s) holding records of unknown cluster: left out of within-cluster statistics "
                        "and cluster coverage (e.g. 1000 for the paper's Alpaca labels with nulls put in cluster K)")
    p.add_argument("--min_cluster_size", type=int, default=3,
                   help="within-cluster correlations use clusters with at least this many members")
    p.add_argument("--example_clusters", type=int, default=3, help="clusters whose records are shown as text")
    p.add_argument("--n_examples", type=int, default=2, help="lowest and highest records shown per cluster")
    p.add_argument("--n_traj", type=int, default=200, help="records in the P0->Pn trajectory plot")
    p.add_argument("--seed", type=int, default=0, help="seed of the trajectory sample")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the figures (default); --no-figures writes the tables and text only (faster)")
    args = p.parse_args(argv)
    given = [f"--{n}_field" for n in record_io.FIELD_HELP if getattr(args, f"{n}_field") is not None]
    if given and not args.dataset:
        p.error(f"{', '.join(given)} name(s) columns of --dataset; give --dataset")
    if args.names is not None and len(args.names) != len(args.scores):
        p.error(f"--names gives {len(args.names)} names for {len(args.scores)} score tables")
    if any(not 0 < b <= 100 for b in args.budgets):
        p.error("--budgets must be percentages in (0, 100]")
    if args.min_cluster_size < 2:
        p.error("--min_cluster_size must be >= 2")
    if min(args.example_clusters, args.n_examples, args.n_traj) < 0:
        p.error("--example_clusters, --n_examples and --n_traj must be >= 0")
    return args


def main(args) -> dict:
    """Returns the report's numbers (see build_report) plus "paths" and "seconds"."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    t0 = time.perf_counter()
    if args.figures:
        _plt()
    records = load_records(args.dataset, allow_chat=True, fields=record_io.Fields.from_args(args)) if args.dataset else None
    sels = load_selectors(args.scores, args.names, records)
    doc, numbers = build_report(sels, args, records)
    with claims.claim_folder(args.output_dir, steal=args.steal_claim):  # one run writes --output_dir
        paths = write_outputs(doc, args.output_dir, f"Selection report ({len(sels)} selectors)")
    numbers["paths"] = paths
    numbers["seconds"] = time.perf_counter() - t0
    print(f"report of {len(sels)} selector(s) over {len(sels[0].df)} records in {numbers['seconds']:.1f} s")
    print(f"Generated {os.path.join(args.output_dir, 'report.md')} and report.html ({len(doc.figures)} figures)")
    return numbers


if __name__ == "__main__":
    import sys

    sys.exit(run_cli(main))
