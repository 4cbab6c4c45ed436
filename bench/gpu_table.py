r"""The one table of bench/gpu.sh: every figure its benchmarks wrote as JSON into one folder.

    python bench/gpu_table.py runs/gpu        # after bash bench/gpu.sh (OUT=runs/gpu)

Reads bench-*.json (bench_packing.py: training), pplx-*.json (bench_pplx.py: scoring) and dump-*.json
(bench_dump_pplxs.py: dump_pplxs.py's epochs), in name order, and prints a Markdown table: what was run,
the path, record tokens per second, the ratio to the padded path of the same run (training), MFU, padding
and peak GPU memory. A figure a benchmark did not measure (MFU on a CPU) shows as "–".
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x, fmt="{:,.0f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def training_rows(name: str, d: dict) -> list[list[str]]:
    a = d["args"]
    what = (f"training, hidden {a['hidden']}, {a['layers']} layers, vocab {a['vocab']}, "
            f"{a['batch']} x {a['accum']} records per step")
    base = d["results"][0]["tokens_per_s"]
    return [[what, r["name"], _num(r["tokens_per_s"]), f"{r['tokens_per_s'] / base:.2f}x", _pct(r.get("mfu")),
             _pct(r["padding"]), _num(r.get("peak_gib"), "{:.1f}")] for r in d["results"]]


def scoring_rows(name: str, d: dict) -> list[list[str]]:
    path = ("packed" if d["packed"] else "length-sorted") + f", {d['attention']}"
    path += " + liger" if d["liger"] else ""
    path += " + compile" if d["compile"] else ""
    rows = []
    if not math.isnan(d.get("tokens_per_s_paper", math.nan)):
        rows.append([f"scoring, budget {d['max_tokens']}", "the paper's loop", _num(d["tokens_per_s_paper"]), "",
                     _pct(d["mfu_paper"]), "", ""])
    rows.append([f"scoring, budget {d['max_tokens']}", path, _num(d["tokens_per_s_ours"]), "", _pct(d["mfu_ours"]),
                 _pct(d["padding_ours"]), ""])
    return rows


def dump_rows(name: str, d: dict) -> list[list[str]]:
    rows = []
    for e, s in enumerate(d["epoch_train_s"]):
        mfu = d["mfu"][e] if d.get("mfu") else None
        rows.append([f"dump_pplxs.py epoch {e + 1}, {d['shape']}, {d['records']} records: {s:.1f} s of training",
                     " ".join(d["flags"]) or "(defaults)", _num(d["tokens"] / s), "", _pct(mfu), "", ""])
    return rows


def table(folder: str) -> str:
    rows = []
    for pattern, fn in (("bench-*.json", training_rows), ("pplx-*.json", scoring_rows), ("dump-*.json", dump_rows)):
        for path in sorted(glob.glob(os.path.join(folder, pattern))):
            with open(path, encoding="utf-8") as f:
                rows += fn(os.path.basename(path), json.load(f))
    head = ["what", "path", "record tokens/s", "ratio", "MFU", "padding", "peak GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="where bench/gpu.sh wrote its JSON files ($OUT)")
    print(table(p.parse_args(argv).folder))


if __name__ == "__main__":
    main()
