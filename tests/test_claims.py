"""small2large/claims.py: one run per output folder. The scenarios that involve a second run, a dead
run or a signal use real processes (tests/_claim_worker.py, started with sys.executable); the rest
call the library in this process."""

import doctest
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from small2large import claims
from small2large.claims import (
    CLAIM_FILE,
    ClaimHeld,
    ClaimLost,
    claim_folder,
    claim_for_job,
    owner_run_id,
    read_run_id,
    write_run_id,
)
from utils import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_claim_worker.py")
TIMEOUT = 90  # generous: CI is a loaded 2-core machine
HOST = socket.gethostname()
ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"
IN_PROCESS = {"heartbeat_s": None, "on_sigterm": False}  # no thread, no SIGTERM handler in pytest's process


class Worker:
    """A tests/_claim_worker.py process; stdout and stderr go to files that the test polls."""

    def __init__(self, tmp_path, name, folder, mode, *args):
        self.out, self.err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, WORKER, str(folder), mode, *map(str, args)],
                                         stdout=out, stderr=err, cwd=ROOT)
        self.pid = self.proc.pid

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def done(self) -> bool:
        return self.proc.poll() is not None

    def line(self, prefix: str) -> str:
        """The first stdout line starting with ``prefix``, waiting for it."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            exited = self.done()
            for ln in self.stdout().splitlines():
                if ln.startswith(prefix):
                    return ln
            if exited:
                pytest.fail(f"worker exited ({self.proc.returncode}) without printing {prefix!r}; "
                            f"stdout: {self.stdout()!r}; stderr: {self.stderr()!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"worker printed no {prefix!r} in {TIMEOUT} s; stderr: {self.stderr()!r}")
            time.sleep(0.01)

    def run_id(self) -> str:
        return self.line("claimed ").split()[1]

    def wait(self) -> int:
        return self.proc.wait(TIMEOUT)


@pytest.fixture()
def spawn(tmp_path):
    workers = []

    def make(name, folder, mode, *args):
        w = Worker(tmp_path, name, folder, mode, *args)
        workers.append(w)
        return w

    yield make
    for w in workers:  # a failed test leaves no process behind
        if not w.done():
            w.proc.kill()
        w.proc.wait()


def wait_until(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def touch(path) -> None:
    open(path, "w").close()


def read_claim(folder) -> dict:
    with open(os.path.join(folder, CLAIM_FILE), "rb") as f:
        return json.loads(f.read())


def claim_bytes(folder) -> bytes:
    with open(os.path.join(folder, CLAIM_FILE), "rb") as f:
        return f.read()


def has_claim(folder) -> bool:
    return os.path.exists(os.path.join(folder, CLAIM_FILE))


def write_claim(folder, *, run_id="foreign", host="other-node", pid=4242, heartbeat=None, age=None, **extra) -> bytes:
    """Another run's claim file, written as a steal would (temporary file, os.replace); ``age``
    seconds sets the heartbeat (unless given) and the file's mtime in the past."""
    os.makedirs(folder, exist_ok=True)
    now = time.time()
    t = now - (age or 0)
    info = {"format": claims.FORMAT, "claim_id": run_id + "0" * 8, "run_id": run_id, "host": host, "pid": pid,
            "user": "someone", "started": "2026-01-02T03:04:05+00:00", "started_epoch": t, "command": "train.py --x 1",
            "heartbeat": t if heartbeat is None else heartbeat, "heartbeat_s": 60, "took_over": None, **extra}
    data = (json.dumps(info) + "\n").encode()
    path = os.path.join(folder, CLAIM_FILE)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)
    if age:
        os.utime(path, (t, t))
    return data


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def take_files(folder) -> list[str]:
    return [n for n in os.listdir(folder) if ".take" in n or n.endswith(".tmp")]


# ----------------------------------------------------------------------------------------
# Real processes


