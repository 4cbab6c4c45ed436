"""Bad and hostile input: a clear one-line error, a non-zero exit, no traceback and no partial output."""

import json
import os
import pickle
import subprocess
import sys

import pytest
from _step3_helpers import dump_args, listdir_all, make_workspace, write_pickle_plain

import process_pickle
import subset
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def ws(tmp_path):
    return make_workspace(str(tmp_path / "in"), n=60, k=3)


def _assert_fails_cleanly(tmp_path, fn, argv, match):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match):
        fn(argv + ["--output_dir", str(out)])
    assert not out.exists() or listdir_all(str(out)) == []


@pytest.mark.parametrize("which", ["epoch0", "epoch3", "clustering"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, ws, which):
    marker = tmp_path / "pwned"
    with open(ws["paths"][which], "wb") as f:
        pickle.dump(_Evil(str(marker)), f)
    # sanity: a plain pickle.load of this file would run the command
    for fn, extra in ((process_pickle.main, []), (subset.main, ["--percentage", "10", "--lp1"])):
        _assert_fails_cleanly(tmp_path, fn, dump_args(ws["paths"], *extra), "refusing to load posix.system|refusing to load os.system")
    assert not marker.exists()
    with open(ws["paths"][which], "rb") as f:
        pickle.load(f)
    assert marker.exists()   # the crafted file really was hostile


def test_length_mismatch_names_files_and_lengths(tmp_path, ws):
    write_pickle_plain(ws["paths"]["epoch2"], [2.0] * 59)
    for fn, extra in ((process_pickle.main, []), (subset.main, ["--percentage", "5", "--lp1"])):
        with pytest.raises(UserError) as e:
            fn(dump_args(ws["paths"], *extra, "--output_dir", str(tmp_path / "o")))
        msg = str(e.value)
        assert "length mismatch" in msg and f"{ws['paths']['dataset']}: 60" in msg and f"{ws['paths']['epoch2']} (--epoch2): 59" in msg
    write_pickle_plain(ws["paths"]["epoch2"], [2.0] * 60)
    write_pickle_plain(ws["paths"]["clustering"], [{"embed_sentence": "", "cluster_num": 0}] * 61)
    with pytest.raises(UserError, match=r"clustering\.pkl \(--clustering\): 61"):
        process_pickle.main(dump_args(ws["paths"], "--output_dir", str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -3.0])
def test_bad_perplexities(tmp_path, ws, bad):
    vals = [2.0] * 60
    vals[17] = bad
    write_pickle_plain(ws["paths"]["epoch1"], vals)
    _assert_fails_cleanly(tmp_path, process_pickle.main, dump_args(ws["paths"]), "record 17 has perplexity")
    _assert_fails_cleanly(tmp_path, subset.main, dump_args(ws["paths"], "--percentage", "10", "--lp1_approx"), "record 17")


def test_bad_values_in_a_ranking_csv(tmp_path, ws):
    path = process_pickle.main(dump_args(ws["paths"], "--model_name", "m", "--output_dir", str(tmp_path / "rk")))
    with open(path, newline="") as f:
        text = f.read()
    lines = text.split("\r\n")
    head, rows = lines[0], lines[1:]
    for col, val, match in ((5, "nan", "m_P0"), (3, "-1", "cluster_num"), (0, "0", "index column")):
        bad = str(path) + f".{col}.csv"
        import csv
        import io
        recs = list(csv.reader(io.StringIO("\r\n".join(rows))))
        recs[7][col] = val
        buf = io.StringIO(newline="")
        csv.writer(buf).writerows(recs)
        with open(bad, "w", newline="") as f:
            f.write(head + "\r\n" + buf.getvalue())
        _assert_fails_cleanly(tmp_path, subset.main, ["--dataset", ws["paths"]["dataset"], "--l1_ranking_file", bad, "--lp1"], match)
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    _assert_fails_cleanly(tmp_path, subset.main, ["--dataset", ws["paths"]["dataset"], "--l1_ranking_file", str(other), "--lp1"],
                          "last column is 'b'")


@pytest.mark.parametrize("content, match", [
    ('[{"instruction": "a", "input": ""}]', "record 0 has no 'output' field"),
    ('[{"output": "a"}]', "record 0 has no 'instruction' field"),
    ('42', "expected a JSON list"),
    ('{"data": [{"instruction": "a", "output": "b"}]}', "expected a JSON list of records"),
    ('[]', "empty"),
    ('', "empty"),
    ('[{"instruction": "a", "output": "b"}, 3]', "record 1"),
])
def test_bad_datasets(tmp_path, ws, content, match):
    with open(ws["paths"]["dataset"], "w") as f:
        f.write(content)
    _assert_fails_cleanly(tmp_path, process_pickle.main, dump_args(ws["paths"]), match)
    _assert_fails_cleanly(tmp_path, subset.main, dump_args(ws["paths"], "--percentage", "10", "--lp1"), match)


@pytest.mark.parametrize("argv, match", [
    (["--percentage", "10"], "choose at least one kind"),
    (["--percentage", "0", "--lp1"], "must be in (0, 100]"),
    (["--percentage", "101", "--lp1"], "must be in (0, 100]"),
    (["--percentage", "-5", "--lp1"], "must be in (0, 100]"),
    (["--lp1"], "--percentage"),
    (["--percentage", "60", "--part", "high", "--lp1"], "--part high needs at least 3 chunks"),
])
def test_usage_errors(tmp_path, ws, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        subset.main(dump_args(ws["paths"], *argv, "--output_dir", str(tmp_path / "o")))
    assert e.value.code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_reports_user_errors_in_one_line_without_traceback(tmp_path, ws):
    vals = [2.0] * 60
    vals[3] = float("nan")
    write_pickle_plain(ws["paths"]["epoch0"], vals)
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "subset.py"), *dump_args(ws["paths"], "--percentage", "10", "--lp1",
                        "--output_dir", str(out))], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "record 3 has perplexity nan" in r.stderr
    assert not out.exists()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "subset.py"), "--dataset", ws["paths"]["dataset"], "--l1_ranking_file", "x.csv"],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "choose at least one kind" in r.stderr


def test_load_clustering_rejects_bad_labels(tmp_path):
    from small2large.dumps import load_clustering

    p = str(tmp_path / "c.pkl")
    for obj, match in (([{"cluster_num": -1}], "record 0"), ([{"embed_sentence": "x"}], "record 0"),
                       ([{"cluster_num": 1}, {"cluster_num": "2"}], "record 1"), ({"a": 1}, "expected a list"),
                       ([], "empty"), ([{"cluster_num": True}], "record 0"), ([{"cluster_num": 1.5}], "record 0")):
        write_pickle_plain(p, obj)
        with pytest.raises(UserError, match=match):
            load_clustering(p)
    write_pickle_plain(p, [{"embed_sentence": "a", "cluster_num": 3}, 5])
    assert load_clustering(p).tolist() == [3, 5]


def test_records_are_written_as_json_of_the_originals(tmp_path, ws):
    res = subset.main(dump_args(ws["paths"], "--percentage", "33", "--lp1", "--output_dir", str(tmp_path / "o")))
    (path, idx), = res.items()
    with open(path) as f:
        got = json.load(f)
    assert got == [ws["records"][i] for i in idx] and not [p for p in os.listdir(tmp_path / "o") if p.endswith(".tmp")]
