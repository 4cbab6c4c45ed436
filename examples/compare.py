"""The quickstart's comparison: held-out perplexity of target models trained on each subset, and
what each subset picked (task families, planted noise, near-duplicates) from the sample data.

    # what examples/quickstart.sh runs at the end (one --run per trained target: NAME MODEL_DIR DATA SECONDS)
    python examples/compare.py --dataset data/sample_train.json --heldout data/sample_heldout.json \\
        --run full runs/quickstart/X/targets/full data/sample_train.json 95.1 \\
        --run 10_low_lp1 runs/quickstart/X/targets/10_low_lp1 runs/quickstart/X/subsets/10_low_lp1-selector.json 9.8 \\
        --baseline runs/models/target --model_max_length 128 --output runs/quickstart/X/compare.md
    # tiny CPU check: score one model on the held-out split only
    python examples/compare.py --heldout data/sample_heldout.json --baseline runs/models/target

Held-out perplexity: every held-out record is scored with dump_pplxs.score_pplxs (the pipeline's own
scoring, imported, not re-implemented) with the textbook mean over response tokens
(denominator "mean", not the paper's "nonzero"), and the table gives the token-level perplexity of the whole split,
exp(sum over records of n_i * ln P_i / sum of n_i) with n_i the scored tokens of record i, plus the
median record perplexity. Lower is better. The untrained target (``--baseline``) is a reference row.

Family analysis: the sample data's family, noise flag and near-duplicate flag of every record are
recovered with data/make_sample.py's ``annotate`` (they are not stored in the records). For data that
the generator did not make, that part is skipped with a note.

What it shows, honestly: tiny random-initialised models trained for a few epochs on synthetic data.
The numbers demonstrate that the pipeline's mechanics work end to end (selection, training, scoring)
and what the selection picks; they are not evidence for, or against, the paper's quality claims.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils import IGNORE_INDEX, UserError, atomic_write, load_records, run_cli  # noqa: E402

# ----------------------------------------------------------------------------------------
# Pure pieces (tested without any model)


def corpus_perplexity(pplxs, n_tokens) -> float:
    """Token-level perplexity of a split from per-record perplexities (each the exp of the mean
    loss over its ``n`` scored tokens): exp(sum n_i ln P_i / sum n_i). Records with no scored
    token are left out.

    >>> round(corpus_perplexity([2.0, 8.0], [1, 2]), 6)   # exp((ln 2 + 2 ln 8) / 3) = 2^(7/3)
    5.039684
    """
    num = sum(n * math.log(p) for p, n in zip(pplxs, n_tokens) if n > 0)
    den = sum(n for n in n_tokens if n > 0)
    if den == 0:
        raise ValueError("no scored token in the split")
    return math.exp(num / den)


def composition(metas: list[dict]) -> dict:
    """Counts of a set of annotated records: {"n", "noisy", "near_duplicate", "families": Counter}.

    >>> c = composition([{"family": "add", "noisy": True, "near_duplicate": False},
    ...                  {"family": "copy", "noisy": False, "near_duplicate": True}])
    >>> c["n"], c["noisy"], c["near_duplicate"], dict(c["families"])
    (2, 1, 1, {'add': 1, 'copy': 1})
    """
    return {
        "n": len(metas),
        "noisy": sum(1 for m in metas if m["noisy"]),
        "near_duplicate": sum(1 for m in metas if m["near_duplicate"]),
        "families": Counter(m["family"] for m in metas),
    }


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table with right-aligned columns after the first.

    >>> print(markdown_table(["a", "b"], [["x", "1"]]))
    | a | b |
    |:--|--:|
    | x | 1 |
    """
    lines = ["| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "-"


def results_table(results: list[dict], n_train: int | None) -> str:
    header = ["training data", "records", "share", "train time (s)", "step wall time (s)", "held-out ppl",
              "median record ppl"]
    rows = []
    for r in results:
        rows.append([
            r["name"],
            "-" if r["records"] is None else str(r["records"]),
            "-" if r["records"] is None or not n_train else _pct(r["records"], n_train),
            "-" if r["train_runtime"] is None else f"{r['train_runtime']:.1f}",
            "-" if r["seconds"] is None else f"{r['seconds']:.0f}",
            f"{r['heldout_ppl']:.3f}",
            f"{r['median_ppl']:.3f}",
        ])
    return markdown_table(header, rows)


def composition_table(names: list[str], comps: list[dict], full: dict) -> str:
    """Rows: every family, then noisy / near-duplicate / total; columns: the full data's count, then
    for each subset its count and the share of the full data's records of that kind it kept."""
    header = ["family", "full data"] + names
    rows = []

    def row(label, full_n, counts):
        return [label, str(full_n)] + [f"{c} ({_pct(c, full_n)})" for c in counts]

    for fam in sorted(full["families"]):
        rows.append(row(fam, full["families"][fam], [c["families"].get(fam, 0) for c in comps]))
    rows.append(row("**noisy (corrupted output)**", full["noisy"], [c["noisy"] for c in comps]))
    rows.append(row("near-duplicate", full["near_duplicate"], [c["near_duplicate"] for c in comps]))
    rows.append(row("**total**", full["n"], [c["n"] for c in comps]))
    return markdown_table(header, rows)


def family_ppl_table(results: list[dict], heldout_fams: list[str]) -> str:
    fams = sorted(set(heldout_fams))
    header = ["held-out family", "records"] + [r["name"] for r in results]
    rows = []
    for fam in fams:
        idx = [i for i, f in enumerate(heldout_fams) if f == fam]
        cells = []
        for r in results:
            cells.append(f"{corpus_perplexity([r['pplxs'][i] for i in idx], [r['n_tokens'][i] for i in idx]):.2f}")
        rows.append([fam, str(len(idx))] + cells)
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------------------
# Scoring (the pipeline's own function)


def train_runtime(model_dir: str) -> float | None:
    """The Trainer's train_runtime (seconds) from MODEL_DIR/trainer_state.json, if there."""
    path = os.path.join(model_dir, "trainer_state.json")
    try:
        with open(path, encoding="utf-8") as f:
            history = json.load(f).get("log_history", [])
    except (OSError, ValueError):
        return None
    times = [h["train_runtime"] for h in history if isinstance(h, dict) and "train_runtime" in h]
    return float(times[-1]) if times else None


def score_heldout(model_dir: str, heldout: str, model_max_length: int, max_tokens: int) -> tuple[list[float], list[int]]:
    """Per-record perplexity (mean over response tokens) of every held-out record, and the number of
    scored tokens of each, with dump_pplxs.score_pplxs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dump_pplxs import score_pplxs
    from utils import add_missing_special_tokens, make_supervised_data

    if not os.path.isdir(model_dir):
        raise UserError(f"{model_dir}: no such model folder")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    add_missing_special_tokens(tokenizer, model)  # a no-op for train.py's output; the untrained model gets [PAD]
    data = make_supervised_data(heldout, tokenizer, model_max_length)
    pplxs, _ = score_pplxs(model, data, tokenizer.pad_token_id, max_tokens=max_tokens, denominator="mean",
                           progress=False)
    n_tokens = [sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in data.labels]
    return pplxs, n_tokens


# ----------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None,
                   help="the full training data the subsets were cut from (for shares and the family analysis)")
    p.add_argument("--heldout", default="data/sample_heldout.json", help="held-out records scored by every model")
    p.add_argument("--run", nargs=4, action="append", default=[], metavar=("NAME", "MODEL_DIR", "DATA", "SECONDS"),
                   help="a trained target: its name in the table, its folder (train.py's --output_dir), the JSON it "
                        "was trained on, and the wall time of its train.py command in seconds, start-up and saving "
                        "included ('-' if unknown). The training time proper is read from MODEL_DIR/"
                        "trainer_state.json (train_runtime). Repeat per model.")
    p.add_argument("--baseline", default=None, metavar="MODEL_DIR",
                   help="an untrained model folder scored as a reference row (e.g. runs/models/target)")
    p.add_argument("--model_max_length", type=int, default=128,
                   help="tokens per record when scoring (use the training value; 128 fits every sample record)")
    p.add_argument("--pplx_max_tokens", type=int, default=1536,
                   help="token budget of a scoring batch (does not change the results; ~1-2k is fastest on CPU)")
    p.add_argument("--sample_num_train", type=int, default=None,
                   help="records of the generated training split, if not data/make_sample.py's default (2000)")
    p.add_argument("--sample_seed", type=int, default=None,
                   help="seed of the generated training split, if not data/make_sample.py's default")
    p.add_argument("--output", default=None, metavar="FILE.md",
                   help="also write the tables here (and the figures as JSON next to it, FILE.json)")
    args = p.parse_args(argv)
    if not args.run and not args.baseline:
        p.error("nothing to compare: give at least one --run or --baseline")
    for name, _, _, sec in args.run:
        if sec != "-":
            try:
                float(sec)
            except ValueError:
                p.error(f"--run {name}: SECONDS must be a number or '-', got {sec!r}")
    if args.model_max_length < 1 or args.pplx_max_tokens < 1:
        p.error("--model_max_length and --pplx_max_tokens must be >= 1")
    return args


def _annotator(args):
    sys.path.insert(0, os.path.join(ROOT, "data"))
    import make_sample

    n = args.sample_num_train or make_sample.NUM_TRAIN
    seed = args.sample_seed if args.sample_seed is not None else make_sample.TRAIN_SEED

    def annotate_train(records):
        try:
            return make_sample.annotate(records, n=n, seed=seed)
        except ValueError:
            return None

    def annotate_heldout(records):
        try:
            return make_sample.annotate_heldout(records, n=max(len(records), make_sample.NUM_HELDOUT))
        except ValueError:
            return None

    return annotate_train, annotate_heldout


def main(args=None):
    if args is None or isinstance(args, list):
        args = parse_args(args)
    annotate_train, annotate_heldout = _annotator(args)
    full_records = load_records(args.dataset) if args.dataset else None
    n_train = len(full_records) if full_records is not None else None

    results = []
    entries = ([("untrained target", args.baseline, None, "-")] if args.baseline else []) + [tuple(r) for r in args.run]
    for i, (name, model_dir, data, sec) in enumerate(entries, 1):
        print(f"[compare {i}/{len(entries)}] scoring {model_dir} on {args.heldout}", flush=True)
        pplxs, n_tokens = score_heldout(model_dir, args.heldout, args.model_max_length, args.pplx_max_tokens)
        results.append({
            "name": name, "model_dir": model_dir, "data": data,
            "records": len(load_records(data)) if data else None,
            "seconds": None if sec == "-" else float(sec), "train_runtime": train_runtime(model_dir),
            "heldout_ppl": corpus_perplexity(pplxs, n_tokens), "median_ppl": statistics.median(pplxs),
            "pplxs": pplxs, "n_tokens": n_tokens,
        })

    out = ["## Held-out perplexity of the target, by training data (lower is better)", "",
           results_table(results, n_train), ""]
    heldout_meta = annotate_heldout(load_records(args.heldout))
    if heldout_meta is not None:
        out += ["## Held-out perplexity by task family", "",
                family_ppl_table(results, [m["family"] for m in heldout_meta]), ""]
    full_path = os.path.realpath(args.dataset) if args.dataset else None
    subsets = [r for r in results if r["data"] and os.path.realpath(r["data"]) != full_path]
    full_meta = annotate_train(full_records) if full_records is not None else None
    if subsets:
        comps = [annotate_train(load_records(r["data"])) for r in subsets] if full_meta is not None else [None]
        if all(c is not None for c in comps):
            for r, c in zip(subsets, comps):
                comp = composition(c)
                r["picked"] = {**comp, "families": dict(sorted(comp["families"].items()))}
            out += ["## What each subset picked: records kept (share of the full data's records of that kind)", "",
                    composition_table([r["name"] for r in subsets], [composition(c) for c in comps],
                                      composition(full_meta)), ""]
        elif full_records is not None:
            out += ["(family analysis skipped: the data are not data/make_sample.py's sample split)", ""]
    out += ["Tiny random-initialised models on synthetic data: this shows the mechanics of the pipeline, "
            "not the paper's quality claims.", ""]
    text = "\n".join(out)
    print(text)
    if args.output:
        with atomic_write(args.output) as f:
            f.write(text)
        figures = [{k: v for k, v in r.items() if k not in ("pplxs", "n_tokens")} for r in results]
        with atomic_write(os.path.splitext(args.output)[0] + ".json") as f:
            f.write(json.dumps({"heldout": args.heldout, "results": figures}, indent=4))
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
