"""process_pickle.py's outputs: the paper's ranking CSV (index, cluster, P0..P3, LP(1),
LP(1)-approx, text) and the LP distribution plot, from dumps and cluster labels checked against
each other."""

from __future__ import annotations

import csv
import itertools

import numpy as np

from small2large.dumps import check_lengths, load_clustering, load_pplxs
from small2large.lp import lp1, lp1_approx, truncated_mask
from small2large.manifest import check_dumps
from small2large.record_io import alpaca_text, load_records
from utils import UserError, atomic_write

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
