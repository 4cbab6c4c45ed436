"""Reading the perplexity dumps and cluster labels (safe unpickling, validation, matching lengths)
and naming the dump files that dump_pplxs.py writes (epoch-pre.pkl, epoch-1.pkl, ...)."""

from __future__ import annotations

import math
import os

import numpy as np

from utils import (
    UserError,
    safe_load_pickle,
)


def load_pplxs(path: str | os.PathLike) -> np.ndarray:
    """Load a perplexity dump (pickled list of floats, dataset order) as float64, rejecting
    NaN, inf, zero and negative values with the first offending record number."""
    obj = safe_load_pickle(path)
    if isinstance(obj, (dict, str, bytes)) or not hasattr(obj, "__len__"):
        raise UserError(f"{path}: expected a list of perplexities, got {type(obj).__name__}")
    try:
        arr = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: expected a list of numbers ({e})") from None
    if arr.ndim != 1:
        raise UserError(f"{path}: expected a flat list of perplexities, got shape {arr.shape}")
    return validate_pplxs(arr, path)


def validate_pplxs(arr: np.ndarray, where: str | os.PathLike) -> np.ndarray:
    """Raise a UserError naming ``where`` and the first bad record unless every perplexity is
    finite and > 0 (and there is at least one). Returns ``arr`` unchanged."""
    if arr.size == 0:
        raise UserError(f"{where}: the perplexity list is empty")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{where}: record {i} has perplexity {float(arr[i])!r} ({int(bad.sum())} invalid values); "
            "perplexities must be finite and > 0"
        )
    return arr


def check_lengths(named_lengths: dict[str, int]) -> int:
    """All files must describe the same records: raise a UserError naming every file and its
    length if they disagree (the paper's code silently misaligns). Returns the common length."""
    lengths = set(named_lengths.values())
    if len(lengths) > 1:
        detail = ", ".join(f"{name}: {n}" for name, n in named_lengths.items())
        raise UserError(f"length mismatch between inputs ({detail})")
    return lengths.pop()


def load_clustering(path: str | os.PathLike) -> np.ndarray:
    """Cluster number of every record (int64, dataset order) from a clustering pickle in the paper's
    format: a list of {"embed_sentence": str, "cluster_num": int}. A plain list of ints is accepted
    too. Loaded without running code (utils.safe_load_pickle); cluster numbers must be ints >= 0."""
    obj = safe_load_pickle(path)
    if not isinstance(obj, (list, tuple)):
        raise UserError(f"{path}: expected a list of {{'embed_sentence', 'cluster_num'}} records, got {type(obj).__name__}")
    if not obj:
        raise UserError(f"{path}: the clustering is empty")
    out = np.empty(len(obj), dtype=np.int64)
    for i, r in enumerate(obj):
        c = r.get("cluster_num") if isinstance(r, dict) else r
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)) or c < 0:
            raise UserError(f"{path}: record {i}: cluster_num must be an integer >= 0, got {c!r}")
        out[i] = c
    return out


def is_whole_epoch(epoch: float) -> bool:
    return abs(epoch - round(epoch)) < 1e-6


def dump_name(epoch) -> str:
    """File name of the dump taken before training ("pre"), after whole epoch k, or after a partial last
    epoch (training stopped by --max_steps or a fractional --num_train_epochs): that one gets a name of
    its own, the epoch cut (not rounded) to 2 decimals, so it never replaces a whole epoch's dump.

        >>> [dump_name(e) for e in ("pre", 2, 2.0, 7 / 3, 0.5, 2.999)]
        ['epoch-pre.pkl', 'epoch-2.pkl', 'epoch-2.pkl', 'epoch-2.33-partial.pkl', 'epoch-0.50-partial.pkl', 'epoch-2.99-partial.pkl']
    """
    if epoch == "pre":
        return "epoch-pre.pkl"
    if is_whole_epoch(epoch):
        return f"epoch-{round(epoch)}.pkl"
    return f"epoch-{math.floor(epoch * 100 + 1e-9) / 100:.2f}-partial.pkl"
