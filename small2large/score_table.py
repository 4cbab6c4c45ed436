"""The per-selector score table: one row per record with every signal the perplexity dumps give.

process_pickle.py writes it beside the paper's CSV as ``{output_dir}/{model_name}-scores.parquet``;
``subset.py --scores`` and ``report.py`` read it. Columns (dataset order, one row per record):

  index                dataset index (0..N-1)
  record_sha256        sha256 of the record's canonical JSON (sorted keys, no spaces, UTF-8): ties the
                       table to its dataset (read_score_table checks it when given the records)
  cluster_num          cluster of the record (clustering.py's pickle)
  len_response         characters of the response (Alpaca "output"; chat: the assistant turns joined by
                       newlines, data.alpaca_text's output: the paper's CSV's len_response)
  len_response_tokens  tokens of the response (only when a tokenizer was given; no special tokens)
  p0 .. pn             response perplexity before training (p0) and after epoch i (pi); n = last dump
  lp1 .. lpn           LP(i) = (P0 - Pi) / (P0 - Pn), 0 when P0 == Pn (only when n >= 2; lp1 is exactly
                       utils.lp1, the paper's LP(1) when n = 3; lpn is 1, or 0 when P0 == Pn)
  lp1_approx           (P0 - P1) / P0 (needs only p0 and p1: the one-epoch selector)
  pn_over_p0           Pn / P0: how much of the perplexity is left after training (1 = nothing learned)
  truncated            perplexity exactly 1.0 in every dump (no response token scored)
  unlearned            never learned: by default the top 5% of each cluster by pn_over_p0 (ceil(0.05 x
                       size) records: the perplexity fell least); with a ratio instead, pn_over_p0 >= it
                       (e.g. 0.8: fell by less than 20%). Truncated records are never flagged (own flag).
                       The default is relative because P0 has no common scale: a random-initialised
                       selector starts near the vocabulary size (P0 ~ 2000 on the quickstart, where every
                       record ends below Pn/P0 = 0.3), a pretrained one near 5 (the paper's).
  p{e}_noprompt, ifd   when a no-prompt dump is given: the response perplexity scored without its
                       prompt at epoch e, and IFD = p{e} / p{e}_noprompt (Cherry / Superfiltering's
                       instruction-following difficulty: > 1 means the prompt does not help)

The Parquet file's schema metadata (key "small2large") holds a JSON object: format, version,
model_name, n_dumps, the unlearned rule and the noprompt epoch.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from small2large.dumps import check_lengths, load_pplxs, validate_pplxs
from small2large.lp import (
    UNLEARNED_TOP_SHARE,
    ifd,
    lp1,
    lp1_approx,
    lp_columns,
    truncated_mask,
    unlearned_mask,
)
from small2large.models import load_tokenizer
from small2large.rendering import response_text
from utils import UserError, atomic_write

FORMAT = "small2large-scores"


VERSION = 1


META_KEY = b"small2large"


def record_sha256(record: dict) -> str:
    """sha256 of the record's canonical JSON (sorted keys, compact, UTF-8).

    >>> record_sha256({"output": "5", "instruction": "Add."}) == record_sha256({"instruction": "Add.", "output": "5"})
    True
    """
    text = json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_score_table(records, cluster, pplxs, *, n_tokens=None, noprompt=None, noprompt_epoch: int = 0,
                      unlearned_ratio: float | None = None, unlearned_top_share: float = UNLEARNED_TOP_SHARE):
    """The score table (a pandas DataFrame, dataset order) from the records, their clusters and the
    dumps [P0, P1, ..., Pn] (n >= 1; float64 arrays). ``noprompt``: the no-prompt perplexities at
    epoch ``noprompt_epoch`` (adds p{e}_noprompt and ifd)."""
    import pandas as pd

    pplxs = [np.asarray(p, dtype=np.float64) for p in pplxs]
    if len(pplxs) < 1:
        raise UserError("the score table needs at least the P0 dump")
    n = len(records)
    check_lengths({"records": n, "clusters": len(cluster), **{f"P{i}": len(p) for i, p in enumerate(pplxs)}})
    cols = {
        "index": np.arange(n, dtype=np.int64),
        "record_sha256": [record_sha256(r) for r in records],
        "cluster_num": np.asarray(cluster, dtype=np.int64),
        "len_response": np.array([len(response_text(r)) for r in records], dtype=np.int64),
    }
    if n_tokens is not None:
        cols["len_response_tokens"] = np.asarray(n_tokens, dtype=np.int64)
    for i, p in enumerate(pplxs):
        cols[f"p{i}"] = p
    cols.update(lp_columns(pplxs))
    if len(pplxs) >= 2:
        cols["lp1_approx"] = lp1_approx(pplxs[0], pplxs[1])
    last = pplxs[-1]
    trunc = truncated_mask(pplxs)
    cols["pn_over_p0"] = last / pplxs[0]
    cols["truncated"] = trunc
    cols["unlearned"] = (unlearned_mask(pplxs[0], last, cluster, unlearned_ratio, unlearned_top_share, trunc)
                         if len(pplxs) >= 2 else np.zeros(n, bool))
    if noprompt is not None:
        if not 0 <= noprompt_epoch < len(pplxs):
            raise UserError(f"the no-prompt dump is for epoch {noprompt_epoch}, but only P0..P{len(pplxs) - 1} are given")
        noprompt = np.asarray(noprompt, dtype=np.float64)
        check_lengths({"records": n, "no-prompt dump": len(noprompt)})
        cols[f"p{noprompt_epoch}_noprompt"] = noprompt
        cols["ifd"] = ifd(pplxs[noprompt_epoch], noprompt)
    return pd.DataFrame(cols)


def table_meta(df, model_name: str, *, unlearned_ratio=None, unlearned_top_share=UNLEARNED_TOP_SHARE,
               noprompt_epoch=None, **extra) -> dict:
    n_dumps = sum(1 for c in df.columns if c[0] == "p" and c[1:].isdigit())
    rule = ({"rule": "ratio", "ratio": unlearned_ratio} if unlearned_ratio is not None
            else {"rule": "top_share", "top_share": unlearned_top_share})
    return {"format": FORMAT, "version": VERSION, "model_name": model_name, "n_dumps": n_dumps,
            "unlearned": rule, "noprompt_epoch": noprompt_epoch, **extra}


def write_score_table(path: str, df, meta: dict) -> str:
    """Write the table atomically as Parquet (pyarrow), ``meta`` as JSON in the schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    try:
        with atomic_write(path, "wb", encoding=None) as f:
            pq.write_table(table, f)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None
    return path


