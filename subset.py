"""Step 3b: choose, in every cluster, the records with the lowest Learning Percentage.

(a) The CSV interface that made the published subsets: every split of every chosen kind at once.

    python subset.py --dataset data/alpaca_data.json \\
        --l1_ranking_file l1-rankings/alpaca-llama2-7b-l1_ranking.csv --lp1 --lp1_approx --clust_rand

  writes data/{33_low,33_mid,33_high,25_low,10_low,5_low,3_low,1_low}_lp1-alpaca-llama2-7b.json, the same
  for lp1_approx, and data/{33,25,10,5,3,1}_clust_rand-alpaca-llama2-7b.json. The model name is the CSV's
  last column name minus "_L1". The paper's own CSVs are read as they are (empty columns included).

(b) The later interface: one percentage, straight from the dumps and the clustering pickle.

    python subset.py --dataset data/alpaca_data.json --clustering clustering/alpaca-clustering.pkl \\
        --epoch0 dump-pplxs/epoch-pre.pkl --epoch1 dump-pplxs/epoch-1.pkl \\
        --epoch2 dump-pplxs/epoch-2.pkl --epoch3 dump-pplxs/epoch-3.pkl \\
        --percentage 10 --model_name alpaca-llama2-7b --lp1

Tiny CPU run on the shipped sample (the CSV of process_pickle.py's tiny run; under a second):

    python subset.py --dataset data/sample_train.json --l1_ranking_file l1-rankings/sample-tiny-l1_ranking.csv \\
        --lp1 --lp1_approx --clust_rand
    python subset.py --dataset data/sample_train.json --l1_ranking_file l1-rankings/sample-tiny-l1_ranking.csv \\
        --lp1 --exact --exclude_truncated     # exactly p% per split, fully truncated records left out

The selection rule (the paper's): for each cluster in ascending cluster number, sort its members by
the metric, ascending, split them into k = round(100/p) contiguous chunks the way numpy.array_split
does (the first n mod k chunks are one longer) and keep chunk 0 ("low"), 1 ("mid") or 2 ("high").
k is 3, 4, 10, 20, 33, 100 for p = 33, 25, 10, 5, 3, 1. A subset is the concatenation of the chunks
over clusters, each chunk in ascending metric order, written as a JSON list of the original records
(indent 4, json.dumps defaults). Other inputs give subsets in their own format (data.py): JSONL input
gives .jsonl files (the source lines), Parquet, saved-dataset and hub input give .parquet files.
  Ties: the paper sorted with pandas' default quicksort, which is not stable, so which of several
  tied records fell inside a chunk depended on numpy's version and the CPU. Here ties are broken by
  dataset index (a stable sort on (metric, index)): deterministic, and the same on every machine.
clust_rand: Python's random, seeded with 42 once per run; per cluster, in ascending order, it draws
random.sample(members sorted by LP(1), size of that split's chunk 0). In (a) the draws for all
percentages are made per cluster in the order 33, 25, 10, 5, 3, 1 from one stream (how the published
clust_rand files were made); (b) makes one draw per cluster, like the paper's later subset.py.

(c) The score table of process_pickle.py (any of its columns; with --percentage one split, without it
    every split of (a), the same files):

    python subset.py --dataset data/alpaca_data.json --scores l1-rankings/alpaca-llama2-7b-scores.parquet \
        --metric lp1 --percentage 0.5 --exact --exclude_unlearned

One mechanism for every kind: --lp1, --lp1_approx and --metric NAME [--order low|high] all sort each
cluster by their metric (descending for --order high, files "{p}_highest_NAME-...") and keep a chunk by
the rule below; --metric lp1 --order low writes byte-identical files to --lp1. (b) computes its signals
as the score table does (scores.build_score_table): LP(1) = (P0-P1)/(P0-Pn) with Pn the last dump given
(P3 with all four: the paper's), so (b) and (c) select the same records from the same dumps. Two dumps
(--epoch0, --epoch1, or a two-dump table) are the one-epoch selector: --lp1_approx, and --clust_rand
draws from the clusters sorted by LP(1)-approx (a one-dump table has neither: --clust_rand is refused).

Beyond the paper (defaults stay faithful):
  --exact               the paper's rule keeps ceil(n/k) >= 1 records per cluster, so its "1%" of Alpaca
                        is 2.0% of the data. --exact keeps round(p% of the dataset) records, allocated
                        to clusters in proportion to their sizes (largest remainder; ties to the lower
                        cluster number), each cluster keeping its lowest-scoring members ("mid" keeps
                        the central ones, "high" the highest). Files get a "-exact" suffix.
  --exclude_truncated   records with perplexity exactly 1.0 in every dump (fully truncated prompt: no
                        response token scored) have LP(1) = 0 and are picked as "hardest"; this leaves
                        them out (files get a "-notrunc" suffix). Their number is always reported.
  --exclude_unlearned   leaves out the records flagged "unlearned" (scores.unlearned_mask: by default the 5%
                        of each cluster whose perplexity fell least; the table's own rule with --scores);
                        files get a "-nounlearned" suffix.
  --percentage below 1  works: 0.5 is k = 200 chunks per cluster (>= 1 record each), or 0.5% with --exact.
Every run prints, per split, the records kept and their share of the dataset; (b) warns when the
achieved share is far from --percentage (p from 41 to 66 gives k = 2, i.e. 50%; 67 to 100 gives 100%).
All files or none: a run's files are written into a hidden folder inside --output_dir and moved into place
once all are written (see staged_outputs); an error or a kill while writing changes no file there.
(b) checks the dumps against the manifest.json that dump_pplxs.py writes beside them, as process_pickle.py
does: one run, of --dataset, whole epochs in order (manifest.check_dumps); the paper's bare dumps pass.
"""

