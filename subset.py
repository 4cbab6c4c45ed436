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
import contextlib
import csv
import functools
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np

import data
from scores import read_ranking_fields, unlearned_mask
from utils import (
    UserError,
    check_lengths,
    fmt_share,
    lp1,
    lp1_approx,
    run_cli,
    truncated_mask,
    validate_pplxs,
)

# The splits of interface (a): percentage -> parts written (chunk 0 "low", 1 "mid", 2 "high").
# Its key order is also the order of the per-cluster clust_rand draws (33, 25, 10, 5, 3, 1).
SPLITS = {33: ("low", "mid", "high"), 25: ("low",), 10: ("low",), 5: ("low",), 3: ("low",), 1: ("low",)}
PARTS = {"low": 0, "mid": 1, "high": 2}
KINDS = ("lp1", "lp1_approx", "clust_rand")
CLUST_RAND_SEED = 42  # the paper's random.seed(42), once per run
FAR_FROM_REQUESTED = 0.10  # warn when the achieved share differs from --percentage by more than 10% of it


# ----------------------------------------------------------------------------------------
# Pure maths


def num_chunks(percentage: float) -> int:
    """k = round(100 / p), the number of chunks a cluster is split into (Python's round: half to even).

    >>> [num_chunks(p) for p in (33, 25, 10, 5, 3, 1)]
    [3, 4, 10, 20, 33, 100]
    >>> [num_chunks(p) for p in (41, 66, 67, 100)]   # 41..66 -> 50%, 67..100 -> 100%
    [2, 2, 1, 1]
    >>> num_chunks(0.5)   # budgets below 1%: k = 200
    200
    """
    if not 0 < percentage <= 100:
        raise UserError(f"percentage {percentage} is outside (0, 100]")
    return max(1, round(100 / percentage))


def chunk_bounds(n, k: int, part: int):
    """(start, length) of chunk ``part`` when n sorted members are cut into k chunks the way
    numpy.array_split does: the first n mod k chunks hold one more. Works on arrays of n.

    >>> chunk_bounds(10, 3, 0), chunk_bounds(10, 3, 1), chunk_bounds(10, 3, 2)   # sizes 4, 3, 3
    ((0, 4), (4, 3), (7, 3))
    >>> chunk_bounds(2, 3, 2), chunk_bounds(1, 100, 0)   # clusters smaller than k
    ((2, 0), (0, 1))
    """
    if not 0 <= part < k:
        raise UserError(f"chunk {part} does not exist when splitting into {k} chunks")
    q, r = np.divmod(n, k)
    start = part * q + np.minimum(part, r)
    length = q + (part < r)
    if np.ndim(n) == 0:
        return int(start), int(length)
    return start, length


