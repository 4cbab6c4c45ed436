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
import csv
import itertools
import os

import numpy as np

import data
from clustering import load_clustering
from data import alpaca_text
from manifest import check_dumps
from scores import add_arguments as add_score_arguments
from scores import check_arguments as check_score_arguments
from scores import write_from_args as write_score_table_from_args
from utils import (
    UserError,
    atomic_write,
    check_lengths,
    fmt_share,
    load_pplxs,
    load_records,
    lp1,
    lp1_approx,
    run_cli,
    truncated_mask,
)

EPOCHS = ("epoch0", "epoch1", "epoch2", "epoch3")  # P0 (before training), P1, P2, P3 (after epochs 1..3)


def sample_text(record: dict) -> str:
    """The CSV's ``sample`` column for one record.

    >>> sample_text({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    'Instruction: Add.\\nInput: 2 and 3\\nResponse: 5'
    >>> sample_text({"instruction": "Name a colour.", "input": "", "output": "Red"})
    'Instruction: Name a colour.\\nResponse: Red'
    """
    if record.get("input", ""):
        return f"Instruction: {record['instruction']}\nInput: {record['input']}\nResponse: {record['output']}"
    return f"Instruction: {record['instruction']}\nResponse: {record['output']}"


def csv_header(model_name: str) -> list[str]:
    """The paper's CSV header; "" marks its two empty columns."""
    m = model_name
    return ["index", "sample", "len_response", "cluster_num", "", f"{m}_P0", f"{m}_P1", f"{m}_P2", f"{m}_P3", "", f"{m}_L1"]


def load_inputs(dataset: str, epochs: dict[str, str | None], clustering: str | None, fields=None,
                noprompt: tuple[str, int] | None = None, records: list[dict] | None = None):
    """Load and cross-check the dataset (record views; ``fields``: a data.Fields), the perplexity dumps
    given in ``epochs`` (name -> path or None) and the clustering pickle. Returns (records, {name:
    float64 array}, cluster int64 array or None). A length mismatch raises a UserError naming every
    file and its length. ``noprompt``: (path, epoch) of the --noprompt dump, checked against the
    manifest with the others (same run, at that epoch). ``records``: the dataset's views when the
    caller has loaded them already (subset.py), so it is not read twice."""
    if records is None:
        records = load_records(dataset, allow_chat=True, fields=fields)
    pplxs = {name: load_pplxs(path) for name, path in epochs.items() if path}
    cluster = load_clustering(clustering) if clustering else None
    lengths = {dataset: len(records)}
    for name, path in epochs.items():
        if path:
            lengths[f"{path} (--{name})"] = len(pplxs[name])
    if clustering:
        lengths[f"{clustering} (--clustering)"] = len(cluster)
    check_lengths(lengths)
    check_dumps(dataset, len(records), {name: path for name, path in epochs.items() if path},  # manifests, if any
                noprompt=noprompt)
    return records, pplxs, cluster


def write_ranking_csv(path: str, model_name: str, records, cluster, p0, p1, p2, p3) -> np.ndarray:
    """Write the paper's ranking CSV atomically; returns the LP(1) values (float64)."""
    l1 = lp1(p0, p1, p3)
    texts = [alpaca_text(r) for r in records]  # a chat record's text, built once
    l1_cells: list = l1.tolist()
    for i in np.flatnonzero(p0 == p3).tolist():
        l1_cells[i] = 0  # the paper wrote the integer 0 when P0 == P3; same value on reading
    try:
        with atomic_write(path) as f:
            w = csv.writer(f)  # the paper's writer: excel dialect, \r\n line ends, repr floats
            w.writerow(csv_header(model_name))
            w.writerows(
                zip(
                    range(len(records)),
                    map(sample_text, texts),
                    (len(t["output"]) for t in texts),
                    cluster.tolist(),
                    itertools.repeat(""),
                    p0.tolist(), p1.tolist(), p2.tolist(), p3.tolist(),
                    itertools.repeat(""),
                    l1_cells,
                )
            )
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None
    return l1