from __future__ import annotations

import argparse
import functools
import os

import numpy as np

from small2large import record_io
from small2large.score_table import read_ranking_fields
from small2large.selection import (
    FAR_FROM_REQUESTED,
    PARTS,
    Ranking,
    make_splits,
    num_chunks,
    ranking_from_dumps,
    read_ranking_csv,
    select,
)
from small2large.subset_files import record_elements, records_json, staged_outputs
from utils import UserError, fmt_share, run_cli

# ----------------------------------------------------------------------------------------
# Selection


def parse_args(argv=None) -> argparse.Namespace:
    p = _build_parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _build_parser() -> argparse.ArgumentParser:
    """The command line: the dataset, the three input interfaces, the kinds of subset and the options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    record_io.add_data_arguments(p, "the dataset the perplexities were dumped for; subsets are written in its format")
    _add_interface_arguments(p)
    _add_kind_arguments(p)
    _add_option_arguments(p)
    return p


def _add_interface_arguments(p: argparse.ArgumentParser) -> None:
    """The argument groups of the three input interfaces: (a) the CSV, (b) the dumps, (c) the score table."""
    a = p.add_argument_group("(a) the CSV interface: every split at once")
    a.add_argument("--l1_ranking_file", help="ranking CSV from process_pickle.py (or the paper's own)")
    b = p.add_argument_group("(b) the dumps interface: one percentage")
    b.add_argument("--clustering", help="clustering pickle from clustering.py")
    b.add_argument("--epoch0", help="perplexities before training (P0), e.g. dump-pplxs/epoch-pre.pkl")
    b.add_argument("--epoch1", help="perplexities after epoch 1 (P1)")
    b.add_argument("--epoch2", help="perplexities after epoch 2 (P2); needed for --lp1 (without it: the one-epoch "
                   "selector, --lp1_approx; --clust_rand then draws from clusters sorted by LP(1)-approx)")
    b.add_argument("--epoch3", help="perplexities after epoch 3 (P3; the paper's Pn); with all four dumps fully "
                   "truncated records are spotted. LP(1) = (P0-P1)/(P0-Pn), Pn the last dump given, as in the score table")
    b.add_argument("--percentage", type=float,
                   help="p in (0, 100]: keep chunk --part of k = round(100/p) per cluster (0.5 -> k = 200; --exact: p%% of the data)")
    b.add_argument("--part", choices=tuple(PARTS), default="low",
                   help="which chunk to keep: low (default, lowest LP), mid or high (need k >= 2 / 3)")
    b.add_argument("--model_name", default="model", help="names the output files (paper default: model)")
    c = p.add_argument_group("(c) the score table (process_pickle.py's {model_name}-scores.parquet): any of its columns")
    c.add_argument("--scores", metavar="FILE.parquet",
                   help="score table; with --percentage writes that percentage, without it every split of (a)")


def _add_kind_arguments(p: argparse.ArgumentParser) -> None:
    """The "kinds" group: which subsets to write (--lp1, --lp1_approx, --clust_rand, --metric/--order)."""
    k = p.add_argument_group("kinds (choose at least one)")
    k.add_argument("--lp1", action=argparse.BooleanOptionalAction, default=False, help="subsets by LP(1) = (P0-P1)/(P0-P3)")
    k.add_argument("--lp1_approx", action=argparse.BooleanOptionalAction, default=False, help="subsets by LP(1)-approx = (P0-P1)/P0")
    k.add_argument("--clust_rand", action=argparse.BooleanOptionalAction, default=False,
                   help="baseline: per cluster, a random sample of the same size (random seeded 42)")
    k.add_argument("--metric", metavar="NAME",
                   help="subsets by any score column (--scores: p0, lp2, lp1_approx, ifd, len_response, ...; the CSV and "
                        "dumps give the same columns of their dumps; the CSV gives lp1 and lp1_approx) with the same per-cluster "
                        "rule; --metric lp1 is --lp1")
    k.add_argument("--order", choices=("low", "high"), default="low",
                   help="--metric only: keep the lowest (default, files '{p}_low_NAME') or the highest scored "
                        "members of each cluster (files '{p}_highest_NAME')")


def _add_option_arguments(p: argparse.ArgumentParser) -> None:
    """The "options" group: the output folder and the --exact / --exclude_* variants."""
    o = p.add_argument_group("options")
    o.add_argument("--output_dir", default="data", help="folder of the subsets (default ./data)")
    o.add_argument("--exact", action="store_true",
                   help="keep exactly p%% of the dataset, allocated to clusters by size (largest remainder); files get '-exact'")
    o.add_argument("--exclude_truncated", action="store_true",
                   help="leave out records with perplexity 1.0 in every dump (fully truncated); files get '-notrunc'")
    o.add_argument("--exclude_unlearned", action="store_true",
                   help="leave out records flagged 'unlearned' (the 5%% of each cluster whose perplexity fell least, highest "
                        "Pn/P0; with --scores the table's own rule); files get '-nounlearned'")


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks argparse cannot make; a failed one exits through p.error (usage error, exit 2)."""
    if not (args.lp1 or args.lp1_approx or args.clust_rand or args.metric):
        p.error("choose at least one kind: --lp1, --lp1_approx, --clust_rand and/or --metric NAME")
    if args.order == "high" and args.part != "low":
        p.error("--order high keeps the highest-scored chunk; it does not combine with --part")
    if args.percentage is not None and not 0 < args.percentage <= 100:
        p.error(f"--percentage must be in (0, 100], got {args.percentage:g}")
    _check_interface(p, args)
    if args.percentage is not None:
        k_ = num_chunks(args.percentage)
        if PARTS[args.part] >= k_ and not args.exact:
            p.error(f"--part {args.part} needs at least {PARTS[args.part] + 1} chunks; --percentage {args.percentage:g} gives {k_}")
    if not args.model_name or any(c in args.model_name for c in "/\\\n"):
        p.error("--model_name must be non-empty and contain no '/', '\\' or newline")