def exact_allocation(sizes, budget: int) -> np.ndarray:
    """Split ``budget`` records across clusters in proportion to their sizes, by largest remainder
    (ties go to the lower cluster number). Never more than a cluster holds; sums to ``budget``.

    >>> exact_allocation([5, 3, 2], 3).tolist()     # quotas 1.5, 0.9, 0.6
    [1, 1, 1]
    >>> exact_allocation([50, 30, 20], 10).tolist()
    [5, 3, 2]
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    if not 0 <= budget <= total:
        raise UserError(f"cannot keep {budget} of {total} records")
    if total == 0:
        return np.zeros_like(sizes)
    numer = sizes * budget  # exact integer arithmetic: quota = numer / total
    base, frac = np.divmod(numer, total)
    rest = budget - int(base.sum())
    order = np.argsort(-frac, kind="stable")
    base[order[:rest]] += 1
    return base


def sort_members(cluster: np.ndarray, metric: np.ndarray, eligible: np.ndarray | None = None):
    """Group records by cluster (ascending) and sort each cluster by metric, ties by dataset index.
    Returns (order, starts, sizes): order holds dataset indices; cluster j (the j-th non-empty one)
    is order[starts[j] : starts[j] + sizes[j]].

    >>> o, s, n = sort_members(np.array([1, 0, 1, 0, 1]), np.array([0.5, 0.2, 0.1, 0.2, 0.5]))
    >>> o.tolist(), s.tolist(), n.tolist()
    ([1, 3, 2, 0, 4], [0, 2], [2, 3])
    """
    idx = np.arange(len(cluster)) if eligible is None else np.flatnonzero(eligible)
    order = idx[np.lexsort((idx, metric[idx], cluster[idx]))]  # last key is the primary one
    if order.size == 0:
        return order, np.zeros(0, np.int64), np.zeros(0, np.int64)
    c = cluster[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    sizes = np.diff(np.r_[starts, order.size])
    return order, starts, sizes


def take_chunks(order: np.ndarray, starts: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate order[starts[j] + offsets[j] : ... + lengths[j]] over clusters j (vectorised).

    >>> take_chunks(np.array([7, 8, 9, 5, 6]), np.array([0, 3]), np.array([1, 0]), np.array([2, 1])).tolist()
    [8, 9, 5]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    shift = np.repeat(np.asarray(starts) + np.asarray(offsets) - (ends - lengths), lengths)
    return order[np.arange(total) + shift]


def chunk_geometry(sizes: np.ndarray, percentage: float, part: str, budget: int | None = None):
    """(offsets, lengths) of the kept chunk in every cluster: the paper's array_split rule, or with
    ``budget`` the exact allocation (low: lowest members, mid: central, high: highest)."""
    if budget is None:
        return chunk_bounds(sizes, num_chunks(percentage), PARTS[part])
    a = exact_allocation(sizes, budget)
    offsets = {"low": np.zeros_like(a), "mid": (sizes - a) // 2, "high": sizes - a}[part]
    return offsets, a


def clust_rand_draws(order: np.ndarray, starts: np.ndarray, counts: list[np.ndarray], seed: int = CLUST_RAND_SEED):
    """The clust_rand baseline: random seeded once; per cluster (ascending), one random.sample of the
    cluster's LP(1)-sorted members per entry of ``counts`` (counts[t][j] records from cluster j for
    draw t), in that order. Returns one list of dataset indices per draw, each in draw order."""
    rng = random.Random(seed)  # same stream as random.seed(seed) + random.sample
    out: list[list[int]] = [[] for _ in counts]
    counts_t = np.stack(counts, axis=1).tolist() if counts else []
    sizes = np.diff(np.r_[starts, order.size]).tolist()
    for j, (s, n) in enumerate(zip(starts.tolist(), sizes)):
        members = order[s:s + n].tolist()
        for t, c in enumerate(counts_t[j]):
            out[t].extend(rng.sample(members, c))
    return out


# ----------------------------------------------------------------------------------------
# Output


def record_elements(records: list[dict], need) -> np.ndarray:
    """The text of each needed record as an element of a json.dumps(..., indent=4) list (object array,
    None where not needed). Records sharing the first record's keys with string values (the usual
    Alpaca case) are encoded column by column with json's C string encoder; others go through json.dumps.

    >>> record_elements([{"a": "x"}, {"a": 1}], [0, 1]).tolist()
    ['    {\\n        "a": "x"\\n    }', '    {\\n        "a": 1\\n    }']
    """
    enc = json.encoder.encode_basestring_ascii  # what json.dumps uses with ensure_ascii=True
    out = np.full(len(records), None, dtype=object)
    need = np.unique(np.asarray(need, dtype=np.int64)).tolist()
    if not need:
        return out
    keys = tuple(records[need[0]])
    same = [i for i in need if tuple(records[i]) == keys] if keys else []
    cols = [[records[i][k] for i in same] for k in keys]
    if same and all(type(k) is str for k in keys) and all(set(map(type, c)) == {str} for c in cols):
        acc = ["    {\n        " + enc(keys[0]) + ": " + e for e in map(enc, cols[0])]
        for k, c in zip(keys[1:], cols[1:]):
            sep = ",\n        " + enc(k) + ": "
            acc = [a + sep + e for a, e in zip(acc, map(enc, c))]
        out[same] = [a + "\n    }" for a in acc]
    for i in need:
        if out[i] is None:
            out[i] = json.dumps([records[i]], indent=4)[2:-2]
    return out


def records_json(elements: np.ndarray, indices) -> str:
    """json.dumps([records[i] for i in indices], indent=4) from record_elements' pieces."""
    if len(indices) == 0:
        return "[]"
    return "[\n" + ",\n".join(elements[np.asarray(indices, dtype=np.int64)].tolist()) + "\n]"


