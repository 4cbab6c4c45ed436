"""The score table (scores.py), process_pickle.py's table hook and the two-dump path, subset.py's --scores,
--metric/--order, budgets below 1% and --exclude_unlearned."""

import doctest
import hashlib
import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
from _step3_helpers import (
    dump_args,
    listdir_all,
    make_workspace,
    read_json,
    read_text,
    ref_lp1,
    ref_lp1_approx,
    ref_split,
)

import process_pickle
import subset
from small2large import lp, models, rendering, score_table
from small2large.lp import lp1
from utils import UserError


def test_doctests():
    assert sum(doctest.testmod(m).failed for m in (score_table, lp)) == 0


def _run_pp(ws, out, *extra, epochs=4):
    args = ["--dataset", ws["paths"]["dataset"], "--clustering", ws["paths"]["clustering"], "--model_name", "m",
            "--output_dir", str(out)]
    for e in range(epochs):
        args += [f"--epoch{e}", ws["paths"][f"epoch{e}"]]
    return process_pickle.main(args + list(extra))


def _ref_top_share(labels, ratio, trunc, share):
    """Per-record reference of the default unlearned rule."""
    out = np.zeros(len(ratio), bool)
    for c in set(labels.tolist()):
        members = [i for i in range(len(ratio)) if labels[i] == c and not trunc[i]]
        members.sort(key=lambda i: (-ratio[i], i))
        for i in members[: int(np.ceil(share * len(members) - 1e-9))]:
            out[i] = True
    return out


