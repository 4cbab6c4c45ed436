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
import base64
import html
import io
import json
import os
import time

import numpy as np

import data
from utils import UserError, atomic_write, check_lengths, load_records, run_cli, safe_name

DEFAULT_BUDGETS = (1.0, 5.0, 10.0, 33.0)
WITHIN_EXACT_MAX = 400  # clusters above this size use scipy's O(n log n) Kendall instead of the pairwise signs


# ----------------------------------------------------------------------------------------
# Pure maths


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
    from subset import Ranking, Split, select

    r = Ranking(np.asarray(cluster, dtype=np.int64), {"m": np.asarray(metric, dtype=np.float64)}, None, "report")
    return select(r, [Split("m", percentage)], False, False, len(cluster), False)[0]


# ----------------------------------------------------------------------------------------
# Inputs


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
    from scores import read_score_table

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


# ----------------------------------------------------------------------------------------
# Output: a list of blocks rendered as Markdown and as HTML


class Doc:
    def __init__(self):
        self.blocks: list[tuple] = []
        self.figures: dict[str, bytes] = {}

    def h(self, level, text):
        self.blocks.append(("h", level, text))

    def p(self, text):
        self.blocks.append(("p", text))

    def pre(self, text):
        self.blocks.append(("pre", text))

    def table(self, header, rows):
        self.blocks.append(("table", [str(h) for h in header], [[str(c) for c in r] for r in rows]))

    def fig(self, name, fig, caption):
        if fig is None:  # --no-figures
            return
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        import matplotlib.pyplot as plt

        plt.close(fig)
        self.figures[name] = buf.getvalue()
        self.blocks.append(("img", name, caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "pre":
                out.append("```\n" + b[1] + "\n```")
            elif b[0] == "table":
                esc = [[c.replace("|", "\\|") for c in r] for r in [b[1], *b[2]]]
                out.append("\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0]),
                                      *("| " + " | ".join(r) + " |" for r in esc[1:])]))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1]})\n\n*{b[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title) -> str:
        out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
               "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;"
               "margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}"
               "pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap}img{max-width:100%}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                out.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "pre":
                out.append(f"<pre>{html.escape(b[1])}</pre>")
            elif b[0] == "table":
                head = "".join(f"<th>{html.escape(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2])
                out.append(f"<table><tr>{head}</tr>{rows}</table>")
            elif b[0] == "img":
                data = base64.b64encode(self.figures[b[1]]).decode("ascii")
                out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b[2])}'>"
                           f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)