@contextlib.contextmanager
def staged_outputs(output_dir: str):
    """Yield a new hidden folder inside ``output_dir`` to write a run's files into; when the block ends
    without error, move each file into ``output_dir`` under its name (os.replace: atomic per file).
    If the block fails, the folder and what it holds are removed (and ``output_dir`` too if this call
    created it and it is empty), so no file in ``output_dir`` is added or changed. A kill -9 while
    writing leaves the hidden .subset-*.tmp folder behind, never a partial set of outputs; a crash during
    the renames (a few milliseconds) can leave some files new and some old, never a truncated one."""
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".subset-", suffix=".tmp", dir=output_dir)
    try:
        yield stage
        for name in os.listdir(stage):
            os.replace(os.path.join(stage, name), os.path.join(output_dir, name))
        os.rmdir(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(output_dir)
        raise


# ----------------------------------------------------------------------------------------
# Inputs of the two interfaces


@dataclass
class Ranking:
    """What both interfaces select from: per record, its cluster and metrics, in dataset order."""

    cluster: np.ndarray  # int64
    metrics: dict  # "lp1" / "lp1_approx" -> float64 array
    truncated: np.ndarray | None  # bool; None when not all four dumps are known
    model_name: str
    unlearned: np.ndarray | None = None  # bool (scores.unlearned_mask); None when unknown


def read_ranking_csv(path: str, n_records: int, dataset: str) -> Ranking:
    """Read a ranking CSV in the paper's format (ours or the paper's own, empty columns included).
    LP(1) is the CSV's {m}_L1 column (what the paper sorted on); LP(1)-approx is recomputed from the
    P0/P1 columns in float64, as the paper did. Floats read back bit-exactly (tests/test_subset.py)."""
    import pandas as pd

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f))
    except (StopIteration, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: cannot read a CSV header ({e or 'empty file'})") from None
    last = header[-1] if header else ""
    if not last.endswith("_L1"):
        raise UserError(f"{path}: the last column is {last!r}; expected '{{model_name}}_L1' (the paper's ranking CSV)")
    m = last[: -len("_L1")]
    need = ["index", "cluster_num", f"{m}_P0", f"{m}_P1", f"{m}_P2", f"{m}_P3", f"{m}_L1"]
    missing = [c for c in need if c not in header]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    try:
        df = pd.read_csv(path, usecols=need, encoding="utf-8")  # pandas >= 3 parses floats round-trip exactly (tested)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a readable ranking CSV ({e})") from None
    check_lengths({dataset: n_records, path: len(df)})
    cols = {}
    for c in need:
        try:
            cols[c] = df[c].to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            raise UserError(f"{path}: column {c} holds non-numbers") from None
    for c in ("index", "cluster_num"):
        v = cols[c]
        if not (np.isfinite(v).all() and (v == np.round(v)).all() and (v >= 0).all()):
            raise UserError(f"{path}: column {c} must hold integers >= 0")
    index = cols["index"].astype(np.int64)
    if not np.array_equal(np.sort(index), np.arange(n_records)):
        raise UserError(f"{path}: the index column is not a permutation of 0..{n_records - 1} (records of {dataset})")
    p = [np.empty(n_records) for _ in range(4)]
    for e in range(4):
        p[e][index] = validate_pplxs(cols[f"{m}_P{e}"], f"{path} column {m}_P{e}")
    l1 = np.empty(n_records)
    l1[index] = cols[f"{m}_L1"]
    if not np.isfinite(l1).all():
        raise UserError(f"{path}: column {m}_L1 holds NaN or inf")
    cluster = np.empty(n_records, dtype=np.int64)
    cluster[index] = cols["cluster_num"].astype(np.int64)
    ref = lp1(p[0], p[1], p[3])
    n_off = int((~np.isclose(l1, ref, rtol=1e-9, atol=1e-12)).sum())
    if n_off:
        print(f"warning: {path}: {m}_L1 differs from (P0-P1)/(P0-P3) for {n_off} records; selecting on the {m}_L1 column")
    trunc = truncated_mask(p)
    return Ranking(cluster, {"lp1": l1, "lp1_approx": lp1_approx(p[0], p[1])}, trunc, m, unlearned_mask(p[0], p[3], cluster, truncated=trunc))


def ranking_from_dumps(args, records: list[dict]) -> Ranking:
    """The dumps interface: the signals of the score table built from the dumps given
    (scores.build_score_table, the one place they are computed; Pn = the last dump given), so the
    dumps and --scores select the same records. Truncation is known only from all four dumps.
    ``records``: the dataset's views, loaded by main()."""
    from process_pickle import EPOCHS, load_inputs
    from scores import build_score_table, score_columns

    epochs = {e: getattr(args, e) for e in EPOCHS}
    records, pp, cluster = load_inputs(args.dataset, epochs, args.clustering, records=records)
    dumps = [pp[e] for e in EPOCHS if e in pp]
    df = build_score_table(records, cluster, dumps)
    metrics = {c: df[c].to_numpy(dtype=np.float64) for c in score_columns(df)}
    trunc = df["truncated"].to_numpy(dtype=bool) if len(dumps) == len(EPOCHS) else None
    return Ranking(np.asarray(cluster, dtype=np.int64), metrics, trunc, args.model_name,
                   df["unlearned"].to_numpy(dtype=bool))


# ----------------------------------------------------------------------------------------
# Selection


@dataclass
class Split:
    kind: str  # lp1, lp1_approx, clust_rand, or any metric (a column of the score table)
    percentage: float
    part: str = "low"
    order: str = "low"  # "high": members sorted by the metric descending (the highest-scored first)

    def filename(self, model: str, suffix: str = "", ext: str = ".json") -> str:
        p = f"{self.percentage:g}"
        if self.kind == "clust_rand":
            return f"{p}_clust_rand-{model}{suffix}{ext}"
        part = "highest" if self.order == "high" else self.part  # "high" is the paper's 33_high chunk
        return f"{p}_{part}_{self.kind}-{model}{suffix}{ext}"


def select(ranking: Ranking, splits: list[Split], exact: bool, exclude_truncated: bool, n_records: int,
           interface_a: bool, exclude_unlearned: bool = False) -> list[np.ndarray]:
    """Dataset indices of every split, in output order. Every kind is one mechanism: sort each cluster
    by the split's metric (descending for order "high") and keep a chunk; clust_rand draws from the
    clusters sorted by LP(1) (LP(1)-approx when only two dumps are known)."""
    eligible = None
    if exclude_truncated and ranking.truncated is not None:
        eligible = ~ranking.truncated
    if exclude_unlearned and ranking.unlearned is not None:
        eligible = ~ranking.unlearned if eligible is None else eligible & ~ranking.unlearned
    n_eligible = n_records if eligible is None else int(eligible.sum())
    rand_key = "lp1" if "lp1" in ranking.metrics else "lp1_approx"
    sorted_by = {}
    for s in splits:
        key = (rand_key if s.kind == "clust_rand" else s.kind, s.order)
        if key not in sorted_by:
            m = ranking.metrics[key[0]]
            sorted_by[key] = sort_members(ranking.cluster, -m if key[1] == "high" else m, eligible)
    result: list = [None] * len(splits)

    def budget(p):
        return min(round(p / 100 * n_records), n_eligible) if exact else None

    for t, s in enumerate(splits):
        if s.kind != "clust_rand":
            order, starts, sizes = sorted_by[(s.kind, s.order)]
            off, length = chunk_geometry(sizes, s.percentage, s.part, budget(s.percentage))
            result[t] = take_chunks(order, starts, off, length)
    rand = [t for t, s in enumerate(splits) if s.kind == "clust_rand"]
    if rand:
        order, starts, sizes = sorted_by[(rand_key, "low")]
        counts = [chunk_geometry(sizes, splits[t].percentage, "low", budget(splits[t].percentage))[1] for t in rand]
        if interface_a:  # one stream, per cluster the draws for 33, 25, 10, 5, 3, 1 (the published files)
            draws = clust_rand_draws(order, starts, counts)
        else:  # later interface: one draw per cluster per run
            draws = [clust_rand_draws(order, starts, [c])[0] for c in counts]
        for t, d in zip(rand, draws):
            result[t] = np.asarray(d, dtype=np.int64)
    return result


def make_splits(args, ranking: Ranking, every_split: bool) -> list[Split]:
    """The splits asked for: every split of SPLITS (interface a) or one percentage, for every kind
    chosen (--lp1, --lp1_approx, --metric NAME, then --clust_rand)."""
    kinds = [(kind, "low") for kind in ("lp1", "lp1_approx") if getattr(args, kind)]
    if args.metric and (args.metric, args.order) not in kinds:
        kinds.append((args.metric, args.order))
    for kind, _ in kinds:
        if kind not in ranking.metrics:
            have = ", ".join(sorted(ranking.metrics))
            why = " (LP(1) needs three or more epochs of dumps)" if kind == "lp1" else ""
            raise UserError(f"no metric {kind!r} in this input{why}; it has: {have}")
    splits = []
    for kind, order in kinds:
        if every_split:
            splits += [Split(kind, p, part, order) for p, parts in SPLITS.items() for part in parts
                       if order == "low" or part == "low"]
        else:
            splits.append(Split(kind, args.percentage, args.part, order))
    if args.clust_rand:
        if not {"lp1", "lp1_approx"} & ranking.metrics.keys():
            raise UserError("--clust_rand draws from clusters sorted by LP(1) or LP(1)-approx: needs at least two dumps")
        splits += [Split("clust_rand", p) for p in SPLITS] if every_split else [Split("clust_rand", args.percentage)]
    return splits


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_data_arguments(p, "the dataset the perplexities were dumped for; subsets are written in its format")
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
    o = p.add_argument_group("options")
    o.add_argument("--output_dir", default="data", help="folder of the subsets (default ./data)")
    o.add_argument("--exact", action="store_true",
                   help="keep exactly p%% of the dataset, allocated to clusters by size (largest remainder); files get '-exact'")
    o.add_argument("--exclude_truncated", action="store_true",
                   help="leave out records with perplexity 1.0 in every dump (fully truncated); files get '-notrunc'")
    o.add_argument("--exclude_unlearned", action="store_true",
                   help="leave out records flagged 'unlearned' (the 5%% of each cluster whose perplexity fell least, highest "
                        "Pn/P0; with --scores the table's own rule); files get '-nounlearned'")
    args = p.parse_args(argv)
    if not (args.lp1 or args.lp1_approx or args.clust_rand or args.metric):
        p.error("choose at least one kind: --lp1, --lp1_approx, --clust_rand and/or --metric NAME")
    if args.order == "high" and args.part != "low":
        p.error("--order high keeps the highest-scored chunk; it does not combine with --part")
    if args.percentage is not None and not 0 < args.percentage <= 100:
        p.error(f"--percentage must be in (0, 100], got {args.percentage:g}")
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
    if args.percentage is not None:
        k_ = num_chunks(args.percentage)
        if PARTS[args.part] >= k_ and not args.exact:
            p.error(f"--part {args.part} needs at least {PARTS[args.part] + 1} chunks; --percentage {args.percentage:g} gives {k_}")
    if not args.model_name or any(c in args.model_name for c in "/\\\n"):
        p.error("--model_name must be non-empty and contain no '/', '\\' or newline")
    return args


def main(args) -> dict:
    """Returns {output path: dataset indices}."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    source = data.load(args.dataset, allow_chat=True, fields=data.Fields.from_args(args))
    n = len(source)
    interface_a = args.percentage is None  # (a), or (c) without --percentage: every split at once
    if args.scores:  # the score table (scores.py)
        ranking = Ranking(*read_ranking_fields(args.scores, source.views))
    elif interface_a:
        ranking = read_ranking_csv(args.l1_ranking_file, n, args.dataset)
    else:
        ranking = ranking_from_dumps(args, source.views)
    splits = make_splits(args, ranking, interface_a)
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
    chosen = select(ranking, splits, args.exact, args.exclude_truncated, n, interface_a, args.exclude_unlearned)
    suffix = ("-exact" if args.exact else "") + ("-notrunc" if args.exclude_truncated else "") + \
        ("-nounlearned" if args.exclude_unlearned else "")
    ext = data.SUBSET_EXTENSIONS[data.subset_format(source)]
    json_list_text = None
    if data.subset_format(source) == "json":  # the paper's format, byte for byte: the original records
        elements = record_elements(source.originals, np.concatenate(chosen) if chosen else [])
        json_list_text = functools.partial(records_json, elements)
    payloads = [(os.path.join(args.output_dir, s.filename(model, suffix, ext)), data.subset_payload(source, idx, json_list_text))
                for s, idx in zip(splits, chosen)]  # everything is built before anything is written
    out = {path: idx for (path, _), idx in zip(payloads, chosen)}
    try:
        with staged_outputs(args.output_dir) as stage:  # all files or none (see staged_outputs)
            for path, payload in payloads:
                try:
                    data.write_subset(os.path.join(stage, os.path.basename(path)), payload)
                except OSError as e:
                    raise UserError(f"cannot write {path}: {e}; no file in {args.output_dir} was changed") from None
    except OSError as e:
        raise UserError(f"cannot write the subsets into {args.output_dir}: {e}") from None
    for (path, _), s, idx in zip(payloads, splits, chosen):
        print(f"Generated {path}: {fmt_share(len(idx), n)}")
        if not interface_a:
            share = 100.0 * len(idx) / n
            if abs(share - s.percentage) > FAR_FROM_REQUESTED * s.percentage:
                hint = "" if args.exact else f" (k = round(100/{s.percentage:g}) = {num_chunks(s.percentage)} chunks per cluster; --exact keeps {s.percentage:g}%)"
                print(f"warning: {path} holds {share:.1f}% of the dataset, far from the requested {s.percentage:g}%{hint}")
    return out


if __name__ == "__main__":
    import sys

    sys.exit(run_cli(main))
