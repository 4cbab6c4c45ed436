"""The selection report (report.py): the Markdown and HTML document, its figures and examples."""

from __future__ import annotations

import base64
import html
import io
import os
import time

import numpy as np

from small2large.rendering import response_text
from small2large.report_stats import (
    Selector,
    fmt,
    kendall_matrix,
    load_published,
    lowest_subset,
    overlap_matrices,
    published_comparison,
    spearman_matrix,
    total_variation,
    within_cluster_correlations,
)
from small2large.score_table import describe_rule
from utils import UserError, atomic_write, safe_name


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


def matrix_rows(names, mat, nd=3):
    return [[n, *(fmt(v, nd) for v in row)] for n, row in zip(names, mat)]


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


def snippet(record: dict, n: int = 220) -> str:

    if "messages" in record:
        text = " / ".join(f"{m['role']}: {m['content']}" for m in record["messages"])
    else:
        text = f"Instruction: {record['instruction']}" + (f" | Input: {record['input']}" if record.get("input") else "") \
            + f" | Response: {response_text(record)}"
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def build_report(sels, args, records=None) -> tuple[Doc, dict]:
    """The report document and its numbers ({"spearman", "kendall", "within_spearman", "within_kendall",
    "jaccard": {p: matrix}, "share": {p: matrix}, "names"})."""
    doc = Doc()
    names = [s.name for s in sels]
    n = len(sels[0].df)
    unknown = set(args.unknown_cluster or ())
    _intro(doc, sels, args, n, unknown)

    # --- per selector
    _selector_table(doc, sels, unknown)
    known = ~np.isin(sels[0].cluster, list(unknown))
    n_known_clusters = len(np.unique(sels[0].cluster[known]))
    subsets: dict[str, dict[float, np.ndarray]] = {}
    for s in sels:
        subs = _selector_section(doc, s, args, n, known, n_known_clusters, records)
        if subs is not None:
            subsets[s.name] = subs

    # --- across selectors
    numbers = {"names": names}
    withm = [s for s in sels if s.has(args.metric)]
    if len(withm) >= 2:
        _rank_agreement(doc, withm, args, n, unknown, numbers)
        _subset_overlap(doc, [s.name for s in withm], subsets, args, n, numbers)
    if args.published:
        _published_section(doc, sels, args, n)
    return doc, numbers


def _intro(doc: Doc, sels, args, n: int, unknown: set) -> None:
    """The report's title and its opening paragraph (sources, subset rule, budgets, unknown clusters)."""
    doc.h(1, f"Selection report: {len(sels)} selector(s), {n} records")
    doc.p("Generated by report.py from the score tables " + ", ".join(f"`{s.path}`" for s in sels) + ". "
          f"Subsets follow the paper's per-cluster rule (k = round(100/p) chunks per cluster, chunk 0 of the "
          f"clusters sorted by LP(1); subset.py --lp1). Budgets: {', '.join(f'{p:g}%' for p in args.budgets)}."
          + (f" Cluster(s) {', '.join(map(str, sorted(unknown)))} hold records of unknown cluster: they are selected "
             "from as one cluster, and left out of within-cluster statistics and cluster coverage." if unknown else ""))


def _selector_table(doc: Doc, sels, unknown: set) -> None:
    """The "Per selector" heading and its table of one summary row per selector."""
    doc.h(2, "Per selector")
    rows = []

    for s in sels:
        rows.append([s.name, len(s.pcols), len(np.unique(s.cluster[~np.isin(s.cluster, list(unknown))])),
                     int(s.df["truncated"].sum()), int(s.df["unlearned"].sum()), describe_rule(s.meta),
                     fmt(np.median(s.col("lp1"))) if s.has("lp1") else "n/a",
                     fmt(np.median(s.col("lp1_approx"))) if s.has("lp1_approx") else "n/a",
                     fmt(np.median(s.col("ifd"))) if s.has("ifd") else "n/a"])
    doc.table(["selector", "dumps", "clusters", "truncated", "unlearned", "unlearned rule", "median LP(1)",
               "median LP(1)-approx", "median IFD"], rows)


def _selector_section(doc: Doc, s: Selector, args, n: int, known: np.ndarray, n_known_clusters: int,
                      records) -> dict[float, np.ndarray] | None:
    """One selector's section: its distributions and, when it has the --metric column, its subsets per
    budget (returned; None without the column)."""
    doc.h(3, s.name)
    doc.fig(f"{safe_name(s.name)}-distributions.png", fig_distributions(s, args.n_traj, args.seed, args.figures),
            f"{s.name}: distributions of LP(1), LP(1)-approx and IFD (the columns present) and P0->Pn trajectories")
    if not s.has(args.metric):
        doc.p(f"No {args.metric} column (dumps P0..P{len(s.pcols) - 1}): no {args.metric} subsets.")
        return None
    m = s.col(args.metric)
    subs = {p: lowest_subset(s.cluster, m, p) for p in args.budgets}
    rows = _budget_rows(s, subs, args, n, known, n_known_clusters)
    doc.table(["budget", "records", "share", "clusters covered", "cluster TVD vs full",
               "median length subset / full", "length KS", "truncated in it", "unlearned in it",
               "Jaccard with the LP(1)-approx subset"], rows)
    if s.has("lp1_approx") and args.metric != "lp1_approx":
        rho = spearman_matrix(np.stack([m, s.col("lp1_approx")], axis=1))[0, 1]
        doc.p(f"Spearman of {args.metric} and LP(1)-approx (the one-epoch selector) over all records: {fmt(rho)}.")
    p_show = 10.0 if 10.0 in subs else args.budgets[0]
    doc.fig(f"{safe_name(s.name)}-composition.png", fig_composition(s, subs[p_show], p_show, known, args.figures),
            f"{s.name}: cluster shares and response lengths of the {p_show:g}% subset vs the full data")
    if records is not None:
        doc.pre(examples_text(s, records, m, known, args))
    return subs


def _budget_rows(s: Selector, subs: dict[float, np.ndarray], args, n: int, known: np.ndarray,
                 n_known_clusters: int) -> list[list]:
    """One row per budget of a selector's subset table: size, cluster coverage, length shift, overlaps."""
    ln = s.df["len_response"].to_numpy()
    full_counts = np.bincount(s.cluster[known])
    rows = []
    from scipy.stats import ks_2samp

    for p, sub in subs.items():
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
    return rows


def _rank_agreement(doc: Doc, withm, args, n: int, unknown: set, numbers: dict) -> None:
    """The rank-agreement section of the selectors with the --metric column; its matrices go into ``numbers``."""
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


def _subset_overlap(doc: Doc, wn: list[str], subsets: dict[str, dict[float, np.ndarray]], args, n: int,
                    numbers: dict) -> None:
    """The subset-overlap section (Jaccard and share per budget); the matrices go into ``numbers``."""
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


def _published_section(doc: Doc, sels, args, n: int) -> None:
    """The section comparing the --published subsets with the ones regenerated from the score tables."""
    doc.h(2, "Published subsets against regenerated ones")
    rows = published_comparison(sels, load_published(args.published), n)
    doc.p("Each published subset (selector = the model part of its key) against the one subset.py's selection "
          "makes from the score table. Records of unknown cluster are not in any published subset, so a cluster "
          "of them lowers the Jaccard while every known cluster can match." if rows else
          "No published subset key starts with a selector's name.")
    if rows:
        doc.table(["selector", "subset", "published", "regenerated", "Jaccard", "share of published regenerated"], rows)


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