def test_two_runs_started_at_once_exactly_one_claims(tmp_path, spawn):
    folder, barrier, until = tmp_path / "out", tmp_path / "go", tmp_path / "stop"
    a = spawn("a", folder, "hold", "--barrier", barrier, "--until", until)
    b = spawn("b", folder, "hold", "--barrier", barrier, "--until", until)
    a.line("ready"), b.line("ready")
    touch(barrier)
    t0 = time.monotonic()
    wait_until(lambda: a.done() or b.done() or ("claimed" in a.stdout() and "claimed" in b.stdout()),
               "one of the two runs to stop")  # (or, when claims are broken, both to claim)
    elapsed = time.monotonic() - t0
    assert (a.stdout() + b.stdout()).count("claimed") <= 1, "both runs claimed the folder"
    loser, winner = (a, b) if a.done() else (b, a)
    assert loser.wait() == 1
    assert not winner.done(), "the winner still holds the folder when the loser has stopped"
    assert elapsed < 20, f"the refused run took {elapsed:.1f} s to stop"
    winner_id = winner.run_id()
    assert "claimed" not in loser.stdout()
    err = loser.stderr()
    assert err.count("\n") == 1, err
    f = re.escape(str(folder))
    assert re.fullmatch(
        rf"error: {f} is in use by another run: run {winner_id} \(host {re.escape(HOST)}, pid {winner.pid}, "
        rf"user [^,]+, started {ISO}, command: \S*_claim_worker\.py {f} hold --barrier \S+ --until \S+\); "
        rf"pid {winner.pid} is running on this host\. Wait for it to finish, use another folder, or pass "
        rf"--steal_claim if you are sure that run is dead\n", err), err
    assert read_claim(folder)["pid"] == winner.pid
    touch(until)
    assert winner.wait() == 0
    assert not has_claim(folder)


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_sigkilled_holder_is_taken_over(tmp_path, spawn, reaped):
    folder, until = tmp_path / "out", tmp_path / "stop"
    a = spawn("a", folder, "sleep")
    a_id = a.run_id()
    os.kill(a.pid, signal.SIGKILL)
    if reaped:
        a.wait()
        reason = f"pid {a.pid} is not running on this host"
    else:  # killed but not yet waited for by its parent: os.kill(pid, 0) still succeeds
        wait_until(lambda: claims._proc_stat(a.pid)[0] == "Z", "the killed worker to become a zombie")
        reason = f"pid {a.pid} has exited (a zombie)"
    assert read_claim(folder)["run_id"] == a_id, "SIGKILL leaves the claim file behind"
    b = spawn("b", folder, "hold", "--until", until)
    b_id = b.run_id()
    assert re.fullmatch(rf"note: taking over {re.escape(str(folder))} from run {a_id} \(host {re.escape(HOST)}, "
                        rf"pid {a.pid}, user [^,]+, started {ISO}\): {re.escape(reason)}\n", b.stderr()), b.stderr()
    info = read_claim(folder)
    assert (info["run_id"], info["took_over"]["run_id"], info["took_over"]["reason"]) == (b_id, a_id, reason)
    assert info["took_over"]["stolen"] is False
    touch(until)
    assert b.wait() == 0
    assert not has_claim(folder) and take_files(folder) == []
    a.wait()


def test_claim_of_another_host_is_taken_over_only_when_its_heartbeat_is_old(tmp_path, spawn):
    old, fresh = tmp_path / "old", tmp_path / "fresh"
    write_claim(old, age=3600)
    fresh_bytes = write_claim(fresh)
    a = spawn("a", old, "exit")
    b = spawn("b", fresh, "exit")
    assert a.wait() == 0, a.stderr()
    assert re.fullmatch(rf"note: taking over {re.escape(str(old))} from run foreign \(host other-node, pid 4242, "
                        r"user someone, started 2026-01-02T03:04:05\+00:00\): no heartbeat from host other-node for "
                        r"360[0-9] s \(limit 600 s\)\n", a.stderr()), a.stderr()
    assert not has_claim(old)
    assert b.wait() == 1
    assert re.fullmatch(rf"error: {re.escape(str(fresh))} is in use by another run: run foreign \(host other-node, "
                        r"pid 4242, user someone, started 2026-01-02T03:04:05\+00:00, command: train\.py --x 1\); "
                        r"last heartbeat [0-9]+ s ago\. Wait for it to finish, use another folder, or pass "
                        r"--steal_claim if you are sure that run is dead\n", b.stderr()), b.stderr()
    assert claim_bytes(fresh) == fresh_bytes


