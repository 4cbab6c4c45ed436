"""utils: atomic writes and dataset loading edge cases."""

import json
import os

import pytest

import utils
from small2large import record_io


def test_atomic_write_keeps_old_file_on_error_and_leaves_no_temp(tmp_path):
    p = tmp_path / "out.json"
    p.write_text(json.dumps([1, 2]))
    with pytest.raises(RuntimeError), utils.atomic_write(p) as f:
        f.write("partial")
        raise RuntimeError("interrupted")
    assert json.loads(p.read_text()) == [1, 2]
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_atomic_write_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        utils.write_pickle(tmp_path / "x.pkl", [1.0])
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "x.pkl").st_mode & 0o777) == 0o644


def test_jsonl_and_json_list_load_the_same_records(tmp_path):
    recs = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "e"}]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    a = record_io.load_records(tmp_path / "a.json")
    b = record_io.load_records(tmp_path / "a.jsonl")
    assert a == b and a[1]["input"] == ""


@pytest.mark.parametrize("text, msg", [
    ('{"data": [{"instruction": "x"}]}', "expected a JSON list"),
    ('{"instruction": "x"}', "record 0 has no 'output'"),
    ("[]", "empty"),
    ('[{"instruction": "x"}]', "record 0 has no 'output'"),
    ('[{"instruction": "x", "output": "y"}, 3]', "record 1"),
])
def test_bad_datasets_name_the_problem(tmp_path, text, msg):
    p = tmp_path / "d.json"
    p.write_text(text)
    with pytest.raises(utils.UserError, match=msg):
        record_io.load_records(p)