def fmt(x, nd=3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def matrix_rows(names, mat, nd=3):
    return [[n, *(fmt(v, nd) for v in row)] for n, row in zip(names, mat)]


# ----------------------------------------------------------------------------------------
# Figures


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("report.py needs matplotlib for its figures (pip install matplotlib)") from None
    return plt


def fig_distributions(sel: Selector, n_traj: int, seed: int, enabled: bool = True):
    if not enabled:
        return None
    plt = _plt()
    cols = [c for c in ("lp1", "lp1_approx", "ifd") if sel.has(c)]
    fig, axes = plt.subplots(1, len(cols) + 1, figsize=(4.2 * (len(cols) + 1), 3.6))
    axes = np.atleast_1d(axes)
    for ax, c in zip(axes, cols):
        v = sel.col(c)
        lo, hi = np.percentile(v, [0.5, 99.5])
        inside = (v >= lo) & (v <= hi)
        ax.hist(v[inside], bins=60, color="tab:blue" if c == "lp1" else "tab:orange" if c == "lp1_approx" else "tab:green")
        ax.axvline(np.median(v), color="k", ls="--", lw=1)
        ax.set_title(f"{c} (median {np.median(v):.3f}; {int((~inside).sum())} outside 0.5-99.5 pct)", fontsize=9)
        ax.set_ylabel("records")
    ax = axes[-1]
    pp = np.stack([sel.col(c) for c in sel.pcols], axis=1)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(pp), size=min(n_traj, len(pp)), replace=False)
    color = np.clip(sel.col("lp1"), 0, 1)[pick] if sel.has("lp1") else np.zeros(len(pick))
    cmap = plt.get_cmap("viridis")
    x = np.arange(pp.shape[1])
    for row, ci in zip(pp[pick], color):
        ax.plot(x, row, color=cmap(ci), alpha=0.3, lw=0.7)
    ax.plot(x, np.median(pp, axis=0), color="crimson", lw=2.2, label="median, all records")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.1, top=0.83, wspace=0.3)
    ax.set_yscale("log")
    ax.set_xticks(x, [c.upper() for c in sel.pcols])
    ax.set_title(f"P0->P{pp.shape[1] - 1} of {len(pick)} random records (colour: LP(1))", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(sel.name, fontsize=11)
    return fig


def fig_composition(sel: Selector, subset: np.ndarray, p: float, known: np.ndarray, enabled: bool = True):
    if not enabled:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    cl = sel.cluster
    ids = np.unique(cl[known])
    full = np.array([np.sum(cl == c) for c in ids], dtype=np.float64)
    sub = np.array([np.sum(cl[subset] == c) for c in ids], dtype=np.float64)
    ax = axes[0]
    ax.scatter(full / full.sum(), sub / max(sub.sum(), 1), s=6, alpha=0.6)
    lim = max((full / full.sum()).max(), (sub / max(sub.sum(), 1)).max()) * 1.05
    ax.plot([0, lim], [0, lim], color="grey", lw=0.8)
    ax.set_xlabel("cluster's share of the full data")
    ax.set_ylabel(f"cluster's share of the {p:g}% subset")
    ax.set_title("cluster distribution (one dot per cluster)", fontsize=9)
    ax = axes[1]
    ln = sel.df["len_response"].to_numpy() + 1
    bins = np.logspace(0, np.log10(ln.max() + 1), 40)
    ax.hist(ln, bins=bins, weights=np.full(len(ln), 1 / len(ln)), alpha=0.5, label="full data")
    ax.hist(ln[subset], bins=bins, weights=np.full(len(subset), 1 / max(len(subset), 1)), alpha=0.5,
            label=f"{p:g}% lp1 subset")
    ax.set_xscale("log")
    ax.set_ylabel("share of the records")
    ax.set_xlabel("response length + 1 (characters)")
    ax.set_title("response length distribution", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.84, wspace=0.25)
    fig.suptitle(f"{sel.name}: what the {p:g}% lowest-LP(1) subset contains", fontsize=11)
    return fig


def fig_heatmaps(names, mats, titles, suptitle, enabled: bool = True):
    if not enabled:
        return None
    plt = _plt()
    k = len(mats)
    m = len(names)
    size = max(3.2, 0.55 * m + 1.5)
    fig, axes = plt.subplots(1, k, figsize=(size * k + 1.0, size * 0.8 + 0.6))
    axes = np.atleast_1d(axes)
    for ax, mat, t in zip(axes, mats, titles):
        im = ax.imshow(mat, vmin=min(0.0, np.nanmin(mat)), vmax=1.0, cmap="viridis")
        ax.set_xticks(range(m), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(m), names, fontsize=8)
        for i in range(m):
            for j in range(m):
                if np.isfinite(mat[i, j]):
                    ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=6.5,
                            color="white" if mat[i, j] < 0.6 else "black")
        ax.set_title(t, fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.9, bottom=0.22, top=0.86, wspace=0.45)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.8)
    fig.suptitle(suptitle, fontsize=11)
    return fig


# ----------------------------------------------------------------------------------------
# The report


def snippet(record: dict, n: int = 220) -> str:
    from scores import response_text

    if "messages" in record:
        text = " / ".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    else:
        text = f"Instruction: {record['instruction']}" + (f" | Input: {record['input']}" if record.get("input") else "") \
            + f" | Response: {response_text(record)}"
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


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
    from subset import SPLITS, Ranking, Split, select

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