def test_stolen_folder_stops_the_holder_at_its_next_check(tmp_path, spawn):
    folder, until = tmp_path / "out", tmp_path / "stop"
    a = spawn("a", folder, "hold", "--check", "--until", tmp_path / "never")
    a_id = a.run_id()
    b = spawn("b", folder, "hold", "--steal", "--until", until)
    b_id = b.run_id()
    assert re.fullmatch(rf"warning: stealing {re.escape(str(folder))} from run {a_id} \(host {re.escape(HOST)}, "
                        rf"pid {a.pid}, user [^,]+, started {ISO}, command: .*\): if that run is still alive it "
                        r"stops at its next write, and what it wrote until then stays in the folder\n", b.stderr())
    assert a.wait() == 1
    err = a.stderr()
    assert err.count("\n") == 1, err
    assert re.fullmatch(rf"error: {re.escape(str(folder))}: this run \(run {a_id}, pid {a.pid}\) no longer holds the "
                        rf"folder: it was taken over by run {b_id} \(host {re.escape(HOST)}, pid {b.pid}, user [^,]+, "
                        rf"started {ISO}, command: \S*_claim_worker\.py \S+ hold --steal --until \S+\)\. This run "
                        r"wrote nothing more there and did not finish\n", err), err
    assert "done" not in a.stdout()
    info = read_claim(folder)  # the stolen-from run's exit (its with-block) left the stealer's claim alone
    assert (info["run_id"], info["pid"], info["took_over"]["run_id"], info["took_over"]["stolen"]) == (
        b_id, b.pid, a_id, True)
    touch(until)
    assert b.wait() == 0
    assert not has_claim(folder)


def test_sigterm_releases_the_claim_and_ends_the_process_by_sigterm(tmp_path, spawn):
    folder = tmp_path / "out"
    a = spawn("a", folder, "sleep")
    a.run_id()
    assert has_claim(folder)
    os.kill(a.pid, signal.SIGTERM)
    assert a.wait() == -signal.SIGTERM  # a shell reports 143
    assert not has_claim(folder)
    assert os.listdir(folder) == []


@pytest.mark.parametrize("mode", ["hold", "sleep"], ids=["with-block", "no-with-block"])
def test_sigterm_goes_to_a_previous_handler_and_the_claim_is_released_on_the_way_out(tmp_path, spawn, mode):
    folder = tmp_path / "out"
    a = spawn("a", folder, mode, "--prev_handler", "--until", tmp_path / "never")
    a.run_id()
    os.kill(a.pid, signal.SIGTERM)
    assert a.wait() == 7, a.stderr()  # the earlier handler decided: sys.exit(7)
    assert "previous handler" in a.stdout()
    assert not has_claim(folder)  # released by the with-block, or else by release_all at exit


@pytest.mark.parametrize("mode, status", [("exit", 0), ("raise", 1), ("atexit", 0)])
def test_normal_exit_and_exception_release(tmp_path, spawn, mode, status):
    folder = tmp_path / "out"
    a = spawn("a", folder, mode)
    assert a.wait() == status, a.stderr()
    a.line("claimed ")
    if mode == "raise":
        assert "RuntimeError: boom inside the claim" in a.stderr()
    assert not has_claim(folder)


def test_heartbeat_refreshes_the_claim_and_stops_after_release(tmp_path, spawn):
    folder, until = tmp_path / "out", tmp_path / "stop"
    a = spawn("a", folder, "release", "--heartbeat", 0.2, "--stale", 1, "--until", until)
    a_id = a.run_id()
    first = read_claim(folder)
    beats = {first["heartbeat"]}
    wait_until(lambda: beats.add(read_claim(folder)["heartbeat"]) or len(beats) >= 4, "4 heartbeats")
    info = read_claim(folder)
    assert info["heartbeat"] > first["heartbeat"] and info["heartbeat"] <= time.time() + 1
    assert {k: v for k, v in info.items() if k != "heartbeat"} == {k: v for k, v in first.items() if k != "heartbeat"}
    assert info["run_id"] == a_id and info["heartbeat_s"] == 0.2
    touch(until)
    assert a.line("released") == "released heartbeat_alive=False"
    while not a.done():  # the worker lives 1 s more (5 heartbeat periods): nothing brings the claim back
        assert not has_claim(folder)
        time.sleep(0.02)
    assert a.wait() == 0
    assert os.listdir(folder) == []