def _check_interface(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exactly one input interface, (a), (b) or (c), with the flags it needs and none it does not take."""
    def refuse(names, why):
        extra = [f"--{n}" for n in names if getattr(args, n) is not None]
        if extra:
            p.error(f"{why}; it does not take {', '.join(extra)}")

    if args.scores:
        refuse(("l1_ranking_file", "clustering", "epoch0", "epoch1", "epoch2", "epoch3"),
               "--scores (interface c) reads everything from the table")
    elif args.l1_ranking_file:
        refuse(("clustering", "epoch0", "epoch1", "epoch2", "epoch3", "percentage"),
               "--l1_ranking_file (interface a) writes every split")
    else:
        missing = [f"--{n}" for n in ("clustering", "epoch0", "epoch1", "percentage") if getattr(args, n) is None]
        if (args.lp1 or args.metric == "lp1") and args.epoch2 is None:
            missing.append("--epoch2 (LP(1) = (P0-P1)/(P0-Pn), Pn the last dump given)")
        if missing:
            p.error(f"give --l1_ranking_file (interface a), --scores (c), or {', '.join(missing)} (interface b)")


def main(args) -> dict:
    """Returns {output path: dataset indices}."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    source = record_io.load(args.dataset, allow_chat=True, fields=record_io.Fields.from_args(args))
    n = len(source)
    every_split = args.percentage is None  # (a), or (c) without --percentage: every split at once
    if args.scores:  # the score table (scores.py)
        ranking = Ranking(*read_ranking_fields(args.scores, source.views))
    elif every_split:
        ranking = read_ranking_csv(args.l1_ranking_file, n, args.dataset)
    else:
        ranking = ranking_from_dumps(args, source.views)
    splits = make_splits(args, ranking, every_split)
    model = ranking.model_name
    if ranking.truncated is not None:
        n_trunc = int(ranking.truncated.sum())
        what = "left out (--exclude_truncated)" if args.exclude_truncated else "kept; --exclude_truncated leaves them out"
        print(f"fully truncated records (perplexity 1.0 in every dump, LP(1) = 0): {fmt_share(n_trunc, n)}, {what}")
    elif args.exclude_truncated:
        raise UserError("--exclude_truncated needs all four dumps (--epoch0 .. --epoch3)")
    print(f"{n} records in {len(np.unique(ranking.cluster))} clusters; model name {model!r}")
    if args.exclude_unlearned:
        if ranking.unlearned is None:
            raise UserError("--exclude_unlearned: no unlearned flags for this input")
        print(f"unlearned records (perplexity barely fell): {fmt_share(int(ranking.unlearned.sum()), n)}, left out (--exclude_unlearned)")
    chosen = select(ranking, splits, args.exact, args.exclude_truncated, n, every_split, args.exclude_unlearned)
    suffix = ("-exact" if args.exact else "") + ("-notrunc" if args.exclude_truncated else "") + \
        ("-nounlearned" if args.exclude_unlearned else "")
    ext = record_io.SUBSET_EXTENSIONS[source.fmt]
    json_list_text = None
    if source.fmt == "json":  # the paper's format, byte for byte: the original records
        elements = record_elements(source.originals, np.concatenate(chosen) if chosen else [])
        json_list_text = functools.partial(records_json, elements)
    payloads = [(os.path.join(args.output_dir, s.filename(model, suffix, ext)), record_io.subset_payload(source, idx, json_list_text))
                for s, idx in zip(splits, chosen)]  # everything is built before anything is written
    out = {path: idx for (path, _), idx in zip(payloads, chosen)}
    try:
        with staged_outputs(args.output_dir) as stage:  # all files or none (see staged_outputs)
            for path, payload in payloads:
                try:
                    record_io.write_subset(os.path.join(stage, os.path.basename(path)), payload)
                except OSError as e:
                    raise UserError(f"cannot write {path}: {e}; no file in {args.output_dir} was changed") from None
    except OSError as e:
        raise UserError(f"cannot write the subsets into {args.output_dir}: {e}") from None
    for (path, _), s, idx in zip(payloads, splits, chosen):
        print(f"Generated {path}: {fmt_share(len(idx), n)}")
        if not every_split:
            share = 100.0 * len(idx) / n
            if abs(share - s.percentage) > FAR_FROM_REQUESTED * s.percentage:
                hint = "" if args.exact else f" (k = round(100/{s.percentage:g}) = {num_chunks(s.percentage)} chunks per cluster; --exact keeps {s.percentage:g}%)"
                print(f"warning: {path} holds {share:.1f}% of the dataset, far from the requested {s.percentage:g}%{hint}")
    return out


if __name__ == "__main__":
    import sys

    sys.exit(run_cli(main))
