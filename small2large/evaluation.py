"""Step 5's metrics and runs: exact match, gold-answer perplexity, the pairwise judge protocol
(both orders), and the summary tables evaluate.py writes."""

from __future__ import annotations

import math
import os
import re
import string
import sys
from collections.abc import Sequence

import numpy as np

from small2large.generation import _is_responses_file, _write_jsonl
from small2large.judge import (
    OUTCOME_VALUE,
    OpenAIJudge,
    aggregate,
    bootstrap_interval,
    fill_template,
    judge_all,
    parse_verdict,
    winning_score,
)
from small2large.rendering import RenderOptions, SupervisedData, tokenize_records
from small2large.scoring import score_pplxs
from utils import IGNORE_INDEX, safe_name, sha256_text

METRICS = ("exact_match", "exact_match_norm", "perplexity")


AGGREGATIONS = ("strict", "lenient")


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse white space (the usual
    normalisation of reading-comprehension exact match).

    >>> normalize_answer("  The capital of Spain is   Madrid. ")
    'capital of spain is madrid'
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(response: str, gold: str, normalize: bool = False) -> bool:
    """response == gold after stripping surrounding white space (or after normalize_answer).

    >>> exact_match(" odd\\n", "odd"), exact_match("Odd.", "odd"), exact_match("Odd.", "odd", normalize=True)
    (True, False, True)
    """
    if normalize:
        return normalize_answer(response) == normalize_answer(gold)
    return response.strip() == gold.strip()


def corpus_perplexity(pplxs: Sequence[float], n_tokens: Sequence[int]) -> float:
    """Token-level perplexity of a set from per-record perplexities (each the exp of the mean
    loss over its ``n`` scored tokens): exp(sum n_i ln P_i / sum n_i). Records with no scored
    token are left out.

    >>> round(corpus_perplexity([2.0, 8.0], [1, 2]), 6)   # exp((ln 2 + 2 ln 8) / 3) = 2^(7/3)
    5.039684
    """
    num = sum(n * math.log(p) for p, n in zip(pplxs, n_tokens) if n > 0)
    den = sum(n for n in n_tokens if n > 0)
    if den == 0:
        raise ValueError("no scored token in the set")
    return math.exp(num / den)


def gold_perplexities(model, tokenizer, records: Sequence[dict], model_max_length: int,
                      max_tokens: int, options=None) -> tuple[list[float], list[int]]:
    """Perplexity (mean over the response tokens) of every record's gold response, tokenized and
    scored exactly as training scores it (rendering.tokenize_records with the training's ``options``,
    dump_pplxs.score_pplxs), and the number of scored tokens of each."""

    ids, labels = tokenize_records(records, tokenizer, model_max_length, options or RenderOptions())
    pplxs, _ = score_pplxs(model, SupervisedData(ids, labels), tokenizer.pad_token_id, max_tokens=max_tokens,
                           denominator="mean", progress=False)
    n_tokens = [sum(1 for t in lab[1:] if t != IGNORE_INDEX) for lab in labels]
    return pplxs, n_tokens


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


def _fmt_ci(value: float, ci: tuple[float, float], digits: int = 3, pct: bool = False) -> str:
    if math.isnan(value):
        return "-"
    if pct:
        return f"{100 * value:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def evaluate_metrics(args, name, path, prompts, rows, runner) -> dict:
    res: dict = {}
    golds = [p["gold"] for p in prompts]
    for metric in ("exact_match", "exact_match_norm"):
        if metric in args.metric:
            hits = [float(exact_match(r["response"], g, normalize=metric.endswith("norm"))) for r, g in zip(rows, golds)]
            res[metric] = {"value": sum(hits) / len(hits), "correct": int(sum(hits)), "n": len(hits),
                           "ci95": bootstrap_interval(hits, args.bootstrap, args.seed),
                           "per_prompt": [bool(h) for h in hits]}
    if "perplexity" in args.metric:
        if _is_responses_file(path):
            res["perplexity"] = None  # no model to score with
        else:
            model, tok = runner.get(path)
            pplxs, n_tokens = gold_perplexities(model, tok, [p["record"] for p in prompts], args.model_max_length,
                                                args.pplx_max_tokens, RenderOptions.from_args(args))
            res["perplexity"] = {"value": corpus_perplexity(pplxs, n_tokens), "median": float(np.median(pplxs)),
                                 "n_fully_truncated": sum(1 for n in n_tokens if n == 0),
                                 "per_prompt": pplxs, "per_prompt_tokens": n_tokens}
    return res