def test_heartbeat_never_rewrites_a_stolen_claim(tmp_path, spawn):
    folder, until = tmp_path / "out", tmp_path / "stop"
    a = spawn("a", folder, "hold", "--heartbeat", 0.2, "--stale", 1, "--until", until)
    a.run_id()
    h0 = read_claim(folder)["heartbeat"]
    wait_until(lambda: read_claim(folder)["heartbeat"] != h0, "a heartbeat")
    stolen = write_claim(folder, run_id="stealer", host=HOST, pid=os.getpid())
    time.sleep(1.2)  # 6 heartbeat periods
    assert claim_bytes(folder) == stolen
    touch(until)
    assert a.wait() == 1
    assert "no longer holds the folder: it was taken over by run stealer (host" in a.stderr()
    assert claim_bytes(folder) == stolen


def test_racing_successors_over_one_stale_claim_exactly_one_wins(tmp_path, spawn):
    for rnd in range(5):
        folder, barrier, until = tmp_path / f"out{rnd}", tmp_path / f"go{rnd}", tmp_path / f"stop{rnd}"
        if rnd % 2:  # gone by the pid rule, and by the heartbeat rule
            write_claim(folder, run_id="stale", host=HOST, pid=dead_pid())
        else:
            write_claim(folder, run_id="stale", age=3600)
        # every judgement takes 0.1 s more: all four judge the stale claim gone before any replaces it
        ws = [spawn(f"r{rnd}w{i}", folder, "hold", "--barrier", barrier, "--until", until, "--judge_delay", 0.1)
              for i in range(4)]
        for w in ws:
            w.line("ready")
        touch(barrier)
        wait_until(lambda ws=ws: all(w.done() or "claimed" in w.stdout() for w in ws), "every successor to claim or stop")
        winners = [w for w in ws if "claimed" in w.stdout()]
        assert len(winners) == 1, [w.stderr() for w in ws]
        winner_id = winners[0].run_id()
        for w in ws:
            if w is not winners[0]:
                assert w.wait() == 1
                assert f"is in use by another run: run {winner_id} (host {HOST}, pid {winners[0].pid}," in w.stderr()
        info = read_claim(folder)
        assert (info["run_id"], info["took_over"]["run_id"]) == (winner_id, "stale")
        assert take_files(folder) == []
        touch(until)
        assert winners[0].wait() == 0  # its last check() passed: nobody replaced its claim


# ----------------------------------------------------------------------------------------
# In this process


@pytest.mark.parametrize("content", [b"", b'{"claim_id": "half'], ids=["empty", "half-written"])
def test_unreadable_claim_is_held_while_fresh_and_taken_over_when_old(tmp_path, capsys, monkeypatch, content):
    monkeypatch.setattr(claims, "SETTLE_S", 0.2)  # how long a fresh unreadable file is given to get its content
    folder = tmp_path / "out"
    folder.mkdir()
    path = folder / CLAIM_FILE
    path.write_bytes(content)
    with pytest.raises(ClaimHeld, match=r"is being claimed by another run: its claim file is unreadable and was "
                                        r"written 0 s ago \(it may be being written\)"):
        claim_folder(folder, **IN_PROCESS)
    assert path.read_bytes() == content
    t = time.time() - 60
    os.utime(path, (t, t))
    with claim_folder(folder, **IN_PROCESS) as c:
        assert owner_run_id(folder) == c.run_id
    assert capsys.readouterr().err == (f"note: taking over {folder} from an unknown run: its claim file is unreadable "
                                       f"({len(content)} bytes) and unchanged for 60 s\n")
    assert os.listdir(folder) == []


