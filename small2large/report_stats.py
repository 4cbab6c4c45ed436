"""The selection report's statistics: rank correlations between selectors (overall and within
clusters), overlaps of their subsets, cluster composition, and the comparison with the published
subsets."""

from __future__ import annotations

import json
import os

import numpy as np

from small2large.dumps import check_lengths
from small2large.score_table import read_score_table
from small2large.selection import SPLITS, Ranking, Split, select
from utils import UserError

DEFAULT_BUDGETS = (1.0, 5.0, 10.0, 33.0)


WITHIN_EXACT_MAX = 400  # clusters above this size use scipy's O(n log n) Kendall instead of the pairwise signs


def spearman_matrix(x: np.ndarray) -> np.ndarray:
    """Spearman correlation of every pair of columns of x (n records x m selectors), average ranks for ties.

    >>> spearman_matrix(np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])).round(6).tolist()
    [[1.0, -1.0], [-1.0, 1.0]]
    """
    from scipy.stats import rankdata

    r = rankdata(np.asarray(x, dtype=np.float64), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.atleast_2d(np.corrcoef(r, rowvar=False))


def kendall_matrix(x: np.ndarray) -> np.ndarray:
    """Kendall tau-b of every pair of columns (scipy.stats.kendalltau: O(n log n) per pair)."""
    from scipy.stats import kendalltau

    m = x.shape[1]
    out = np.eye(m)
    for i in range(m):
        for j in range(i + 1, m):
            out[i, j] = out[j, i] = kendalltau(x[:, i], x[:, j]).statistic
    return out


def _within_one(xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman and Kendall tau-b matrices of one cluster's scores (s x m); NaN where undefined."""
    from scipy.stats import rankdata

    s, m = xc.shape
    r = rankdata(xc, axis=0)
    rc = r - r.mean(axis=0)
    ss = np.sqrt((rc ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        sp = (rc.T @ rc) / np.outer(ss, ss)
    if s <= WITHIN_EXACT_MAX:
        iu = np.triu_indices(s, 1)
        sg = np.sign(xc[iu[0]] - xc[iu[1]])  # (pairs, m): sign of every pair under every selector
        nz = (sg != 0).sum(axis=0).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            kt = (sg.T @ sg) / np.sqrt(np.outer(nz, nz))  # tau-b = sum s_i s_j / sqrt(n1 n2)
    else:
        kt = kendall_matrix(xc)
    bad = ss == 0
    sp[bad, :] = sp[:, bad] = np.nan
    kt[bad, :] = kt[:, bad] = np.nan
    return sp, kt


def within_cluster_correlations(x: np.ndarray, cluster: np.ndarray, min_size: int = 3, exclude=()):
    """(Spearman, Kendall, number of clusters used): the mean over clusters with >= min_size members
    (cluster numbers in ``exclude`` left out) of the per-cluster coefficient matrices; a cluster where
    a selector's scores are all equal is left out of that selector's pairs."""
    x = np.asarray(x, dtype=np.float64)
    cluster = np.asarray(cluster)
    m = x.shape[1]
    order = np.argsort(cluster, kind="stable")
    c = cluster[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    ends = np.r_[starts[1:], len(c)]
    sums = np.zeros((2, m, m))
    counts = np.zeros((2, m, m))
    used = 0
    excl = set(int(e) for e in exclude)
    for a, b in zip(starts, ends):
        if b - a < min_size or int(c[a]) in excl:
            continue
        used += 1
        for t, mat in enumerate(_within_one(x[order[a:b]])):
            ok = np.isfinite(mat)
            sums[t][ok] += mat[ok]
            counts[t][ok] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
    return mean[0], mean[1], used


def overlap_matrices(sets: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(Jaccard, share) of subsets given as arrays of dataset indices out of n records:
    jaccard[i, j] = |Si & Sj| / |Si | Sj|, share[i, j] = |Si & Sj| / |Si| (row's subset found in column's).

    >>> j, s = overlap_matrices([np.array([0, 1, 2, 3]), np.array([2, 3, 4])], 6)
    >>> j.round(3).tolist(), s.round(3).tolist()
    ([[1.0, 0.4], [0.4, 1.0]], [[1.0, 0.5], [0.667, 1.0]])
    """
    mem = np.zeros((n, len(sets)), dtype=np.float64)
    for k, s in enumerate(sets):
        mem[np.asarray(s, dtype=np.int64), k] = 1.0
    inter = mem.T @ mem
    size = np.diag(inter)
    union = size[:, None] + size[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union, inter / size[:, None]


def total_variation(a_counts, b_counts) -> float:
    """Total variation distance between two count vectors' distributions (0 = same, 1 = disjoint).

    >>> total_variation([1, 1], [2, 0])
    0.5
    """
    a = np.asarray(a_counts, dtype=np.float64)
    b = np.asarray(b_counts, dtype=np.float64)
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())


def lowest_subset(cluster: np.ndarray, metric: np.ndarray, percentage: float) -> np.ndarray:
    """Dataset indices of the p% lowest-metric subset under the paper's per-cluster rule (subset.py's
    own selection: the same files as subset.py --lp1 for metric = LP(1))."""

    r = Ranking(np.asarray(cluster, dtype=np.int64), {"m": np.asarray(metric, dtype=np.float64)}, None, "report")
    return select(r, [Split("m", percentage)], False, False, len(cluster), False)[0]


class Selector:
    def __init__(self, name: str, path: str, df, meta: dict):
        self.name, self.path, self.df, self.meta = name, path, df, meta
        self.cluster = df["cluster_num"].to_numpy(dtype=np.int64)
        self.pcols = sorted((c for c in df.columns if c[0] == "p" and c[1:].isdigit()), key=lambda c: int(c[1:]))

    def has(self, col: str) -> bool:
        return col in self.df.columns

    def col(self, name: str) -> np.ndarray:
        return self.df[name].to_numpy(dtype=np.float64)


def load_selectors(paths, names, records) -> list[Selector]:

    sels = []
    for k, p in enumerate(paths):
        df, meta = read_score_table(p, records)
        name = names[k] if names else (meta.get("model_name") or os.path.basename(p))
        sels.append(Selector(name, p, df, meta))
    seen = {}
    for s in sels:
        if s.name in seen:
            raise UserError(f"two score tables are named {s.name!r} ({seen[s.name]}, {s.path}); give --names")
        seen[s.name] = s.path
    check_lengths({s.path: len(s.df) for s in sels})
    ref = sels[0]
    for s in sels[1:]:
        if not np.array_equal(s.df["record_sha256"].to_numpy(), ref.df["record_sha256"].to_numpy()):
            i = int(np.flatnonzero(s.df["record_sha256"].to_numpy() != ref.df["record_sha256"].to_numpy())[0])
            raise UserError(f"{s.path} and {ref.path} describe different records (record {i} differs)")
    return sels


def load_published(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--published {path}: cannot read it ({e})") from None
    subs = obj.get("subsets") if isinstance(obj, dict) else None
    if not isinstance(subs, dict):
        raise UserError(f"--published {path}: expected an object with 'subsets' (the paper fixture's published.json)")
    return subs


def published_comparison(sels, published: dict, n: int):
    """Rows (selector, key, n published, n regenerated, Jaccard, share of published regenerated)."""
    rows = []
    for s in sels:
        keys = sorted(k for k in published if k.split("/")[0] == s.name)
        if not keys:
            continue
        metrics = {c: s.col(c) for c in ("lp1", "lp1_approx") if s.has(c)}
        r = Ranking(s.cluster, metrics, None, s.name)
        splits = [Split(kind, p, part) for kind in metrics for p, parts in SPLITS.items() for part in parts]
        if "lp1" in metrics:
            splits += [Split("clust_rand", p) for p in SPLITS]
        chosen = dict(zip(((sp.kind, f"{sp.percentage:g}_{sp.part}" if sp.kind != "clust_rand" else f"{sp.percentage:g}")
                           for sp in splits), select(r, splits, False, False, n, True)))
        for key in keys:
            _, kind, split = key.split("/")
            if (kind, split) not in chosen:
                continue
            pub = np.asarray(published[key]["indices"], dtype=np.int64)
            reg = chosen[(kind, split)]
            j, sh = overlap_matrices([pub, reg], n)
            rows.append([s.name, f"{kind}/{split}", len(pub), len(reg), fmt(j[0, 1], 4), fmt(sh[0, 1], 4)])
    return rows


def fmt(x, nd=3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"
