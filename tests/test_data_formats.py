"""data.py: every format loads to the same records (and the same perplexities), column flags, BOM and
encodings, views never touch the source records, subsets are the original records in the input's format."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _step3_helpers import dump_args, make_workspace

import clustering
import process_pickle
import subset
import train
from small2large import dumps, embedding, record_io, rendering, scoring
from tests._dump_pplxs_helpers import load
from tests.conftest import TINY_RECORDS
from utils import UserError

# TINY_RECORDS with the shapes real files have: no "input" key, "input": null, extra fields
ODD_RECORDS = [dict(r) for r in TINY_RECORDS]
del ODD_RECORDS[2]["input"]
ODD_RECORDS[7]["input"] = None
ODD_RECORDS[4]["category"] = "count"
ODD_RECORDS[9]["source"] = "é 日本 \u2028"   # a line separator inside a string must not split a JSONL line
CHAT_RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And of Spain?"},
                  {"role": "assistant", "content": "Madrid"}]},
    {"messages": [{"role": "user", "content": "Reverse the word planet."}, {"role": "assistant", "content": "tenalp"}]},
]
SHAREGPT_RECORDS = [
    {"id": "a", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"},
                                  {"from": "gpt", "value": "Paris"}, {"from": "human", "value": "And of Spain?"},
                                  {"from": "gpt", "value": "Madrid"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "Reverse the word planet."}, {"from": "gpt", "value": "tenalp"}]},
]


def _write(path, records, fmt):
    """``records`` in format fmt at ``path`` (json: the paper's indent-4 list)."""
    path = str(path)
    if fmt == "json":
        text = json.dumps(records, indent=4)
    elif fmt == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    elif fmt == "disk":
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(path)
        return path
    if path.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return path


FORMATS = {"json": "d.json", "jsonl": "d.jsonl", "json.gz": "d.json.gz", "jsonl.gz": "d.jsonl.gz",
           "parquet": "d.parquet", "disk": "d_saved"}


def _in_all_formats(tmp_path, records):
    return {name: _write(tmp_path / fn, records, name.split(".")[0]) for name, fn in FORMATS.items()}


# ---------------------------------------------------------------------------------------------
# Loading: same views, same order, same count; the same perplexities


def test_every_format_loads_the_same_views_in_order(tmp_path):
    paths = _in_all_formats(tmp_path, ODD_RECORDS)
    want = [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in ODD_RECORDS]
    for name, p in paths.items():
        src = record_io.load(p)
        assert src.views == want, name
        assert src.fmt == {"json": "json", "json.gz": "json", "jsonl": "jsonl", "jsonl.gz": "jsonl"}.get(name, "parquet")
        assert record_io.load_records(p) == want, name


@pytest.fixture(scope="module")
def llama(tiny_llama):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load(tiny_llama)
    torch.set_num_threads(n)


def _pplxs(llama, path, **kw):

    model, tok = llama
    d = rendering.make_supervised_data(path, tok, 128, **kw)
    return d, scoring.score_pplxs(model, d, tok.pad_token_id, progress=False)[0]


def test_round_trips_give_the_same_perplexities_as_the_json_file(tmp_path, llama):
    paths = _in_all_formats(tmp_path, ODD_RECORDS)
    ref_data, ref = _pplxs(llama, paths["json"])
    assert len(ref) == len(ODD_RECORDS) and len(set(ref)) > len(ref) // 2   # records differ: a reordering would show
    for name, p in paths.items():
        d, got = _pplxs(llama, p)
        assert d.input_ids == ref_data.input_ids and d.labels == ref_data.labels, name
        assert got == ref, name
    # chat: the messages JSON file against its ShareGPT form, in every format
    chat_ref_data, chat_ref = _pplxs(llama, _write(tmp_path / "chat.json", CHAT_RECORDS, "json"))
    os.makedirs(tmp_path / "sg")
    for name, p in _in_all_formats(tmp_path / "sg", SHAREGPT_RECORDS).items():
        d, got = _pplxs(llama, p)
        assert d.labels == chat_ref_data.labels and got == chat_ref, name


def test_field_flags_map_other_columns(tmp_path, llama):
    dolly = [{"instruction": r["instruction"], "context": r.get("input"), "response": r["output"], "category": "x"}
             for r in ODD_RECORDS]
    p = _write(tmp_path / "dolly.parquet", dolly, "parquet")
    with pytest.raises(UserError, match="record 0 has no 'output' field.*--output_field"):
        record_io.load(p)
    fields = record_io.Fields(input="context", output="response")
    assert record_io.load(p, fields=fields).views == record_io.load(_write(tmp_path / "a.json", ODD_RECORDS, "json")).views
    _, got = _pplxs(llama, p, fields=fields)
    assert got == _pplxs(llama, str(tmp_path / "a.json"))[1]
    chat = [{"dialog": r["messages"]} for r in CHAT_RECORDS]
    q = _write(tmp_path / "chat.jsonl", chat, "jsonl")
    assert record_io.load(q, allow_chat=True, fields=record_io.Fields(messages="dialog")).views == CHAT_RECORDS
    prompts = [{"prompt": r["instruction"], "completion": r["output"]} for r in TINY_RECORDS[:1]]   # one JSONL line
    r = _write(tmp_path / "one.jsonl", prompts, "jsonl")
    assert record_io.load(r, fields=record_io.Fields(instruction="prompt", output="completion")).views[0]["output"] == "tenalp"


def test_field_flags_on_every_script(tmp_path):
    argv = ["--input_field", "context", "--output_field", "response", "--instruction_field", "q", "--messages_field", "m"]
    want = record_io.Fields("q", "context", "response", "m")
    p = _write(tmp_path / "a.json", TINY_RECORDS, "json")
    assert record_io.Fields.from_args(clustering.parse_args(["--dataset", p, "--num_clusters", "2", *argv])) == want
    assert record_io.Fields.from_args(process_pickle.parse_args(["--dataset", p, "--epoch0", "a", "--epoch1", "a", "--epoch2", "a",
                                                            "--epoch3", "a", "--clustering", "c", *argv])) == want
    assert record_io.Fields.from_args(subset.parse_args(["--dataset", p, "--l1_ranking_file", "x", "--lp1", *argv])) == want
    _, data_args, _ = train.parse_args(["--data_path", p, "--output_dir", str(tmp_path), *argv])
    assert data_args.data_fields == want
    saved = _write(tmp_path / "saved", TINY_RECORDS, "disk")   # a folder is accepted as --data_path
    assert train.parse_args(["--data_path", saved, "--output_dir", str(tmp_path)])[1].data_path == saved


def test_clustering_embeds_the_mapped_view_and_checks_lengths(tmp_path):
    dolly = [{"instruction": r["instruction"], "context": r.get("input"), "response": r["output"]} for r in ODD_RECORDS]
    p = _write(tmp_path / "dolly.parquet", dolly, "parquet")
    emb = np.random.default_rng(0).normal(size=(len(dolly), 8)).astype(np.float32)
    np.save(tmp_path / "e.npy", emb)
    out = clustering.main(["--dataset", p, "--input_field", "context", "--output_field", "response", "--num_clusters", "3",
                           "--embeddings", str(tmp_path / "e.npy"), "--output_dir", str(tmp_path / "c")])
    assert [o["embed_sentence"] for o in out] == [embedding.embed_sentence(v) for v in record_io.load(_write(
        tmp_path / "a.json", ODD_RECORDS, "json")).views]
    np.save(tmp_path / "short.npy", emb[:-1])
    with pytest.raises(UserError, match=r"shape \(11, 8\) does not match 12 records of .*dolly.parquet"):
        clustering.main(["--dataset", p, "--input_field", "context", "--output_field", "response", "--num_clusters", "3",
                         "--embeddings", str(tmp_path / "short.npy"), "--output_dir", str(tmp_path / "c")])


# ---------------------------------------------------------------------------------------------
# Hub ids (no network: datasets.load_dataset is replaced; the real one reads the offline cache)


def test_hub_id_split_syntax_and_known_column_maps(tmp_path, monkeypatch):
    import datasets

    calls = []
    dolly = [{"instruction": r["instruction"], "context": r.get("input") or "", "response": r["output"],
              "category": "c"} for r in TINY_RECORDS]

    def fake_load_dataset(repo, split=None):
        calls.append((repo, split))
        return datasets.Dataset.from_list(dolly)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = record_io.load("databricks/databricks-dolly-15k")
    assert calls[-1] == ("databricks/databricks-dolly-15k", "train") and src.fmt == "parquet"
    assert src.views == [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in TINY_RECORDS]
    record_io.load("databricks/databricks-dolly-15k:train[:5]")
    assert calls[-1] == ("databricks/databricks-dolly-15k", "train[:5]")
    record_io.load("HuggingFaceH4/ultrachat_200k", fields=record_io.Fields("instruction", "context", "response"))
    assert calls[-1] == ("HuggingFaceH4/ultrachat_200k", "train_sft")
    with pytest.raises(UserError, match="record 0 has no 'output'"):   # an unknown id gets no column map
        record_io.load("someone/dolly-copy")


def test_uncached_hub_id_offline_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="no-such-owner/no-such-data.*HF_HUB_OFFLINE") as e:
        record_io.load("no-such-owner/no-such-data")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such file"):
        record_io.load(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------------------------------------
# Views and ShareGPT


def test_views_never_modify_the_source_records(tmp_path):
    p = _write(tmp_path / "a.json", ODD_RECORDS, "json")
    src = record_io.load(p)
    assert src.originals == ODD_RECORDS   # no "input" inserted, null kept, extra fields kept
    assert "input" not in src.originals[2] and src.originals[7]["input"] is None
    assert src.views[2]["input"] == "" and src.views[7]["input"] == "" and "category" not in src.views[4]


def test_sharegpt_maps_roles_and_rejects_unknown_turns(tmp_path):
    p = _write(tmp_path / "sg.json", SHAREGPT_RECORDS, "json")
    assert record_io.load(p, allow_chat=True).views == CHAT_RECORDS
    with pytest.raises(UserError, match="record 0 has no 'instruction'"):   # steps that take no chat say so
        record_io.load(p)
    bad = json.loads(json.dumps(SHAREGPT_RECORDS))
    bad[1]["conversations"].insert(1, {"from": "function_call", "value": "{}"})
    with pytest.raises(UserError, match="sg2.json: record 1: turn 1 is from 'function_call'; ShareGPT turns must be from human, gpt, system"):
        record_io.load(_write(tmp_path / "sg2.json", bad, "json"), allow_chat=True)
    bad = [{"conversations": [{"from": "human", "value": "Hi"}]}]
    with pytest.raises(UserError, match="record 0: no assistant turn"):
        record_io.load(_write(tmp_path / "sg3.json", bad, "json"), allow_chat=True)


# ---------------------------------------------------------------------------------------------
# Subsets: the original records, in the input's format; lengths checked across formats


def _step3(tmp_path, fmt, records):
    """Write a step-3 workspace whose dataset is ``records`` in format ``fmt``; run process_pickle + subset (a)."""
    ws = make_workspace(str(tmp_path / "ws"), n=len(records), k=3)
    ds = _write(tmp_path / FORMATS[fmt], records, fmt.split(".")[0])
    paths = dict(ws["paths"], dataset=ds)
    process_pickle.main(dump_args(paths, "--model_name", "m", "--output_dir", str(tmp_path / "rk")))
    out = str(tmp_path / f"out-{fmt}")
    res = subset.main(["--dataset", ds, "--l1_ranking_file", str(tmp_path / "rk" / "m-l1_ranking.csv"),
                       "--lp1", "--clust_rand", "--output_dir", out])
    return out, res


def _odd(n):
    """n records with every odd shape: no input, null input, extra fields, non-ASCII."""
    return [dict(ODD_RECORDS[i % len(ODD_RECORDS)], instruction=f"{i}: " + ODD_RECORDS[i % len(ODD_RECORDS)]["instruction"])
            for i in range(n)]


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet", "disk"])
def test_subset_format_follows_the_input_format(tmp_path, fmt):
    recs = _odd(60)
    out, res = _step3(tmp_path, fmt, recs)
    ext = ".jsonl" if fmt.startswith("jsonl") else ".parquet"
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in res)
    assert all(p.endswith(ext) for p in res) and os.path.join(out, "10_low_lp1-m" + ext) in res
    ref, _ = _step3(tmp_path / "ref", "json", recs)   # same selection as from the JSON list
    for path, idx in res.items():
        want = [recs[i] for i in idx]
        if ext == ".jsonl":
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            assert lines[-1] == "" and [json.loads(x) for x in lines[:-1]] == want
            assert lines[:-1] == [json.dumps(r, ensure_ascii=False) for r in want]   # the source lines verbatim
        else:
            table = pq.read_table(path)
            source = pa.Table.from_pylist(recs)
            assert table.column_names == source.column_names
            assert table.to_pylist() == source.take(list(idx)).to_pylist()
        assert record_io.load(path).views == [record_io.load(os.path.join(ref, os.path.basename(path)[: -len(ext)] + ".json")).views[j]
                                         for j in range(len(idx))]