def test_table_columns_against_per_record_reference(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=90, k=4)
    _run_pp(ws, tmp_path / "rk")
    df, meta = score_table.read_score_table(str(tmp_path / "rk" / "m-scores.parquet"), ws["records"])
    p0, p1, p2, p3 = ws["p"]
    n = len(p0)
    assert meta["model_name"] == "m" and meta["n_dumps"] == 4 and meta["unlearned"] == {"rule": "top_share", "top_share": 0.05}
    assert df["index"].tolist() == list(range(n))
    assert df["cluster_num"].tolist() == ws["labels"].tolist()
    assert df["len_response"].tolist() == [len(r["output"]) for r in ws["records"]]
    want_hash = [hashlib.sha256(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()
                 for r in ws["records"]]
    assert df["record_sha256"].tolist() == want_hash
    for i, p in enumerate(ws["p"]):
        assert df[f"p{i}"].tolist() == p.tolist()
    assert np.array_equal(df["lp1"].to_numpy(), lp1(p0, p1, p3))   # LP(1) is utils.lp1, bit for bit
    assert df["lp1"].tolist() == ref_lp1(p0, p1, p3)
    assert df["lp2"].tolist() == ref_lp1(p0, p2, p3)
    assert df["lp3"].tolist() == [1.0 if a != d else 0.0 for a, d in zip(p0, p3)]
    assert df["lp1_approx"].tolist() == ref_lp1_approx(p0, p1)
    trunc = (p0 == 1) & (p1 == 1) & (p2 == 1) & (p3 == 1)
    assert df["truncated"].tolist() == trunc.tolist() and trunc.sum() == 4
    ratio = p3 / p0
    assert df["unlearned"].tolist() == _ref_top_share(ws["labels"], ratio, trunc, 0.05).tolist()
    assert not (df["unlearned"] & df["truncated"]).any()


def test_csv_is_unchanged_by_the_table(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=60, k=3)
    a = _run_pp(ws, tmp_path / "a")
    b = _run_pp(ws, tmp_path / "b", "--no_scores")
    assert read_text(a) == read_text(b)
    assert listdir_all(str(tmp_path / "b")) == ["m-l1_ranking.csv"]


def test_ratio_rule_and_ifd_columns(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=40, k=2)
    p0 = ws["p"][0]
    noprompt = p0 * np.linspace(0.5, 2.0, len(p0))
    with open(tmp_path / "np.pkl", "wb") as f:
        pickle.dump(noprompt.tolist(), f)
    _run_pp(ws, tmp_path / "rk", "--unlearned_ratio", "0.5", "--noprompt", str(tmp_path / "np.pkl"))
    df, meta = score_table.read_score_table(str(tmp_path / "rk" / "m-scores.parquet"))
    trunc = df["truncated"].to_numpy()
    ratio = ws["p"][3] / p0
    assert df["unlearned"].tolist() == ((ratio >= 0.5) & ~trunc).tolist()
    assert meta["unlearned"] == {"rule": "ratio", "ratio": 0.5} and meta["noprompt_epoch"] == 0
    assert df["p0_noprompt"].tolist() == noprompt.tolist()
    assert df["ifd"].tolist() == [a / b for a, b in zip(p0.tolist(), noprompt.tolist())]


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_fewer_dumps_write_the_table_only(tmp_path, epochs, capsys):
    ws = make_workspace(str(tmp_path / "in"), n=40, k=2)
    path = _run_pp(ws, tmp_path / "rk", epochs=epochs)
    assert listdir_all(str(tmp_path / "rk")) == ["m-scores.parquet"]
    assert path.endswith("m-scores.parquet")
    assert "no CSV" in capsys.readouterr().out
    df, meta = score_table.read_score_table(path, ws["records"])
    assert meta["n_dumps"] == epochs
    assert [c for c in df.columns if c[0] == "p" and c[1:].isdigit()] == [f"p{i}" for i in range(epochs)]
    assert ("lp1_approx" in df) == (epochs >= 2)
    assert ("lp1" in df) == (epochs >= 3)   # n = 1: LP(1) = (P0-P1)/(P0-P1) ranks nothing
    if epochs == 3:   # n = 2: LP(1) = (P0 - P1) / (P0 - P2)
        assert df["lp1"].tolist() == ref_lp1(ws["p"][0], ws["p"][1], ws["p"][2])


def test_dumps_must_be_given_without_gaps(tmp_path, capsys):
    ws = make_workspace(str(tmp_path / "in"), n=20, k=2)
    with pytest.raises(SystemExit) as e:
        process_pickle.parse_args(["--dataset", "d", "--clustering", "c", "--epoch0", "a", "--epoch2", "b"])
    assert e.value.code == 2 and "without gaps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        process_pickle.parse_args(["--dataset", "d", "--clustering", "c", "--epoch0", "a", "--epoch1", "b", "--plot", "x.png"])
    assert ws


def test_read_score_table_rejects_bad_tables(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=30, k=2)
    _run_pp(ws, tmp_path / "rk")
    path = str(tmp_path / "rk" / "m-scores.parquet")
    with pytest.raises(UserError, match="no such file"):
        score_table.read_score_table(str(tmp_path / "nope.parquet"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="not a readable Parquet"):
        score_table.read_score_table(str(tmp_path / "junk.parquet"))
    df, meta = score_table.read_score_table(path)
    df.to_parquet(tmp_path / "plain.parquet")   # no metadata: not ours
    with pytest.raises(UserError, match="not a score table"):
        score_table.read_score_table(str(tmp_path / "plain.parquet"))
    bad = df.copy()
    bad.loc[3, "lp1"] += 1e-12
    score_table.write_score_table(str(tmp_path / "bad.parquet"), bad, meta)
    with pytest.raises(UserError, match="lp1 differs"):
        score_table.read_score_table(str(tmp_path / "bad.parquet"))
    other = [dict(r) for r in ws["records"]]
    other[7]["output"] += "!"
    with pytest.raises(UserError, match="record 7 differs"):
        score_table.read_score_table(path, other)
    with pytest.raises(UserError, match="length mismatch"):
        score_table.read_score_table(path, ws["records"][:-1])
    bad = df.copy()
    bad.loc[0, "p2"] = -1.0
    score_table.write_score_table(str(tmp_path / "neg.parquet"), bad, meta)
    with pytest.raises(UserError, match="record 0 has perplexity -1.0"):
        score_table.read_score_table(str(tmp_path / "neg.parquet"))


def test_table_write_is_atomic(tmp_path, monkeypatch):
    ws = make_workspace(str(tmp_path / "in"), n=20, k=2)
    _run_pp(ws, tmp_path / "rk")
    before = (tmp_path / "rk" / "m-scores.parquet").read_bytes()
    import pyarrow.parquet as pq

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(UserError, match="disk full"):
        _run_pp(ws, tmp_path / "rk")
    assert (tmp_path / "rk" / "m-scores.parquet").read_bytes() == before
    assert listdir_all(str(tmp_path / "rk")) == ["m-l1_ranking.csv", "m-scores.parquet"]


# ---------------------------------------------------------------------------------------------
# subset.py: one mechanism for every kind


def _files(d):
    return {f: read_text(os.path.join(d, f)) for f in listdir_all(d)}


def test_metric_lp1_is_byte_identical_to_lp1(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=150, k=5)
    csv_path = _run_pp(ws, tmp_path / "rk")
    table = str(tmp_path / "rk" / "m-scores.parquet")
    data = ws["paths"]["dataset"]
    subset.main(["--dataset", data, "--l1_ranking_file", csv_path, "--lp1", "--lp1_approx", "--clust_rand",
                 "--output_dir", str(tmp_path / "a")])
    subset.main(["--dataset", data, "--scores", table, "--lp1", "--lp1_approx", "--clust_rand", "--output_dir", str(tmp_path / "c")])
    subset.main(["--dataset", data, "--scores", table, "--metric", "lp1", "--order", "low", "--output_dir", str(tmp_path / "m")])
    a, c, m = _files(str(tmp_path / "a")), _files(str(tmp_path / "c")), _files(str(tmp_path / "m"))
    assert len(a) == 22 and a == c   # the table gives the CSV's files, clust_rand included
    assert m == {k: v for k, v in a.items() if "_lp1-" in k} and len(m) == 8
    for p in ("10", "0.5"):   # one percentage: --metric lp1 == --lp1 of the dumps interface
        subset.main(["--dataset", data, "--scores", table, "--metric", "lp1", "--percentage", p, "--output_dir", str(tmp_path / f"m{p}")])
        subset.main(dump_args(ws["paths"], "--lp1", "--percentage", p, "--model_name", "m", "--output_dir", str(tmp_path / f"b{p}")))
        assert _files(str(tmp_path / f"m{p}")) == _files(str(tmp_path / f"b{p}"))


def test_metric_any_column_and_order_high_match_reference(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=120, k=4, ties=False)
    _run_pp(ws, tmp_path / "rk")
    table = str(tmp_path / "rk" / "m-scores.parquet")
    df, _ = score_table.read_score_table(table)
    for metric, order in (("lp2", "low"), ("p0", "high"), ("len_response", "high")):
        out = subset.main(["--dataset", ws["paths"]["dataset"], "--scores", table, "--metric", metric, "--order", order,
                           "--percentage", "25", "--output_dir", str(tmp_path / metric)])
        (path, idx), = out.items()
        v = df[metric].to_numpy(dtype=float)
        want = ref_split(ws["labels"], -v if order == "high" else v, 25, "low")
        assert idx.tolist() == want
        assert os.path.basename(path) == f"25_{'highest' if order == 'high' else 'low'}_{metric}-m.json"
        assert read_json(path) == [ws["records"][i] for i in want]


def test_budgets_below_one_percent(tmp_path, capsys):
    ws = make_workspace(str(tmp_path / "in"), cluster_sizes=[300, 250, 150, 100, 40, 12])
    n = len(ws["labels"])
    out = subset.main(dump_args(ws["paths"], "--lp1", "--percentage", "0.5", "--output_dir", str(tmp_path / "p")))
    (path, idx), = out.items()
    assert os.path.basename(path) == "0.5_low_lp1-model.json"
    l1 = np.array(ref_lp1(*[ws["p"][i] for i in (0, 1, 3)]))
    assert idx.tolist() == ref_split(ws["labels"], l1, 0.5, "low")   # k = 200: ceil(n_c/200) per cluster
    assert len(idx) == 2 + 2 + 1 + 1 + 1 + 1
    out = subset.main(dump_args(ws["paths"], "--lp1", "--percentage", "0.5", "--exact", "--output_dir", str(tmp_path / "e")))
    (_, idx), = out.items()
    assert len(idx) == round(0.005 * n) == 4   # 852 records
    with pytest.raises(SystemExit):
        subset.parse_args(dump_args(ws["paths"], "--lp1", "--percentage", "0"))


def test_exclude_unlearned(tmp_path, capsys):
    ws = make_workspace(str(tmp_path / "in"), n=200, k=4)
    _run_pp(ws, tmp_path / "rk")
    table = str(tmp_path / "rk" / "m-scores.parquet")
    df, _ = score_table.read_score_table(table)
    flagged = df["unlearned"].to_numpy()
    assert 10 <= flagged.sum() <= 20
    l1 = df["lp1"].to_numpy()
    for src in (["--scores", table], dump_args(ws["paths"])[2:]):
        d = tmp_path / f"x{len(src)}"
        args = ["--dataset", ws["paths"]["dataset"], *src, "--lp1", "--percentage", "33", "--exclude_unlearned",
                "--output_dir", str(d)]
        (path, idx), = subset.main(args).items()
        assert path.endswith("33_low_lp1-m-nounlearned.json") or path.endswith("33_low_lp1-model-nounlearned.json")
        assert idx.tolist() == ref_split(ws["labels"], l1, 33, "low", eligible=~flagged)
        assert not flagged[idx].any()
    assert "left out (--exclude_unlearned)" in capsys.readouterr().out


def test_two_dumps_in_both_interfaces(tmp_path):
    """The one-epoch selector: P0 and P1 only, through the dumps interface and through a two-dump table."""
    ws = make_workspace(str(tmp_path / "in"), n=100, k=3)
    table = _run_pp(ws, tmp_path / "rk", epochs=2)
    la = np.array(ref_lp1_approx(ws["p"][0], ws["p"][1]))
    b_args = ["--dataset", ws["paths"]["dataset"], "--clustering", ws["paths"]["clustering"], "--epoch0", ws["paths"]["epoch0"],
              "--epoch1", ws["paths"]["epoch1"], "--model_name", "m", "--percentage", "10"]
    out_b = subset.main(b_args + ["--lp1_approx", "--clust_rand", "--output_dir", str(tmp_path / "b")])
    subset.main(["--dataset", ws["paths"]["dataset"], "--scores", table, "--lp1_approx", "--clust_rand",
                         "--percentage", "10", "--output_dir", str(tmp_path / "c")])
    assert _files(str(tmp_path / "b")) == _files(str(tmp_path / "c"))
    idx = list(out_b.values())
    assert idx[0].tolist() == ref_split(ws["labels"], la, 10, "low")
    assert len(idx[1]) == len(idx[0])
    subset.main(["--dataset", ws["paths"]["dataset"], "--scores", table, "--lp1_approx", "--output_dir", str(tmp_path / "a")])
    assert len(listdir_all(str(tmp_path / "a"))) == 8   # every split of interface (a)
    with pytest.raises(UserError, match="no metric 'lp1'.*three or more epochs"):
        subset.main(["--dataset", ws["paths"]["dataset"], "--scores", table, "--lp1", "--output_dir", str(tmp_path / "z")])


def test_scores_of_another_dataset_are_refused(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=40, k=2)
    table = str(tmp_path / "rk" / "m-scores.parquet")
    _run_pp(ws, tmp_path / "rk")
    other = [dict(r) for r in ws["records"]]
    other[0], other[1] = other[1], other[0]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="record 0 differs"):
        subset.main(["--dataset", str(tmp_path / "other.json"), "--scores", table, "--lp1", "--output_dir", str(tmp_path / "z")])
    assert not (tmp_path / "z").exists()


def test_subset_usage_errors(capsys):
    for argv, msg in ((["--dataset", "d", "--scores", "t", "--epoch0", "x", "--lp1"], "does not take --epoch0"),
                      (["--dataset", "d", "--scores", "t", "--metric", "p0", "--order", "high", "--part", "mid"], "--order high"),
                      (["--dataset", "d", "--scores", "t"], "choose at least one kind")):
        with pytest.raises(SystemExit) as e:
            subset.parse_args(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_tokenize_responses(tiny_llama, tiny_opt):
    from transformers import AutoTokenizer

    recs = [{"instruction": "Add.", "input": "2 and 3", "output": "The sum is 5."},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}]
    from small2large.rendering import tokenize_records
    from utils import IGNORE_INDEX

    for path in (tiny_llama, tiny_opt):
        tok = AutoTokenizer.from_pretrained(path)
        ids, labels = rendering.tokenize_responses(recs, tok, 64)
        assert ids == labels
        # Alpaca: output + eos with the tokenizer's bos; chat: the prompted pass's scored tokens after the bos
        scored = [t for t in tokenize_records(recs[1:], tok, 512)[1][0] if t != IGNORE_INDEX]
        assert ids == [list(tok("The sum is 5." + tok.eos_token)["input_ids"]), [tok.bos_token_id] + scored]
        assert tok.decode(scored) == "Hello there" + tok.eos_token   # the built-in template: content + eos
        assert ids[0][-1] == tok.eos_token_id
        ids, _ = rendering.tokenize_responses(recs, tok, 3)
        assert [len(x) for x in ids] == [3, 3]   # truncated at model_max_length


def test_table_reads_back_with_pandas(tmp_path):
    ws = make_workspace(str(tmp_path / "in"), n=20, k=2)
    _run_pp(ws, tmp_path / "rk")
    df = pd.read_parquet(tmp_path / "rk" / "m-scores.parquet")   # a plain pandas read works too
    assert len(df) == 20 and df["lp1"].dtype == np.float64 and df["truncated"].dtype == bool


# ---------------------------------------------------------------------------------------------
# dump_pplxs.py: the no-prompt pass (IFD) and --score_only


def _dump_argv(model, data, tmp, epochs, *extra):
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", str(tmp / "out"),
            "--dump_dir", str(tmp / "dumps"), "--num_train_epochs", str(epochs),
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--model_max_length", "256",
            "--seed", "42", "--report_to", "none", "--disable_tqdm", "True", "--save_strategy", "no", *extra]


