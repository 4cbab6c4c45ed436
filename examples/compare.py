"""The quickstart's comparison: held-out perplexity and exact match of target models trained on each
subset (from evaluate.py, step 5), their training data and time, and what each subset picked (task
families, planted noise, near-duplicates) from the sample data.

    # what examples/quickstart.sh runs at the end: evaluate.py scores every target, this script tabulates
    python evaluate.py --models runs/models/target runs/quickstart/X/targets/10_lp1 runs/quickstart/X/targets/full \
        --names untrained 10_lp1 full --prompts data/sample_heldout.json \
        --metric exact_match exact_match_norm perplexity --max_new_tokens 64 --model_max_length 128 \
        --output_dir runs/quickstart/X/eval
    python examples/compare.py --dataset data/sample_train.json --heldout data/sample_heldout.json \
        --evaluation runs/quickstart/X/eval/summary.json --baseline runs/models/target \
        --run 10_lp1 runs/quickstart/X/targets/10_lp1 runs/quickstart/X/subsets/10_low_lp1-selector.json 9.8 \
        --run full runs/quickstart/X/targets/full data/sample_train.json 95.1 --output runs/quickstart/X/compare.md

Every figure about the models comes from evaluate.py's summary.json (one place for evaluation): the
token-level perplexity of the held-out gold responses (scored as training scores them, with the textbook
mean over response tokens), the median record perplexity, and exact-match accuracy of the greedy
responses (exact, and after normalisation) with bootstrap 95% intervals. Each --run is matched to
evaluate.py's model by its folder; the held-out file must be the one evaluate.py used.

Family analysis: the sample data's family, noise flag and near-duplicate flag of every record are
recovered with data/make_sample.py's ``annotate`` (they are not stored in the records). For data that
the generator did not make, that part is skipped with a note.

What it shows, honestly: tiny random-initialised models trained for a few epochs on synthetic data.
The numbers demonstrate that the pipeline's mechanics work end to end (selection, training, scoring,
generation) and what the selection picks; they are not evidence for, or against, the paper's quality claims.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from small2large.evaluation import corpus_perplexity, markdown_table  # noqa: E402
from small2large.record_io import load_records  # noqa: E402
from utils import UserError, atomic_write, run_cli  # noqa: E402

# ----------------------------------------------------------------------------------------
# Pure pieces (tested without any model)


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


def _pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "-"


def _em(r: dict, key: str) -> str:
    m = r.get(key)
    if m is None:
        return "-"
    return f"{100 * m['value']:.1f}% [{100 * m['ci95'][0]:.1f}, {100 * m['ci95'][1]:.1f}]"


def results_table(results: list[dict], n_train: int | None) -> str:
    header = ["training data", "records", "share", "train time (s)", "step wall time (s)", "held-out ppl",
              "median record ppl", "exact match [95% CI]", "normalised EM [95% CI]"]
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
            _em(r, "exact_match"),
            _em(r, "exact_match_norm"),
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


def family_tables(results: list[dict], heldout_fams: list[str]) -> tuple[str, str]:
    """Per held-out task family: the token-level perplexity of the gold responses, and the share of
    exact matches, for every model."""
    fams = sorted(set(heldout_fams))
    header = ["held-out family", "records"] + [r["name"] for r in results]
    ppl_rows, em_rows = [], []
    for fam in fams:
        idx = [i for i, f in enumerate(heldout_fams) if f == fam]
        ppl_rows.append([fam, str(len(idx))] + [
            f"{corpus_perplexity([r['pplxs'][i] for i in idx], [r['n_tokens'][i] for i in idx]):.2f}" for r in results])
        em_rows.append([fam, str(len(idx))] + [
            f"{100 * sum(r['em_hits'][i] for i in idx) / len(idx):.0f}%" for r in results])
    return markdown_table(header, ppl_rows), markdown_table(header, em_rows)


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


def load_evaluation(path: str, heldout: str) -> dict[str, dict]:
    """evaluate.py's summary.json -> {real path of each model folder: its metrics}, after checking that
    it scored ``heldout`` with exact match, normalised exact match and perplexity."""
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"--evaluation {path}: cannot read evaluate.py's summary ({e})") from None
    if os.path.realpath(summary.get("prompts", "")) != os.path.realpath(heldout):
        raise UserError(f"--evaluation {path} scored {summary.get('prompts')!r}, not --heldout {heldout}")
    out = {}
    for m in summary.get("models", []):
        missing = [k for k in ("exact_match", "exact_match_norm", "perplexity") if not m["metrics"].get(k)]
        if missing:
            raise UserError(f"--evaluation {path}: no {missing[0]} for {m['name']}; run evaluate.py with "
                            "--metric exact_match exact_match_norm perplexity")
        out[os.path.realpath(m["path"])] = m["metrics"]
    return out


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
    p.add_argument("--evaluation", required=True, metavar="SUMMARY.json",
                   help="evaluate.py's summary.json for the same models on --heldout (with --metric exact_match "
                        "exact_match_norm perplexity): every model figure comes from it")
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

    evaluation = load_evaluation(args.evaluation, args.heldout)
    results = []
    entries = ([("untrained target", args.baseline, None, "-")] if args.baseline else []) + [tuple(r) for r in args.run]
    for name, model_dir, data, sec in entries:
        metrics = evaluation.get(os.path.realpath(model_dir))
        if metrics is None:
            raise UserError(f"{model_dir} ({name}) is not among the models of --evaluation {args.evaluation}")
        ppl = metrics["perplexity"]
        results.append({
            "name": name, "model_dir": model_dir, "data": data,
            "records": len(load_records(data)) if data else None,
            "seconds": None if sec == "-" else float(sec), "train_runtime": train_runtime(model_dir),
            "heldout_ppl": ppl["value"], "median_ppl": ppl["median"],
            **{k: {"value": metrics[k]["value"], "ci95": metrics[k]["ci95"], "correct": metrics[k]["correct"]}
               for k in ("exact_match", "exact_match_norm")},
            "pplxs": ppl["per_prompt"], "n_tokens": ppl["per_prompt_tokens"],
            "em_hits": metrics["exact_match"]["per_prompt"],
        })

    out = ["## Held-out perplexity of the target, by training data (lower is better), and exact match of its "
           "greedy responses (higher is better)", "", results_table(results, n_train), ""]
    heldout_meta = annotate_heldout(load_records(args.heldout))
    if heldout_meta is not None:
        ppl_table, em_table = family_tables(results, [m["family"] for m in heldout_meta])
        out += ["## Held-out perplexity by task family", "", ppl_table, "",
                "## Held-out exact match by task family", "", em_table, ""]
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
        figures = [{k: v for k, v in r.items() if k not in ("pplxs", "n_tokens", "em_hits")} for r in results]
        with atomic_write(os.path.splitext(args.output)[0] + ".json") as f:
            f.write(json.dumps({"heldout": args.heldout, "results": figures}, indent=4))
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