def test_lengths_are_checked_across_formats(tmp_path):
    recs = _odd(30)
    ws = make_workspace(str(tmp_path / "ws"), n=31, k=3)
    ds = _write(tmp_path / "d.parquet", recs, "parquet")
    with pytest.raises(UserError, match=r"length mismatch.*d.parquet: 30.*epoch-pre.pkl \(--epoch0\): 31"):
        process_pickle.main(dump_args(dict(ws["paths"], dataset=ds), "--output_dir", str(tmp_path / "rk")))
    with pytest.raises(UserError, match=r"length mismatch.*d.parquet: 30"):
        subset.main(dump_args(dict(ws["paths"], dataset=ds), "--percentage", "10", "--lp1", "--output_dir", str(tmp_path / "o")))
    assert not os.path.exists(tmp_path / "rk") and not os.path.exists(tmp_path / "o")


def test_saved_dataset_dict_splits(tmp_path):
    """A DatasetDict folder: ':SPLIT' picks the split, without it 'train'."""
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(TINY_RECORDS[:5]),
                               "test": datasets.Dataset.from_list(TINY_RECORDS[5:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(record_io.load(str(tmp_path / "dd"))) == 5
    assert record_io.load(str(tmp_path / "dd") + ":test").views == TINY_RECORDS[5:]
    with pytest.raises(UserError, match="no split 'dev'"):
        record_io.load(str(tmp_path / "dd") + ":dev")


def test_dump_run_on_a_saved_dataset_with_mapped_columns(tmp_path, tiny_llama, llama):
    """dump_pplxs.py end to end (--data_path a save_to_disk folder, Dolly's column names): its P0 equals
    the JSON file's scored independently."""
    import dump_pplxs
    from tests._dump_pplxs_helpers import max_rel_diff

    dolly = [{"instruction": r["instruction"], "context": r.get("input"), "response": r["output"]} for r in ODD_RECORDS]
    folder = _write(tmp_path / "dolly_saved", dolly, "disk")
    dump_pplxs.main(["--model_name_or_path", tiny_llama, "--data_path", folder, "--input_field", "context",
                     "--output_field", "response", "--output_dir", str(tmp_path / "out"), "--dump_dir", str(tmp_path / "d"),
                     "--num_train_epochs", "1", "--max_steps", "1", "--per_device_train_batch_size", "4",
                     "--model_max_length", "128", "--report_to", "none", "--disable_tqdm", "True", "--save_strategy", "no"])
    _, ref = _pplxs(llama, _write(tmp_path / "a.json", ODD_RECORDS, "json"))
    assert max_rel_diff(list(dumps.load_pplxs(tmp_path / "d" / "epoch-pre.pkl")), ref) < 1e-6


def test_parquet_subsets_of_a_mapped_hub_dataset_load_without_flags(tmp_path, monkeypatch):
    """Subsets of Dolly from the hub are Parquet files of its rows (context, response, category) that carry
    the column map, so train.py reads them with no --input_field / --output_field."""
    import datasets

    ws = make_workspace(str(tmp_path / "ws"), n=40, k=3)
    dolly = [{"instruction": r["instruction"], "context": r["input"], "response": r["output"], "category": "c"}
             for r in ws["records"]]
    monkeypatch.setattr(datasets, "load_dataset", lambda repo, split=None: datasets.Dataset.from_list(dolly))
    res = subset.main(dump_args(dict(ws["paths"], dataset="databricks/databricks-dolly-15k"), "--percentage", "10",
                                "--lp1", "--output_dir", str(tmp_path / "o")))
    (path, idx), = res.items()
    assert path.endswith("10_low_lp1-model.parquet")
    assert pq.read_table(path).to_pylist() == [dolly[i] for i in idx]
    assert record_io.load(path).views == [ws["records"][i] for i in idx]
    assert record_io.load(path, fields=record_io.Fields(output="context")).views[0]["output"] == ws["records"][idx[0]]["input"]
