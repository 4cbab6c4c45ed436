"""Step 3's selection: the paper's chunk rule per cluster (lowest-LP fraction), the exact
allocation, the clust_rand baseline, the ranking CSV reader and the splits subset.py writes."""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass

import numpy as np

from small2large.dumps import check_lengths, validate_pplxs
from small2large.lp import lp1, lp1_approx, sort_members, truncated_mask, unlearned_mask
from small2large.rankings import EPOCHS, load_inputs
from small2large.score_table import build_score_table, score_columns
from utils import UserError

# The splits of interface (a): percentage -> parts written (chunk 0 "low", 1 "mid", 2 "high").
# Its key order is also the order of the per-cluster clust_rand draws (33, 25, 10, 5, 3, 1).
SPLITS = {33: ("low", "mid", "high"), 25: ("low",), 10: ("low",), 5: ("low",), 3: ("low",), 1: ("low",)}


PARTS = {"low": 0, "mid": 1, "high": 2}


CLUST_RAND_SEED = 42  # the paper's random.seed(42), once per run


FAR_FROM_REQUESTED = 0.10  # warn when the achieved share differs from --percentage by more than 10% of it


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

    epochs = {e: getattr(args, e) for e in EPOCHS}
    records, pp, cluster = load_inputs(args.dataset, epochs, args.clustering, records=records)
    dumps = [pp[e] for e in EPOCHS if e in pp]
    df = build_score_table(records, cluster, dumps)
    metrics = {c: df[c].to_numpy(dtype=np.float64) for c in score_columns(df)}
    trunc = df["truncated"].to_numpy(dtype=bool) if len(dumps) == len(EPOCHS) else None
    return Ranking(np.asarray(cluster, dtype=np.int64), metrics, trunc, args.model_name,
                   df["unlearned"].to_numpy(dtype=bool))


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
           every_split: bool, exclude_unlearned: bool = False) -> list[np.ndarray]:
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
        if every_split:  # one stream, per cluster the draws for 33, 25, 10, 5, 3, 1 (the published files)
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