def score_columns(df) -> list[str]:
    """The numeric per-record signals of a table (what subset.py --metric and report.py can rank by)."""
    skip = {"index", "cluster_num", "record_sha256", "truncated", "unlearned"}
    return [c for c in df.columns if c not in skip and np.issubdtype(df[c].dtype, np.number)]


def read_score_table(path: str, records=None):
    """Read and check a score table; returns (DataFrame in dataset order, meta dict). Raises a one-line
    UserError for a missing or unreadable file, a table of another format, missing columns, an index
    that is not 0..N-1, bad perplexities, an LP(1) that is not (P0-P1)/(P0-Pn), and (given the
    dataset's ``records``) a length or record hash that differs from the dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    raw = (table.schema.metadata or {}).get(META_KEY)
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a score table (no '{META_KEY.decode()}' metadata; write it with process_pickle.py)")
    if meta.get("version") != VERSION:
        raise UserError(f"{path}: score table version {meta.get('version')}, this code reads version {VERSION}")
    df = table.to_pandas()
    need = ["index", "record_sha256", "cluster_num", "len_response", "p0", "truncated", "unlearned", "pn_over_p0"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    n = len(df)
    if n == 0:
        raise UserError(f"{path}: the score table is empty")
    if not np.array_equal(df["index"].to_numpy(), np.arange(n)):
        raise UserError(f"{path}: the index column is not 0..{n - 1} in order")
    cl = df["cluster_num"].to_numpy()
    if not np.issubdtype(cl.dtype, np.integer) or (cl < 0).any():
        raise UserError(f"{path}: cluster_num must hold integers >= 0")
    pcols = sorted((c for c in df.columns if c[0] == "p" and c[1:].isdigit()), key=lambda c: int(c[1:]))
    if [int(c[1:]) for c in pcols] != list(range(len(pcols))):
        raise UserError(f"{path}: the perplexity columns must be p0..pn without gaps, got {', '.join(pcols)}")
    pp = [validate_pplxs(df[c].to_numpy(dtype=np.float64), f"{path} column {c}") for c in pcols]
    if "lp1" in df.columns and not np.array_equal(df["lp1"].to_numpy(), lp1(pp[0], pp[1], pp[-1])):
        raise UserError(f"{path}: column lp1 differs from (P0-P1)/(P0-P{len(pp) - 1})")
    for c in score_columns(df):
        v = df[c].to_numpy(dtype=np.float64)
        if not np.isfinite(v).all():
            raise UserError(f"{path}: column {c} holds NaN or inf (record {int(np.flatnonzero(~np.isfinite(v))[0])})")
    if records is not None:
        check_lengths({"the dataset": len(records), path: n})
        h = df["record_sha256"].tolist()
        for i, r in enumerate(records):
            if record_sha256(r) != h[i]:
                raise UserError(f"{path}: record {i} differs from the dataset's (record_sha256): the table was made "
                                "for another dataset or another order")
    return df, meta


def describe_rule(meta: dict) -> str:
    """One line naming the unlearned rule of a table.

    >>> describe_rule({"unlearned": {"rule": "ratio", "ratio": 0.8}})
    'Pn/P0 >= 0.8'
    >>> describe_rule({"unlearned": {"rule": "top_share", "top_share": 0.05}})
    'top 5% of Pn/P0 per cluster'
    """
    u = meta.get("unlearned") or {}
    if u.get("rule") == "ratio":
        return f"Pn/P0 >= {u['ratio']:g}"
    return f"top {100 * u.get('top_share', UNLEARNED_TOP_SHARE):g}% of Pn/P0 per cluster"


def add_arguments(p) -> None:
    """process_pickle.py's score-table flags."""
    g = p.add_argument_group("score table ({output_dir}/{model_name}-scores.parquet, read by subset.py --scores and report.py)")
    g.add_argument("--noprompt", metavar="FILE.pkl", default=None,
                   help="perplexities of the responses scored without their prompt (dump_pplxs.py --dump_noprompt), "
                        "e.g. dump-pplxs/noprompt/epoch-pre.pkl: adds p{e}_noprompt and ifd = p{e} / p{e}_noprompt")
    g.add_argument("--noprompt_epoch", type=int, default=0,
                   help="the epoch e of the --noprompt dump (0 = before training, as Superfiltering; default 0)")
    g.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="a tokenizer folder (the selector's): adds len_response_tokens (response tokens, no special tokens)")
    g.add_argument("--unlearned_top_share", type=float, default=UNLEARNED_TOP_SHARE,
                   help="flag as 'unlearned' the records of every cluster whose perplexity fell least: the top share by "
                        "Pn / P0, ceil(share x cluster size) records (default 0.05; relative, so it works whatever P0's scale)")
    g.add_argument("--unlearned_ratio", type=float, default=None,
                   help="instead: flag every record with Pn / P0 >= this, e.g. 0.8 (perplexity fell by less than 20%%; "
                        "for pretrained selectors, whose P0 is small)")
    g.add_argument("--no_scores", action="store_true", help="do not write the score table (the paper's CSV only)")