@pytest.fixture()
def _one_thread():
    from tests._dump_pplxs_helpers import one_thread_fixture

    yield from one_thread_fixture()


def test_score_only_dumps_p0_and_noprompt_without_training(tiny_llama, tiny_dataset, tmp_path, _one_thread):
    import dump_pplxs
    from small2large.dumps import load_pplxs
    from small2large.rendering import tokenize_records
    from tests._dump_pplxs_helpers import load, max_rel_diff, reference_pplxs
    from tests.conftest import TINY_RECORDS

    written = dump_pplxs.main(_dump_argv(tiny_llama, tiny_dataset, tmp_path, 3, "--score_only", "True",
                                         "--dump_noprompt", "pre"))
    assert [os.path.relpath(p, tmp_path / "dumps") for p in written] == ["epoch-pre.pkl", os.path.join("noprompt", "epoch-pre.pkl")]
    assert listdir_all(str(tmp_path / "dumps")) == ["epoch-pre.pkl", "manifest.json",
                                                       os.path.join("noprompt", "epoch-pre.pkl")]
    m = json.loads(read_text(str(tmp_path / "dumps" / "manifest.json")))
    assert sorted(m["files"]) == ["epoch-pre.pkl", "noprompt/epoch-pre.pkl"] and m["score_only"] is True
    assert not (tmp_path / "out").exists() or not any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "out"))
    model, tok = load(tiny_llama)
    # independent one-record-at-a-time references: with the prompt (the paper's) and the response alone,
    # every response token scored but the first (bos-less tokenizers) / after the bos
    with_prompt = reference_pplxs(model, *tokenize_records(TINY_RECORDS, tok, 256))
    texts = [r["output"] + tok.eos_token for r in TINY_RECORDS]
    alone_ids = [list(x) for x in tok(texts)["input_ids"]]
    alone = reference_pplxs(model, alone_ids, alone_ids)
    p0, p0_np = load_pplxs(tmp_path / "dumps" / "epoch-pre.pkl"), load_pplxs(tmp_path / "dumps" / "noprompt" / "epoch-pre.pkl")
    assert max_rel_diff(list(p0), with_prompt) < 1e-5
    assert max_rel_diff(list(p0_np), alone) < 1e-5
    # the table's IFD from these two dumps
    df = score_table.build_score_table(TINY_RECORDS, np.zeros(len(TINY_RECORDS), np.int64), [p0], noprompt=p0_np)
    assert max_rel_diff(df["ifd"].tolist(), [a / b for a, b in zip(with_prompt, alone)]) < 2e-5


