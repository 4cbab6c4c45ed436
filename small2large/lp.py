"""The Learning-Percentage formulas and the record masks built on the dumps (pure numpy).

Worked example of the Learning Percentage (the paper's Eq. 1, with 3 epochs):

    >>> import numpy as np
    >>> p0, p1, p3 = np.array([10.0, 4.0, 2.0]), np.array([6.0, 3.0, 2.0]), np.array([2.0, 2.0, 2.0])
    >>> lp1(p0, p1, p3)            # (P0-P1)/(P0-P3); 0 where P0 == P3
    array([0.5, 0.5, 0. ])
    >>> lp1_approx(p0, p1)         # (P0-P1)/P0
    array([0.4 , 0.25, 0.  ])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def lp1(p0: np.ndarray, p1: np.ndarray, p3: np.ndarray) -> np.ndarray:
    """LP(1) = (P0 - P1) / (P0 - P3), in float64; 0 where P0 == P3 (the paper's convention)."""
    p0, p1, p3 = (np.asarray(x, dtype=np.float64) for x in (p0, p1, p3))
    den = p0 - p3
    out = np.zeros_like(den)
    nz = den != 0
    np.divide(p0 - p1, den, out=out, where=nz)
    return out


def lp1_approx(p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """LP(1)-approx = (P0 - P1) / P0, in float64 (needs only the pre-training and epoch-1 dumps)."""
    p0, p1 = (np.asarray(x, dtype=np.float64) for x in (p0, p1))
    return (p0 - p1) / p0


def truncated_mask(pplxs: Sequence[np.ndarray]) -> np.ndarray:
    """Records that look fully truncated: perplexity exactly 1.0 in every dump (no response
    token was scored, so the loss was taken as 0)."""
    m = np.ones(len(pplxs[0]), dtype=bool)
    for p in pplxs:
        m &= np.asarray(p) == 1.0
    return m


UNLEARNED_TOP_SHARE = 0.05  # default rule: the 5% of each cluster whose perplexity fell least (highest Pn / P0)


def lp_columns(pplxs) -> dict[str, np.ndarray]:
    """{"lp1": ..., "lpn": ...} for dumps [P0, P1, ..., Pn]; empty when n < 2 (LP(1) with n = 1 is
    (P0-P1)/(P0-P1) = 1 for every record, so it ranks nothing).

    >>> {k: v.tolist() for k, v in lp_columns([[4.0], [3.0], [2.5], [2.0]]).items()}
    {'lp1': [0.5], 'lp2': [0.75], 'lp3': [1.0]}
    >>> lp_columns([[4.0], [3.0]])
    {}
    """
    n = len(pplxs) - 1
    if n < 2:
        return {}
    return {f"lp{i}": lp1(pplxs[0], pplxs[i], pplxs[n]) for i in range(1, n + 1)}


def ifd(p_cond, p_alone) -> np.ndarray:
    """Instruction-following difficulty: PPL(response | prompt) / PPL(response alone).

    >>> ifd([2.0, 3.0], [4.0, 3.0]).tolist()   # the prompt halves the perplexity; does not help
    [0.5, 1.0]
    """
    return np.asarray(p_cond, dtype=np.float64) / np.asarray(p_alone, dtype=np.float64)


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


def unlearned_mask(p0, pn, cluster=None, ratio: float | None = None, top_share: float = UNLEARNED_TOP_SHARE,
                   truncated=None) -> np.ndarray:
    """Records whose perplexity barely fell over training (never learned).

    Default: in every cluster (all records one cluster if ``cluster`` is None), the
    ceil(top_share x size) records with the highest Pn / P0 (ties by dataset index), truncated records
    not counted. With ``ratio``: Pn / P0 >= ratio instead. ``truncated`` records (no response token
    scored) are never flagged: they have their own flag.

    >>> unlearned_mask([10.0] * 4, [9.0, 2.0, 3.0, 8.0], cluster=[0, 0, 1, 1], top_share=0.5).tolist()
    [True, False, False, True]
    >>> unlearned_mask([10.0, 10.0, 1.0], [9.0, 2.0, 1.0], ratio=0.8, truncated=[False, False, True]).tolist()
    [True, False, False]
    """
    p0, pn = (np.asarray(x, dtype=np.float64) for x in (p0, pn))
    r = pn / p0
    trunc = np.zeros(len(r), bool) if truncated is None else np.asarray(truncated, dtype=bool)
    if ratio is not None:
        out = r >= ratio
    else:
        if not 0 < top_share <= 1:
            raise ValueError(f"top_share must be in (0, 1], got {top_share}")
        cluster = np.zeros(len(r), np.int64) if cluster is None else np.asarray(cluster)
        # per cluster, highest ratio first (truncated records last), ties by index
        order, starts, sizes = sort_members(cluster, -np.where(trunc, -np.inf, r))
        rank = np.arange(len(r)) - np.repeat(starts, sizes)  # position inside its cluster
        n_ok = np.bincount(np.searchsorted(starts, np.flatnonzero(~trunc[order]), side="right") - 1, minlength=len(starts))
        keep = np.ceil(top_share * n_ok - 1e-9).astype(np.int64)
        out = np.zeros(len(r), bool)
        out[order[rank < np.repeat(keep, sizes)]] = True
    return out & ~trunc