def test_claim_file_still_being_written_is_waited_for(tmp_path, monkeypatch):
    """Two runs started at once: the loser may find the winner's claim file created (O_EXCL) but not yet
    written. It waits for the content and names the holder, instead of reporting an unreadable file."""
    monkeypatch.setattr(claims, "SETTLE_S", 20)
    folder = tmp_path / "out"
    content = write_claim(tmp_path / "model", run_id="writer")
    folder.mkdir()
    (folder / CLAIM_FILE).write_bytes(b"")
    script = ("import sys, time; print('ready', flush=True); time.sleep(0.3); "
              "f = open(sys.argv[1], 'r+b'); f.write(sys.argv[2].encode()); f.close()")
    writer = subprocess.Popen([sys.executable, "-c", script, str(folder / CLAIM_FILE), content.decode()],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "ready\n"
        with pytest.raises(ClaimHeld, match=r"is in use by another run: run writer \(host other-node, pid 4242"):
            claim_folder(folder, **IN_PROCESS)
    finally:
        writer.wait(TIMEOUT)
        writer.stdout.close()
    assert claim_bytes(folder) == content


def test_another_hosts_claim_counts_its_file_mtime_and_heartbeat_period(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_claim(a, heartbeat=time.time() - 3600)  # an old heartbeat field, but the file was just written
    write_claim(b, age=1000, heartbeat_s=600)  # 1000 s < 3 of the holder's own 600 s periods
    write_claim(c, age=3600, heartbeat_s=None)  # no heartbeat: never judged gone from another host
    for folder, why in [(a, "last heartbeat 0 s ago"), (b, "last heartbeat 1000 s ago"),
                        (c, "it has no heartbeat, so from another host it cannot be told dead")]:
        with pytest.raises(ClaimHeld, match=re.escape(why)):
            claim_folder(folder, **IN_PROCESS)


def test_reused_pid_other_kernel_and_other_pid_namespace(tmp_path, capsys):
    """A pid now used by a process started at another time is gone (pid reuse, our own pid included);
    a claim of another boot or pid namespace of this host is judged by its heartbeat."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for i, pid in enumerate([live.pid, os.getpid()]):
            folder = tmp_path / f"reused{i}"
            write_claim(folder, host=HOST, pid=pid, pid_start=1)
            with claim_folder(folder, **IN_PROCESS):
                assert f"pid {pid} is now another process (started at another time)\n" in capsys.readouterr().err
        for key in ("boot_id", "pid_ns"):
            folder = tmp_path / key
            write_claim(folder, host=HOST, pid=dead_pid(), **{key: "elsewhere"})
            with pytest.raises(ClaimHeld, match="; last heartbeat 0 s ago"):
                claim_folder(folder, **IN_PROCESS)
        folder = tmp_path / "live"
        write_claim(folder, host=HOST, pid=live.pid, pid_start=claims._proc_stat(live.pid)[1])
        with pytest.raises(ClaimHeld, match=f"; pid {live.pid} is running on this host"):
            claim_folder(folder, **IN_PROCESS)
    finally:
        live.kill()
        live.wait()


def test_release_and_check_never_touch_another_runs_claim(tmp_path):
    folder = tmp_path / "out"
    c = claim_folder(folder, **IN_PROCESS)
    c.check()
    theirs = write_claim(folder, run_id="stealer", host=HOST, pid=os.getpid())
    with pytest.raises(ClaimLost, match=r"no longer holds the folder: it was taken over by run stealer"):
        c.check()
    assert c.release() is False and c.release() is False
    assert claim_bytes(folder) == theirs
    os.unlink(folder / CLAIM_FILE)
    d = claim_folder(folder, **IN_PROCESS)
    os.unlink(folder / CLAIM_FILE)
    with pytest.raises(ClaimLost, match=re.escape(f"its claim file {folder / CLAIM_FILE} was removed")):
        d.check()
    assert d.release() is False
    e = claim_folder(folder, **IN_PROCESS)
    assert e.release() is True and e.release() is False
    with pytest.raises(RuntimeError, match="check\\(\\) after release\\(\\)"):
        e.check()
    assert os.listdir(folder) == []


def test_forked_child_releases_nothing(tmp_path):
    folder = tmp_path / "out"
    with claim_folder(folder, **IN_PROCESS) as c:
        pid = os.fork()
        if pid == 0:  # a DataLoader worker: it inherits the claim object and must leave the file alone
            claims.release_all()
            os._exit(0 if c.release() is False and has_claim(folder) else 1)
        assert os.waitpid(pid, 0)[1] == 0
        c.check()
    assert not has_claim(folder)


def test_abandoned_takeover_lock_is_skipped_and_a_live_one_waited_for(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out"
    write_claim(folder, run_id="stale", age=3600)
    key = read_claim(folder)["claim_id"]
    write_claim(tmp_path / "lock", host=HOST, pid=dead_pid())  # a successor that died mid-takeover
    os.replace(tmp_path / "lock" / CLAIM_FILE, folder / f"{CLAIM_FILE}.{key}.take1")
    with claim_folder(folder, **IN_PROCESS) as c:
        assert read_claim(folder)["took_over"]["run_id"] == "stale"
        assert take_files(folder) == []
        assert "note: taking over" in capsys.readouterr().err
        assert owner_run_id(folder) == c.run_id

    write_claim(folder, run_id="stale", age=3600)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a successor that is alive and taking the folder over right now
        write_claim(tmp_path / "lock", host=HOST, pid=live.pid)
        os.replace(tmp_path / "lock" / CLAIM_FILE, folder / f"{CLAIM_FILE}.{key}.take1")
        monkeypatch.setattr(claims, "BUSY_WAIT_S", 0.5)
        with pytest.raises(ClaimHeld, match="other runs have been claiming or taking over the folder"):
            claim_folder(folder, **IN_PROCESS)
        assert read_claim(folder)["run_id"] == "stale"
    finally:
        live.kill()
        live.wait()


def test_claim_for_job_claims_on_the_main_process_only(tmp_path):
    folder = tmp_path / "out"
    follower = claim_for_job(folder, is_main=False)
    assert not folder.exists(), "a follower creates nothing"
    follower.check()
    assert follower.release() is False and follower.run_id is None and not follower.is_main

    box = []  # a broadcast from the main process: what it sends, every process receives

    def share(x):
        if x is not None:
            box.append(x)
        return box[-1]

    main = claim_for_job(folder, is_main=True, share=share, **IN_PROCESS)
    assert main.is_main and owner_run_id(folder) == main.run_id
    assert claim_for_job(folder, is_main=False, share=share).run_id == main.run_id
    with pytest.raises(ClaimHeld) as refused:
        claim_for_job(folder, is_main=True, share=share, **IN_PROCESS)
    with pytest.raises(ClaimHeld) as refused_too:  # the followers stop too, with the main process's message
        claim_for_job(folder, is_main=False, share=share)
    assert str(refused_too.value) == str(refused.value)
    box.clear()
    with pytest.raises(ValueError):  # any failure on the main process reaches the followers
        claim_for_job(tmp_path / "y", is_main=True, share=share, heartbeat_s=60, stale_after_s=100, on_sigterm=False)
    with pytest.raises(UserError, match=r"^stale_after_s \(100\) must be .* \(on the main process\)$") as e:
        claim_for_job(tmp_path / "y", is_main=False, share=share)
    assert not isinstance(e.value, ClaimHeld)
    assert str(refused.value).startswith(f"{folder} is already claimed by this process (run {main.run_id} ")
    main.release()
    assert not has_claim(folder)


def test_run_ids(tmp_path):
    ckpt = tmp_path / "out" / "checkpoint-10"
    assert read_run_id(ckpt) is None and owner_run_id(tmp_path / "out") is None
    with claim_folder(tmp_path / "out", run_id="run-2026.1", **IN_PROCESS) as c:
        assert c.run_id == "run-2026.1" != c.claim_id
        assert owner_run_id(tmp_path / "out") == "run-2026.1"
        c.stamp(ckpt)
        assert read_run_id(ckpt) == "run-2026.1"
        write_run_id(ckpt, "other")
        assert read_run_id(ckpt) == "other"
    (ckpt / claims.RUN_ID_FILE).write_text("{not json")
    assert read_run_id(ckpt) is None
    (tmp_path / "out" / CLAIM_FILE).write_text("[]")
    assert owner_run_id(tmp_path / "out") is None
    with pytest.raises(UserError, match="run id 'a/b'"):
        claim_folder(tmp_path / "x", run_id="a/b", **IN_PROCESS)
    with pytest.raises(ValueError, match="at least twice heartbeat_s"):
        claim_folder(tmp_path / "x", heartbeat_s=60, stale_after_s=100, on_sigterm=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot create the folder"):
        claim_folder(tmp_path / "file" / "sub", **IN_PROCESS)


def test_module_docstring_example_runs():
    assert doctest.testmod(claims).failed == 0


def test_cost_of_claim_check_release(tmp_path):
    cost = claims.bench(tmp_path, n=100)
    print(f"claim_folder/check/release, median microseconds: {cost}")
    assert set(cost) == {"claim", "claim+heartbeat thread", "check", "release"}
    assert os.listdir(tmp_path) == []