def build_report(sels, args, records=None) -> tuple[Doc, dict]:
    """The report document and its numbers ({"spearman", "kendall", "within_spearman", "within_kendall",
    "jaccard": {p: matrix}, "share": {p: matrix}, "names"})."""
    doc = Doc()
    names = [s.name for s in sels]
    n = len(sels[0].df)
    unknown = set(args.unknown_cluster or ())
    doc.h(1, f"Selection report: {len(sels)} selector(s), {n} records")
    doc.p("Generated by report.py from the score tables " + ", ".join(f"`{s.path}`" for s in sels) + ". "
          f"Subsets follow the paper's per-cluster rule (k = round(100/p) chunks per cluster, chunk 0 of the "
          f"clusters sorted by LP(1); subset.py --lp1). Budgets: {', '.join(f'{p:g}%' for p in args.budgets)}."
          + (f" Cluster(s) {', '.join(map(str, sorted(unknown)))} hold records of unknown cluster: they are selected "
             "from as one cluster, and left out of within-cluster statistics and cluster coverage." if unknown else ""))

    # --- per selector
    doc.h(2, "Per selector")
    rows = []
    from scores import describe_rule

    for s in sels:
        rows.append([s.name, len(s.pcols), len(np.unique(s.cluster[~np.isin(s.cluster, list(unknown))])),
                     int(s.df["truncated"].sum()), int(s.df["unlearned"].sum()), describe_rule(s.meta),
                     fmt(np.median(s.col("lp1"))) if s.has("lp1") else "n/a",
                     fmt(np.median(s.col("lp1_approx"))) if s.has("lp1_approx") else "n/a",
                     fmt(np.median(s.col("ifd"))) if s.has("ifd") else "n/a"])
    doc.table(["selector", "dumps", "clusters", "truncated", "unlearned", "unlearned rule", "median LP(1)",
               "median LP(1)-approx", "median IFD"], rows)
    known = ~np.isin(sels[0].cluster, list(unknown))
    n_known_clusters = len(np.unique(sels[0].cluster[known]))
    subsets: dict[str, dict[float, np.ndarray]] = {}
    for s in sels:
        doc.h(3, s.name)
        doc.fig(f"{safe_name(s.name)}-distributions.png", fig_distributions(s, args.n_traj, args.seed, args.figures),
                f"{s.name}: distributions of LP(1), LP(1)-approx and IFD (the columns present) and P0->Pn trajectories")
        if not s.has(args.metric):
            doc.p(f"No {args.metric} column (dumps P0..P{len(s.pcols) - 1}): no {args.metric} subsets.")
            continue
        m = s.col(args.metric)
        subsets[s.name] = {p: lowest_subset(s.cluster, m, p) for p in args.budgets}
        ln = s.df["len_response"].to_numpy()
        full_counts = np.bincount(s.cluster[known])
        rows = []
        from scipy.stats import ks_2samp

        for p, sub in subsets[s.name].items():
            ks = sub[known[sub]]
            sub_counts = np.bincount(s.cluster[ks], minlength=len(full_counts))
            ap = ""
            if s.has("lp1_approx") and args.metric != "lp1_approx":
                ja, _ = overlap_matrices([sub, lowest_subset(s.cluster, s.col("lp1_approx"), p)], n)
                ap = fmt(ja[0, 1])
            rows.append([f"{p:g}%", len(sub), f"{100 * len(sub) / n:.1f}%",
                         f"{len(np.unique(s.cluster[ks]))}/{n_known_clusters}",
                         fmt(total_variation(sub_counts[full_counts > 0], full_counts[full_counts > 0])),
                         f"{np.median(ln[sub]):.0f} / {np.median(ln):.0f}", fmt(ks_2samp(ln[sub], ln).statistic),
                         int(s.df["truncated"].to_numpy()[sub].sum()), int(s.df["unlearned"].to_numpy()[sub].sum()), ap])
        doc.table(["budget", "records", "share", "clusters covered", "cluster TVD vs full",
                   "median length subset / full", "length KS", "truncated in it", "unlearned in it",
                   "Jaccard with the LP(1)-approx subset"], rows)
        if s.has("lp1_approx") and args.metric != "lp1_approx":
            rho = spearman_matrix(np.stack([m, s.col("lp1_approx")], axis=1))[0, 1]
            doc.p(f"Spearman of {args.metric} and LP(1)-approx (the one-epoch selector) over all records: {fmt(rho)}.")
        p_show = 10.0 if 10.0 in subsets[s.name] else args.budgets[0]
        doc.fig(f"{safe_name(s.name)}-composition.png", fig_composition(s, subsets[s.name][p_show], p_show, known, args.figures),
                f"{s.name}: cluster shares and response lengths of the {p_show:g}% subset vs the full data")
        if records is not None:
            doc.pre(examples_text(s, records, m, known, args))

    # --- across selectors
    numbers = {"names": names}
    withm = [s for s in sels if s.has(args.metric)]
    if len(withm) >= 2:
        wn = [s.name for s in withm]
        x = np.stack([s.col(args.metric) for s in withm], axis=1)
        t0 = time.perf_counter()
        sp, kt = spearman_matrix(x), kendall_matrix(x)
        wsp, wkt, used = within_cluster_correlations(x, withm[0].cluster, args.min_cluster_size, unknown)
        numbers.update(spearman=sp, kendall=kt, within_spearman=wsp, within_kendall=wkt, within_clusters=used,
                       names=wn, seconds_correlations=time.perf_counter() - t0)
        doc.h(2, f"Across selectors: do they rank the records alike? ({args.metric})")
        doc.p(f"Spearman and Kendall tau-b of the {args.metric} values over all {n} records; within clusters: the mean "
              f"over the {used} clusters of >= {args.min_cluster_size} members of the per-cluster coefficient.")
        for title, mat in (("Spearman, all records", sp), ("Kendall tau-b, all records", kt),
                           ("Spearman, within clusters (mean)", wsp), ("Kendall tau-b, within clusters (mean)", wkt)):
            doc.h(4, title)
            doc.table(["", *wn], matrix_rows(wn, mat))
        doc.fig("rank-agreement.png", fig_heatmaps(wn, [sp, kt, wsp, wkt], ["Spearman", "Kendall", "Spearman within clusters",
                                                                            "Kendall within clusters"],
                                                   f"rank agreement of {args.metric}", args.figures),
                f"Rank agreement of {args.metric} between selectors")
        doc.h(2, "Across selectors: do they choose the same records?")
        doc.p("For every budget, the lowest-" + args.metric + " subsets: Jaccard |A & B| / |A | B|, and the share "
              "|A & B| / |A| of the row's subset that is also in the column's.")
        numbers["jaccard"], numbers["share"] = {}, {}
        for p in args.budgets:
            jac, sh = overlap_matrices([subsets[nm][p] for nm in wn], n)
            numbers["jaccard"][p], numbers["share"][p] = jac, sh
            doc.h(4, f"{p:g}% subsets: Jaccard")
            doc.table(["", *wn], matrix_rows(wn, jac))
            doc.h(4, f"{p:g}% subsets: share of the row's subset found in the column's")
            doc.table(["", *wn], matrix_rows(wn, sh))
        doc.fig("subset-overlap.png", fig_heatmaps(wn, [numbers["jaccard"][p] for p in args.budgets],
                                                   [f"{p:g}% Jaccard" for p in args.budgets], "subset overlap", args.figures),
                "Jaccard overlap of the subsets of every budget")
    if args.published:
        doc.h(2, "Published subsets against regenerated ones")
        rows = published_comparison(sels, load_published(args.published), n)
        doc.p("Each published subset (selector = the model part of its key) against the one subset.py's selection "
              "makes from the score table. Records of unknown cluster are not in any published subset, so a cluster "
              "of them lowers the Jaccard while every known cluster can match." if rows else
              "No published subset key starts with a selector's name.")
        if rows:
            doc.table(["selector", "subset", "published", "regenerated", "Jaccard", "share of published regenerated"], rows)
    return doc, numbers