def run_pairwise(args, a: str, b: str, rows_by_name: dict, prompts: list[dict], judge, cache, template: str) -> dict:
    system = args.judge_system
    reqs, plan = [], []
    for i, pr in enumerate(prompts):
        ra, rb = rows_by_name[a][i]["response"], rows_by_name[b][i]["response"]
        keys = []
        for first, second in ((ra, rb), (rb, ra)):
            user = fill_template(template, question=pr["question"], answer_1=first, answer_2=second)
            key = sha256_text(judge.identity, system, user)
            reqs.append((key, system, user))
            keys.append(key)
        plan.append(keys)
    answers = judge_all(judge, cache, reqs, workers=args.judge_workers if isinstance(judge, OpenAIJudge) else 1,
                        progress=not args.no_progress)
    records, outcomes = [], []
    first_pref = n_verdicts = 0
    for i, (k_ab, k_ba) in enumerate(plan):
        v_ab, v_ba = (parse_verdict(answers[k].get("raw")) for k in (k_ab, k_ba))
        outcome = aggregate(v_ab, v_ba, args.aggregation)
        outcomes.append(outcome)
        for v in (v_ab, v_ba):
            if v is not None:
                n_verdicts += 1
                first_pref += v == "first"
        records.append({"index": i, "id": prompts[i]["id"], "question": prompts[i]["question"],
                        "model_a": a, "model_b": b,
                        "a_first": {"verdict": v_ab, **{k: v for k, v in answers[k_ab].items() if k != "key"}},
                        "b_first": {"verdict": v_ba, **{k: v for k, v in answers[k_ba].items() if k != "key"}},
                        "outcome": outcome})
    counts = {o: outcomes.count(o) for o in ("win", "tie", "lose", "failed")}
    vals = [OUTCOME_VALUE[o] for o in outcomes if o != "failed"]
    lo, hi = bootstrap_interval(vals, args.bootstrap, args.seed)
    usage = [answers[k].get("usage") or {} for pair in plan for k in pair]
    res = {"model_a": a, "model_b": b, "judge": args.judge, "aggregation": args.aggregation, **counts,
           "total": len(vals), "winning_score": winning_score(outcomes), "ci95": (lo + 1.0, hi + 1.0),
           "first_position_preference": first_pref / n_verdicts if n_verdicts else float("nan"),
           "judge_tokens": {"prompt": sum(u.get("prompt_tokens", 0) for u in usage),
                            "completion": sum(u.get("completion_tokens", 0) for u in usage)}}
    out = os.path.join(args.output_dir, "verdicts", f"{safe_name(a)}-vs-{safe_name(b)}-{safe_name(args.judge)}.jsonl")
    _write_jsonl(out, records)
    res["verdicts_file"] = out
    if counts["failed"]:
        print(f"warning: {a} vs {b}: the judge failed on {counts['failed']} of {len(prompts)} prompts (no parsable "
              f"verdict in at least one order); they are left out of the total, see {out}", file=sys.stderr)
    return res


def summary_markdown(args, models: list[dict], pairs: list[dict]) -> str:
    out = [f"# Evaluation on {args.prompts}", ""]
    out += [markdown_table(["model", "source", "responses"],
                           [[m["name"], m["path"], m["generations"]] for m in models]), ""]
    if args.metric:
        header = ["model"]
        for k in args.metric:
            header += {"exact_match": ["exact match [95% CI]"], "exact_match_norm": ["normalised EM [95% CI]"],
                       "perplexity": ["gold ppl", "median record ppl"]}[k]
        rows = []
        for m in models:
            cells = []
            for k in args.metric:
                r = m["metrics"].get(k)
                if k == "perplexity":
                    cells += ["-", "-"] if r is None else [f"{r['value']:.3f}", f"{r['median']:.3f}"]
                elif r is None:
                    cells.append("-")
                else:
                    cells.append(_fmt_ci(r["value"], r["ci95"], pct=True))
            rows.append([m["name"]] + cells)
        out += ["## Metrics (exact match: share of prompts; perplexity of the gold responses: lower is better)", "",
                markdown_table(header, rows), ""]
    if pairs:
        rows = [[f"{r['model_a']} vs {r['model_b']}", r["judge"], str(r["win"]), str(r["tie"]), str(r["lose"]),
                 str(r["failed"]), _fmt_ci(r["winning_score"], r["ci95"]),
                 "-" if math.isnan(r["first_position_preference"]) else f"{100 * r['first_position_preference']:.0f}%"]
                for r in pairs]
        out += [f"## Pairwise ({pairs[0]['aggregation']} rule; winning score = (win - lose) / (win + tie + lose) + 1, "
                "> 1: the first model is better)", "",
                markdown_table(["pair", "judge", "win", "tie", "lose", "judge failed", "winning score [95% CI]",
                                "verdicts for the answer shown first"], rows), ""]
    return "\n".join(out)


def _name_of(args, x: str) -> str:
    return x if x in args.names else args.names[args.models.index(x)]