def test_noprompt_dumps_at_the_chosen_epochs_of_a_training_run(tiny_opt, tiny_dataset, tmp_path, _one_thread):
    import dump_pplxs
    from small2large.dumps import load_pplxs
    from tests._dump_pplxs_helpers import load, max_rel_diff, reference_pplxs
    from tests.conftest import TINY_RECORDS

    dump_pplxs.main(_dump_argv(tiny_opt, tiny_dataset, tmp_path, 2, "--dump_noprompt", "2"))
    assert listdir_all(str(tmp_path / "dumps")) == ["epoch-1.pkl", "epoch-2.pkl", "epoch-pre.pkl", "manifest.json",
                                                       os.path.join("noprompt", "epoch-2.pkl")]
    model, tok = load(str(tmp_path / "out"))   # the model after the last epoch (saved at the end)
    ids, _ = rendering.tokenize_responses(TINY_RECORDS, tok, 256)
    assert ids[0][0] == tok.bos_token_id   # OPT adds its bos: the first response token is scored given it
    got = load_pplxs(tmp_path / "dumps" / "noprompt" / "epoch-2.pkl")
    assert max_rel_diff(list(got), reference_pplxs(model, ids, ids)) < 1e-4
    from small2large import manifest

    d = tmp_path / "dumps"
    entry = manifest.read_manifest(str(d))["files"]["noprompt/epoch-2.pkl"]
    assert entry["epoch"] == 2 and entry["noprompt"] is True and entry["sha256"] == manifest.sha256_file(
        str(d / "noprompt" / "epoch-2.pkl"))
    manifest.check_dumps(tiny_dataset, len(TINY_RECORDS), {f"epoch{i}": str(d / f"epoch-{e}.pkl")
                                                          for i, e in enumerate(("pre", 1, 2))},
                         noprompt=(str(d / "noprompt" / "epoch-2.pkl"), 2))