def examples_text(s: Selector, records, m: np.ndarray, known: np.ndarray, args) -> str:
    ids = np.unique(s.cluster[known])
    sizes = np.array([np.sum(s.cluster == c) for c in ids])
    ids = ids[sizes >= 2 * args.n_examples]
    if ids.size == 0:
        return "(no cluster large enough for examples)"
    pick = ids[np.linspace(0, len(ids) - 1, min(args.example_clusters, len(ids))).round().astype(int)]
    lines = []
    for c in pick:
        mem = np.flatnonzero(s.cluster == c)
        o = mem[np.lexsort((mem, m[mem]))]
        lines.append(f"cluster {c} ({len(mem)} records), {args.metric}:")
        for tag, part in (("lowest", o[: args.n_examples]), ("highest", o[::-1][: args.n_examples])):
            for i in part:
                lines.append(f"  {tag:7s} {m[i]: .4f}  #{i}: {snippet(records[i])}")
    return "\n".join(lines)


def write_outputs(doc: Doc, out_dir: str, title: str) -> list[str]:
    paths = []
    try:
        for name, data in doc.figures.items():
            path = os.path.join(out_dir, name)
            with atomic_write(path, "wb", encoding=None) as f:
                f.write(data)
            paths.append(path)
        for name, text in (("report.md", doc.markdown()), ("report.html", doc.html(title))):
            path = os.path.join(out_dir, name)
            with atomic_write(path) as f:
                f.write(text)
            paths.append(path)
    except OSError as e:
        raise UserError(f"cannot write the report into {out_dir}: {e}") from None
    return paths


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scores", nargs="+", required=True, metavar="FILE.parquet",
                   help="score tables from process_pickle.py, one per selector, all for the same dataset")
    p.add_argument("--names", nargs="+", default=None, help="a name per score table (default: its model name)")
    p.add_argument("--output_dir", default="report", help="folder of report.md, report.html and the PNGs (default ./report)")
    data.add_data_arguments(p, "the dataset (optional): checked against the tables' record hashes; adds the lowest and "
                               "highest scored records of a few clusters as text", required=False)
    p.add_argument("--published", default=None, metavar="published.json",
                   help="published subsets (the paper fixture's published.json: {'subsets': {'MODEL/KIND/SPLIT': "
                        "{'indices': [...]}}}) to compare with the regenerated ones; MODEL must be a selector's name")
    p.add_argument("--metric", default="lp1", help="the score the selectors are compared and subsets made by (default lp1)")
    p.add_argument("--budgets", nargs="+", type=float, default=list(DEFAULT_BUDGETS),
                   help="subset percentages compared (default 1 5 10 33; the paper's rule, k = round(100/p))")
    p.add_argument("--unknown_cluster", nargs="*", type=int, default=[],
                   help="cluster number(s) holding records of unknown cluster: left out of within-cluster statistics "
                        "and cluster coverage (e.g. 1000 for the paper's Alpaca labels with nulls put in cluster K)")
    p.add_argument("--min_cluster_size", type=int, default=3,
                   help="within-cluster correlations use clusters with at least this many members (default 3)")
    p.add_argument("--example_clusters", type=int, default=3, help="clusters whose records are shown as text (default 3)")
    p.add_argument("--n_examples", type=int, default=2, help="lowest and highest records shown per cluster (default 2)")
    p.add_argument("--n_traj", type=int, default=200, help="records in the P0->Pn trajectory plot (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the trajectory sample (default 0)")
    p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the figures (default); --no-figures writes the tables and text only (faster)")
    args = p.parse_args(argv)
    given = [f"--{n}_field" for n in data.FIELD_HELP if getattr(args, f"{n}_field") is not None]
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
    records = load_records(args.dataset, allow_chat=True, fields=data.Fields.from_args(args)) if args.dataset else None
    sels = load_selectors(args.scores, args.names, records)
    doc, numbers = build_report(sels, args, records)
    paths = write_outputs(doc, args.output_dir, f"Selection report ({len(sels)} selectors)")
    numbers["paths"] = paths
    numbers["seconds"] = time.perf_counter() - t0
    print(f"report of {len(sels)} selector(s) over {len(sels[0].df)} records in {numbers['seconds']:.1f} s")
    print(f"Generated {os.path.join(args.output_dir, 'report.md')} and report.html ({len(doc.figures)} figures)")
    return numbers


if __name__ == "__main__":
    import sys

    sys.exit(run_cli(main))
