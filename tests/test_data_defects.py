"""The data defects named in issue 7, tested through the interfaces that existed before data.py (so each
test fails on the old code for the reason it names): a UTF-8 byte-order mark, other encodings, and subsets
that were not the original records."""

import json

import pytest
from _step3_helpers import dump_args, make_workspace

import process_pickle
import subset
from small2large import record_io
from tests.conftest import TINY_RECORDS
from utils import UserError


def test_utf8_byte_order_mark_loads(tmp_path):
    """Old code: 'line 1 is not valid JSON (Unexpected UTF-8 BOM)' for JSONL, 'not valid JSON' for a list."""
    for name, text in (("a.json", json.dumps(TINY_RECORDS, indent=4)),
                       ("a.jsonl", "".join(json.dumps(r) + "\n" for r in TINY_RECORDS))):
        p = tmp_path / name
        p.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        assert record_io.load_records(p) == TINY_RECORDS, name


def test_other_encodings_get_a_one_line_error_that_says_so(tmp_path):
    """Old code: "cannot read ('utf-8' codec can't decode byte ...)", not naming the encoding problem."""
    recs = [{"instruction": "Café?", "input": "", "output": "Oui, café."}]
    p = tmp_path / "latin1.json"
    p.write_bytes(json.dumps(recs, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.json: not UTF-8: byte 0xe9 at offset \d+ \(is it Latin-1") as e:
        record_io.load_records(p)
    assert "\n" not in str(e.value)
    q = tmp_path / "utf16.jsonl"
    q.write_bytes(json.dumps(recs[0], ensure_ascii=False).encode("utf-16"))   # with its byte-order mark
    with pytest.raises(UserError, match="utf16.jsonl: not UTF-8: it starts with a UTF-16 byte-order mark"):
        record_io.load_records(q)


@pytest.mark.parametrize("interface", ["a", "b"])
def test_written_subsets_are_the_original_records(tmp_path, interface):
    """Old code wrote "input": "" into records that had no "input" key or "input": null."""
    ws = make_workspace(str(tmp_path / "ws"), n=60, k=3)
    recs = ws["records"]
    for i, r in enumerate(recs):
        if i % 4 == 0:
            del r["input"]
        elif i % 4 == 1:
            r["input"] = None
        elif i % 4 == 2:
            r["meta"] = {"source": "é", "n": i}   # extra fields are kept
    with open(ws["paths"]["dataset"], "w") as f:
        json.dump(recs, f, indent=4)
    out = str(tmp_path / "out")
    if interface == "a":
        process_pickle.main(dump_args(ws["paths"], "--model_name", "m", "--output_dir", str(tmp_path / "rk")))
        res = subset.main(["--dataset", ws["paths"]["dataset"], "--l1_ranking_file", str(tmp_path / "rk" / "m-l1_ranking.csv"),
                           "--lp1", "--clust_rand", "--output_dir", out])
    else:
        res = subset.main(dump_args(ws["paths"], "--percentage", "33", "--lp1", "--clust_rand", "--output_dir", out))
    assert len(res) == (14 if interface == "a" else 2)
    seen = set()
    for path, idx in res.items():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert text == json.dumps([recs[i] for i in idx], indent=4)   # the paper's format, the original records
        seen |= {i % 4 for i in idx.tolist()}
    assert seen == {0, 1, 2, 3}   # every kind of record was written