def check_arguments(p, args) -> None:
    if not 0 < args.unlearned_top_share <= 1:
        p.error(f"--unlearned_top_share must be in (0, 1], got {args.unlearned_top_share:g}")
    if args.unlearned_ratio is not None and not args.unlearned_ratio > 0:
        p.error(f"--unlearned_ratio must be > 0, got {args.unlearned_ratio:g}")
    if args.noprompt_epoch < 0:
        p.error("--noprompt_epoch must be >= 0")
    if args.noprompt and not os.path.isfile(args.noprompt):
        p.error(f"--noprompt {args.noprompt}: no such file")
    if args.tokenizer and not os.path.isdir(args.tokenizer):
        p.error(f"--tokenizer {args.tokenizer}: no such folder")


def write_from_args(args, records, dumps, cluster) -> str | None:
    """process_pickle.py's one call: build the table from its inputs and write it; returns the path."""

    if args.no_scores:
        return None
    noprompt = load_pplxs(args.noprompt) if args.noprompt else None
    n_tokens = count_response_tokens(records, args.tokenizer) if args.tokenizer else None
    top, ratio = args.unlearned_top_share, args.unlearned_ratio
    df = build_score_table(records, cluster, dumps, n_tokens=n_tokens, noprompt=noprompt,
                           noprompt_epoch=args.noprompt_epoch, unlearned_ratio=ratio, unlearned_top_share=top)
    meta = table_meta(df, args.model_name, unlearned_ratio=ratio, unlearned_top_share=top,
                      noprompt_epoch=args.noprompt_epoch if noprompt is not None else None)
    path = os.path.join(args.output_dir, f"{args.model_name}-scores.parquet")
    write_score_table(path, df, meta)
    n = len(df)
    print(f"unlearned ({describe_rule(meta)}): {int(df['unlearned'].sum())} of {n} records; "
          f"columns: {', '.join(score_columns(df))}")
    print(f"Generated {path}")
    return path


def read_ranking_fields(path: str, records):
    """subset.py's Ranking fields from a score table checked against the dataset's records:
    (cluster, {metric: float64 array}, truncated, model_name, unlearned)."""
    df, meta = read_score_table(path, records)
    metrics = {c: df[c].to_numpy(dtype=np.float64) for c in score_columns(df)}
    model = meta.get("model_name") or "model"
    return (df["cluster_num"].to_numpy(dtype=np.int64), metrics, df["truncated"].to_numpy(dtype=bool), model,
            df["unlearned"].to_numpy(dtype=bool))


def count_response_tokens(records, tokenizer_dir: str) -> np.ndarray:
    """Tokens of every record's response_text (no special tokens), with the tokenizer loaded as the
    selector's is (models.load_tokenizer: a SentencePiece-only folder is read as Llama-2's)."""

    tok = load_tokenizer(tokenizer_dir, head=f"--tokenizer: cannot load a tokenizer: {tokenizer_dir}")
    ids = tok([response_text(r) for r in records], add_special_tokens=False)["input_ids"]
    return np.array([len(x) for x in ids], dtype=np.int64)