def plot_lp(path: str, model_name: str, p0, p1, p2, p3, n_traj: int = 300, seed: int = 0):
    """Figure with the distribution of LP(1) and LP(1)-approx and the P0->P3 trajectories of a random
    sample of records, saved to ``path`` (PNG). Returns the (closed) matplotlib Figure, whose axes hold
    what was drawn: axes[0] the LP(1) histogram (80 bins over the 0.5-99.5 percentiles), axes[1] the
    LP(1)-approx one, axes[2] one line per sampled record (P0, P1, P2, P3) and their median line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed (pip install -r requirements.txt)") from None
    l1, la = lp1(p0, p1, p3), lp1_approx(p0, p1)
    trunc = truncated_mask([p0, p1, p2, p3])
    n = len(p0)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    for ax, v, name, color in ((axes[0], l1, "LP(1) = (P0-P1)/(P0-P3)", "tab:blue"),
                               (axes[1], la, "LP(1)-approx = (P0-P1)/P0", "tab:orange")):
        lo, hi = np.percentile(v, [0.5, 99.5])
        inside = (v >= lo) & (v <= hi)
        ax.hist(v[inside], bins=80, color=color, alpha=0.85)
        ax.axvline(np.median(v), color="k", ls="--", lw=1, label=f"median {np.median(v):.3f}")
        ax.set_xlabel(name)
        ax.set_ylabel("records")
        ax.set_title(f"{name.split(' =')[0]} ({int((~inside).sum())} records outside the 0.5-99.5 percentiles not shown)",
                     fontsize=10)
        ax.legend(fontsize=9, loc="upper left")
        if trunc.any():
            ax.annotate(f"{int(trunc.sum())} fully truncated records\n(P = 1.0 in every dump) sit at 0",
                        xy=(0.09, 0.80), xycoords="axes fraction", fontsize=9, color="crimson", va="top")
    rng = np.random.default_rng(seed)
    pick = rng.choice(n, size=min(n_traj, n), replace=False)
    traj = np.stack([p0, p1, p2, p3], axis=1)[pick]
    ax = axes[2]
    cmap = plt.get_cmap("viridis")
    c = np.clip(l1[pick], 0, 1)
    for row, ci in zip(traj, c):
        ax.plot(range(4), row, color=cmap(ci), alpha=0.35, lw=0.8)
    ax.plot(range(4), np.median(np.stack([p0, p1, p2, p3], axis=1), axis=0), color="crimson", lw=2.5, label="median of all records")
    ax.set_yscale("log")
    ax.set_xticks(range(4), ["P0 (before)", "P1", "P2", "P3"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("response perplexity (log scale)")
    ax.set_title(f"P0->P3 of {len(pick)} random records (colour: LP(1), 0=purple .. 1=yellow)", fontsize=10)
    ax.legend(fontsize=9)
    fig.suptitle(f"{model_name}: learning percentage over {n} records", fontsize=13)
    try:
        with atomic_write(path, "wb", encoding=None) as f:
            fig.savefig(f, format="png", dpi=110)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None
    finally:
        plt.close(fig)
    return fig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_data_arguments(p, "the dataset the perplexities were dumped for")
    p.add_argument("--epoch0", required=True, help="pickle of perplexities before training (P0), e.g. dump-pplxs/epoch-pre.pkl")
    p.add_argument("--epoch1", help="pickle of perplexities after epoch 1 (P1), e.g. dump-pplxs/epoch-1.pkl "
                   "(with --epoch0 only: the one-epoch selector, LP(1)-approx; score table only, no CSV)")
    p.add_argument("--epoch2", help="pickle of perplexities after epoch 2 (P2), e.g. dump-pplxs/epoch-2.pkl")
    p.add_argument("--epoch3", help="pickle of perplexities after epoch 3 (P3), e.g. dump-pplxs/epoch-3.pkl "
                   "(the paper's CSV needs all four dumps; fewer write the score table only)")
    p.add_argument("--clustering", required=True, help="clustering pickle from clustering.py, e.g. clustering/alpaca-clustering.pkl")
    p.add_argument("--model_name", default="model", help="names the CSV and its columns, e.g. alpaca-llama2-7b (paper default: model)")
    p.add_argument("--output_dir", default="l1-rankings", help="folder of the CSV {output_dir}/{model_name}-l1_ranking.csv (default ./l1-rankings)")
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
                                       data.Fields.from_args(args),
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
