"""Step 3a: turn the perplexity dumps into the paper's ranking CSV (P0..P3 and LP(1) per record).

The paper's command (writes l1-rankings/alpaca-llama2-7b-l1_ranking.csv):

    python process_pickle.py --dataset data/alpaca_data.json \\
        --epoch0 dump-pplxs/epoch-pre.pkl --epoch1 dump-pplxs/epoch-1.pkl \\
        --epoch2 dump-pplxs/epoch-2.pkl --epoch3 dump-pplxs/epoch-3.pkl \\
        --clustering clustering/alpaca-clustering.pkl --model_name alpaca-llama2-7b

Tiny CPU run on the shipped sample, with a plot of the LP(1) distribution and of P0..P3 trajectories
(--plot needs matplotlib; the dumps come from dump_pplxs.py's tiny run, the clustering from clustering.py's):

    python process_pickle.py --dataset data/sample_train.json \\
        --epoch0 dump-pplxs/epoch-pre.pkl --epoch1 dump-pplxs/epoch-1.pkl \\
        --epoch2 dump-pplxs/epoch-2.pkl --epoch3 dump-pplxs/epoch-3.pkl \\
        --clustering clustering/sample-clustering.pkl --model_name sample-tiny --plot l1-rankings/sample-tiny.png

CSV columns, in the paper's order: index, sample, len_response, cluster_num, (empty), {m}_P0, {m}_P1,
{m}_P2, {m}_P3, (empty), {m}_L1; the empty columns have an empty header and empty cells, exactly as
the paper's csv.writer wrote them (pandas reads them as "Unnamed: 4" / "Unnamed: 9", all NaN).
sample = "Instruction: {instruction}\\nInput: {input}\\nResponse: {output}" (no Input line when input
is empty); len_response = number of characters of output. A chat record's instruction is its system
and user turns, its output its assistant turns, joined by newlines (data.alpaca_text). Floats are
written with repr, so reading the CSV back gives the same float64 values.

LP(1) = (P0 - P1) / (P0 - P3), and 0 when P0 == P3 (written as the integer 0, as the paper did).
Records with perplexity exactly 1.0 in every dump look fully truncated (no response token scored);
they get LP(1) = 0 and look "hardest": their number is reported (subset.py --exclude_truncated).

Also writes {output_dir}/{model_name}-scores.parquet, the score table (scores.py: P0..Pn, LP(i),
LP(1)-approx, truncated and unlearned flags, IFD with --noprompt), read by subset.py --scores and
report.py; --no_scores skips it. With fewer dumps (--epoch0 --epoch1: the one-epoch selector,
LP(1)-approx; or --epoch0 alone with --noprompt, IFD) only the score table is written: the paper's CSV
needs P0..P3.

Every input is checked: pickles are loaded without running code, and the dataset, the clustering and
the four dumps must have the same length (the paper's code silently misaligned). Dumps written by
dump_pplxs.py have a manifest.json beside them: then all four must be listed in it unchanged, come from
one run and from --dataset (sha256, record count), and none may be a partial last epoch (manifest.py);
a --noprompt dump must be that run's noprompt/epoch-*.pkl at --noprompt_epoch.
The paper's released dumps (no manifest) load as before.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from small2large import record_io
from small2large.lp import truncated_mask
from small2large.rankings import EPOCHS, load_inputs, plot_lp, write_ranking_csv
from small2large.score_table import add_arguments as add_score_arguments
from small2large.score_table import check_arguments as check_score_arguments
from small2large.score_table import write_from_args as write_score_table_from_args
from utils import HelpFormatter, fmt_share, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    record_io.add_data_arguments(p, "the dataset the perplexities were dumped for")
    p.add_argument("--epoch0", required=True, help="pickle of perplexities before training (P0), e.g. dump-pplxs/epoch-pre.pkl")
    p.add_argument("--epoch1", help="pickle of perplexities after epoch 1 (P1), e.g. dump-pplxs/epoch-1.pkl "
                   "(with --epoch0 only: the one-epoch selector, LP(1)-approx; score table only, no CSV)")
    p.add_argument("--epoch2", help="pickle of perplexities after epoch 2 (P2), e.g. dump-pplxs/epoch-2.pkl")
    p.add_argument("--epoch3", help="pickle of perplexities after epoch 3 (P3), e.g. dump-pplxs/epoch-3.pkl "
                   "(the paper's CSV needs all four dumps; fewer write the score table only)")
    p.add_argument("--clustering", required=True, help="clustering pickle from clustering.py, e.g. clustering/alpaca-clustering.pkl")
    p.add_argument("--model_name", default="model", help="names the CSV and its columns, e.g. alpaca-llama2-7b (paper default: model)")
    p.add_argument("--output_dir", default="l1-rankings", help="folder of the CSV {output_dir}/{model_name}-l1_ranking.csv")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw the LP(1) / LP(1)-approx histograms and P0..P3 trajectories (needs matplotlib)")
    add_score_arguments(p)  # the score table's flags (scores.py)
    args = p.parse_args(argv)
    given = [e for e in EPOCHS if getattr(args, e)]
    if given != list(EPOCHS[:len(given)]):
        p.error(f"give the dumps in order without gaps (--epoch0, --epoch1, ...); got {', '.join('--' + e for e in given)}")
    if args.plot and len(given) < 4:
        p.error("--plot needs the four dumps --epoch0 .. --epoch3")
    if len(given) < 4 and args.no_scores:
        p.error("with fewer than four dumps only the score table is written; drop --no_scores")
    check_score_arguments(p, args)
    if not args.model_name or any(c in args.model_name for c in "/\\,\"\n"):
        p.error("--model_name must be non-empty and contain no '/', '\\', ',', '\"' or newline")
    return args


def main(args) -> str:
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    records, pp, cluster = load_inputs(args.dataset, {e: getattr(args, e) for e in EPOCHS}, args.clustering,
                                       record_io.Fields.from_args(args),
                                       (args.noprompt, args.noprompt_epoch) if args.noprompt else None)
    dumps = [pp[e] for e in EPOCHS if e in pp]
    n = len(records)
    path = None
    if len(dumps) == 4:  # the paper's CSV
        p0, p1, p2, p3 = dumps
        path = os.path.join(args.output_dir, f"{args.model_name}-l1_ranking.csv")
        if args.plot:  # before the CSV, so a missing matplotlib leaves no partial output
            plot_lp(args.plot, args.model_name, p0, p1, p2, p3)
        write_ranking_csv(path, args.model_name, records, cluster, p0, p1, p2, p3)
    n_trunc = int(truncated_mask(dumps).sum())
    print(f"{n} records, {len(np.unique(cluster))} clusters; "
          f"fully truncated (perplexity 1.0 in every dump, LP(1) = 0): {fmt_share(n_trunc, n)}")
    if args.plot:
        print(f"Generated {args.plot}")
    if path:
        print(f"Generated {path}!")
    else:
        print(f"{len(dumps)} dumps (P0..P{len(dumps) - 1}): no CSV (the paper's format needs P0..P3), the score table only")
    scores_path = write_score_table_from_args(args, records, dumps, cluster)  # the score table (scores.py)
    return path or scores_path


if __name__ == "__main__":
    import sys

    sys.exit(run_cli(main))