def test_dump_noprompt_flag_is_checked():
    import dump_pplxs

    assert dump_pplxs.DumpArguments(dump_noprompt="pre, 3").noprompt_epochs() == {"pre", 3}
    assert dump_pplxs.DumpArguments(dump_noprompt="all").noprompt_epochs() is None
    assert dump_pplxs.DumpArguments().noprompt_epochs() == set()
    with pytest.raises(ValueError, match="--dump_noprompt"):
        dump_pplxs.DumpArguments(dump_noprompt="first")


def test_response_tokens_with_a_tokenizer(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    ws = make_workspace(str(tmp_path / "in"), n=20, k=2)
    _run_pp(ws, tmp_path / "rk", "--tokenizer", tiny_llama)
    df, _ = score_table.read_score_table(str(tmp_path / "rk" / "m-scores.parquet"))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert df["len_response_tokens"].tolist() == [len(tok(r["output"], add_special_tokens=False)["input_ids"])
                                                  for r in ws["records"]]
    with pytest.raises(UserError, match=r"^--tokenizer: cannot load a tokenizer: .*: no tokenizer files in the folder"):
        _run_pp(ws, tmp_path / "rk2", "--tokenizer", str(tmp_path))


def test_response_tokens_with_the_selectors_tokenizer_loading(tmp_path):
    """--tokenizer is read as train.py reads --model_name_or_path: a folder holding only a SentencePiece
    tokenizer.model is Llama-2's tokenizer (AutoTokenizer reads it otherwise); any failure is one line."""
    from tests._families import make_tokenizer

    ws = make_workspace(str(tmp_path / "in"), n=20, k=2)
    sp = str(tmp_path / "llama2")
    make_tokenizer("llama2", sp)
    _run_pp(ws, tmp_path / "rk", "--tokenizer", sp)
    df, _ = score_table.read_score_table(str(tmp_path / "rk" / "m-scores.parquet"))
    tok = models.load_tokenizer(sp)
    assert df["len_response_tokens"].tolist() == [len(tok(r["output"], add_special_tokens=False)["input_ids"])
                                                  for r in ws["records"]]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{\"model\": 1}")   # unreadable by the tokenizers library
    with pytest.raises(UserError, match=r"^--tokenizer: cannot load a tokenizer: .*bad: cannot load the tokenizer"):
        _run_pp(ws, tmp_path / "rk2", "--tokenizer", str(bad))


def test_len_response_is_the_csv_definition():
    """One definition of a record's response text (data.alpaca_text's output, the CSV's len_response)."""
    from small2large.record_io import alpaca_text

    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                         {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
    alpaca = {"instruction": "Add.", "input": "", "output": "five"}
    df = score_table.build_score_table([chat, alpaca], [0, 0], [[2.0, 3.0]])
    assert df["len_response"].tolist() == [len("Yo\nCiao"), 4] == [len(alpaca_text(r)["output"]) for r in (chat, alpaca)]


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_noprompt_tokens_are_the_prompted_scored_tokens(tmp_path, family):
    """With a chat template the prompted pass scores content + end-of-turn marker (<|im_end|>, <|eot_id|>):
    the no-prompt pass scores the same tokens (after the bos where the tokenizer adds one), also where
    eos is not the end-of-turn marker (a Qwen2.5 base tokenizer's eos is <|endoftext|>)."""
    from small2large.rendering import RenderOptions, tokenize_records
    from tests._families import CHAT_RECORDS, make_tokenizer
    from utils import IGNORE_INDEX

    make_tokenizer(family, str(tmp_path / "tok"))
    tok = models.load_tokenizer(str(tmp_path / "tok"))
    if family == "qwen2":
        tok.eos_token = "<|endoftext|>"
    marker = {"qwen2": "<|im_end|>", "llama3": "<|eot_id|>"}[family]
    assert tok.eos_token != marker
    recs = CHAT_RECORDS + [{"instruction": "Add.", "input": "", "output": "56"}]
    for opts in (RenderOptions(), RenderOptions(alpaca_as_chat=True)):
        ids, labels = tokenize_records(recs, tok, 256, opts)
        np_ids, np_labels = rendering.tokenize_responses(recs, tok, 256, opts)
        assert np_ids == np_labels
        bos = [tok.bos_token_id] if family == "llama3" else []
        for i, r in enumerate(recs):
            if "messages" not in r and not opts.alpaca_as_chat:   # the paper's prompt: output + eos
                assert np_ids[i] == bos + tok("56" + tok.eos_token, add_special_tokens=False)["input_ids"]
                continue
            scored = [t for t in labels[i] if t != IGNORE_INDEX]
            assert np_ids[i] == bos + scored
            turns = [m["content"] for m in r.get("messages", [{"role": "assistant", "content": "56"}])
                     if m["role"] == "assistant"]
            assert tok.decode(np_ids[i][len(bos):]) == "".join(t + marker for t in turns)
