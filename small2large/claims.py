"""One run per output folder: a claim file that a run creates in every folder it writes, so that a
second run started on the same folder (a command copied with its --output_dir unchanged, Slurm
--requeue relaunching a job while the old one lives) stops at once with one line naming the holder,
instead of both running and one silently losing its work.

Standard library only (plus utils.UserError / utils.atomic_write); nothing is imported from torch.

Usage (the integration calls it first thing, before any model or data is loaded):

    >>> import os, tempfile
    >>> from small2large.claims import ClaimHeld, claim_folder, owner_run_id, read_run_id, write_run_id
    >>> out = os.path.join(tempfile.mkdtemp(), "run")
    >>> with claim_folder(out, command="train.py --output_dir run") as claim:   # creates the folder
    ...     claim.check()               # before each write: raises ClaimLost if another run took it
    ...     write_run_id(os.path.join(out, "checkpoint-10"), claim.run_id)
    ...     try:
    ...         claim_folder(out)       # a second claim is refused while the first lives (another
    ...     except ClaimHeld as e:      # process is told "... is in use by another run: run <id> (host...")
    ...         print(str(e).startswith(out + " is already claimed by this process"), "pid" in str(e))
    ...     owner_run_id(out) == claim.run_id == read_run_id(os.path.join(out, "checkpoint-10"))
    True True
    True
    >>> owner_run_id(out) is None       # released on leaving the block (also on an error or SIGTERM)
    True

Under torchrun only the global main process claims (for every node); the others get a FollowerClaim
whose check() and release() do nothing:

    claim = claim_for_job(args.output_dir, is_main=dist.get_rank() == 0, steal=args.steal_claim,
                          share=lambda x: (dist.broadcast_object_list(box := [x], src=0), box[0])[1])

``share`` (optional) broadcasts the main process's outcome: the other ranks learn the run id, and when
the main process is refused they raise the same ClaimHeld instead of hanging in the next collective.

The claim file ``<folder>/.small2large-claim.json`` (hidden: utils.folder_sha256 skips it) holds one
line of JSON (shown here over several):

    {"format": "small2large-claim/1",
     "claim_id": "9b1d...",        uuid4 hex of this claim (one process's hold on one folder)
     "run_id": "9b1d...",          the caller's run id (default: claim_id); stamped into checkpoints
     "folder": "/abs/run",
     "host": "node17", "pid": 4242, "user": "ana",
     "pid_start": 123456,          /proc/<pid>/stat start time (clock ticks after boot), or null
     "boot_id": "bed5...", "pid_ns": "pid:[4026531836]",   which kernel and pid namespace pid lives in
     "started": "2026-05-09T07:35:25+00:00", "started_epoch": 1778312125.3,
     "command": "train.py --output_dir run",   sys.argv, shell-quoted
     "heartbeat": 1778312185.3,    time.time() of the last heartbeat
     "heartbeat_s": 60,            the holder's heartbeat period (null: no heartbeat)
     "took_over": null}            or {claim_id, run_id, host, pid, started, command, reason, stolen}

When the claim file exists, the holder is judged:

* same machine (same host name, boot id and pid namespace): alive while its pid runs (os.kill(pid, 0);
  a zombie, or a pid now used by a process started at another time than the claim's, counts as gone);
  the heartbeat plays no part;
* another machine (or a container with its own pid namespace): gone when neither the heartbeat field
  nor the file's mtime changed for ``stale_after_s`` (default 600 s = 10 heartbeats; never less than
  3 of the holder's own heartbeat periods). A holder without a heartbeat (heartbeat_s=None) is never
  judged gone from another machine. Clocks of the machines must agree to within a few minutes (NTP);
* an unreadable claim file: a fresh one is most likely being written by a run that has just created
  it, and is given SETTLE_S (2 s) to get its content; one that stays unreadable (a crash between
  creating and writing it) is gone when its mtime is older than CORRUPT_GRACE_S (30 s), else held.

A live holder: ClaimHeld (a UserError: one line, exit 1) naming host, pid, start time and command.
A gone holder is taken over with a one-line note on stderr. Takeover is race-free: a successor first
creates, with O_EXCL, a takeover lock named after the stale claim's id, re-reads the claim under it,
and replaces the file with os.replace, so the claim file never disappears during a takeover and of
two would-be successors only one wins (the other then finds a live holder). A lock left by a
successor that died mid-takeover is judged like a claim and skipped (at most MAX_TAKEOVER_LOCKS).

``steal=True`` (the scripts' --steal_claim) takes the folder whatever the holder's state, with a
warning. What it risks: if the other run is in fact alive, it goes on until its next check() (the
scripts check before every write) and then stops with ClaimLost; whatever it wrote until then -- at
most the file it was writing -- stays in the folder, mixed with this run's.

SIGTERM (scancel, Slurm preemption, torchrun stopping its workers after a failure) releases the
claims and ends the process by SIGTERM as before: claim_folder installs the handler when called on
the main thread (see install_sigterm_release for how it chains and what it cannot do). Normal exit and
exceptions release through the with-block (or the caller's try/finally); release_all also runs at
interpreter exit, but not after os._exit (run_cli leaves torchrun processes that way: use the with-block).

Limits, all documented races of a few microseconds, which need a run that is alive and a second one
acting at the same instant (only possible with steal=True or a misjudged holder): the heartbeat and
release() read the file and then replace/remove it, so a steal landing between the two is overwritten
(the stealer then gets ClaimLost at its next check) or removed. The check is advisory: a run that never
calls check() is not stopped. A job SIGKILLed on one machine and relaunched on another (multi-node
torchrun restarts, requeue on another node) waits up to stale_after_s, or uses steal. Needs a filesystem where O_EXCL create and rename are atomic (local
filesystems, NFSv3+ with the default close-to-open consistency, Lustre, GPFS).

Cost: claim_folder + check + release take a few syscalls each, well under a millisecond together;
``bench()`` (or ``python3 -m small2large.claims [FOLDER]`` from the repository root) measures them.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import shlex
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from small2large.claim_files import (
    _RUN_ID,
    _create_exclusive,
    _encode,
    _machine,
    _now_iso,
    _number,
    _one_line,
    _proc_stat,
    _read,
    _replace,
    _same_machine,
    _Seen,
    _unlink,
)
from utils import UserError, atomic_write

CLAIM_FILE = ".small2large-claim.json"
RUN_ID_FILE = "small2large-run.json"  # written into a checkpoint folder by write_run_id
FORMAT = "small2large-claim/1"
STEAL_FLAG = "--steal_claim"  # the scripts' flag, named in ClaimHeld's message

DEFAULT_HEARTBEAT_S = 60.0
DEFAULT_STALE_AFTER_S = 600.0
CORRUPT_GRACE_S = 30.0  # an unreadable claim (or takeover lock) younger than this may still be being written
MAX_TAKEOVER_LOCKS = 8  # abandoned takeover locks skipped for one stale claim before giving up
BUSY_WAIT_S = 30.0  # how long to wait for another successor that is taking over the same folder
SETTLE_S = 2.0  # how long to wait for a claim file just created by another run to get its content


class ClaimHeld(UserError):
    """The folder is claimed by another run that is (or may be) alive."""


class ClaimLost(UserError):
    """This run's claim on its folder was taken over (or removed) by someone else."""


# ----------------------------------------------------------------------------------------
# Reading and judging a claim file


def _settle(path: str, seen: _Seen | None) -> _Seen | None:
    """A fresh unreadable claim file is, most likely, one that another run has just created (O_EXCL)
    and not yet written: wait up to SETTLE_S for its content."""
    end = time.monotonic() + SETTLE_S
    while (seen is not None and seen.info is None and time.time() - seen.st.st_mtime <= CORRUPT_GRACE_S
           and time.monotonic() < end):
        time.sleep(0.005)
        seen = _read(path)
    return seen


def _judge(seen: _Seen, stale_after_s: float) -> tuple[bool, str]:
    """(gone, why): whether the holder of a claim (or takeover lock) is provably gone, and why."""
    info, now = seen.info, time.time()
    if info is None:
        age = now - seen.st.st_mtime
        if age > CORRUPT_GRACE_S:
            return True, f"its claim file is unreadable ({len(seen.raw)} bytes) and unchanged for {age:.0f} s"
        return False, f"its claim file is unreadable and was written {max(age, 0):.0f} s ago (it may be being written)"
    pid = info["pid"]
    if _same_machine(info):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True, f"pid {pid} is not running on this host"
        except PermissionError:
            pass  # it exists, owned by another user
        stat = _proc_stat(pid)
        if stat is not None:
            if stat[0] in "ZXx":
                return True, f"pid {pid} has exited (a zombie)"
            if isinstance(info.get("pid_start"), int) and stat[1] != info["pid_start"]:
                return True, f"pid {pid} is now another process (started at another time)"
        if pid == os.getpid():
            return False, "this very process holds it"
        return False, f"pid {pid} is running on this host"
    period = _number(info.get("heartbeat_s"))
    if "heartbeat_s" in info and info["heartbeat_s"] is None:
        return False, "it has no heartbeat, so from another host it cannot be told dead"
    limit = max(stale_after_s, 3 * period) if period else stale_after_s
    beat = max(_number(info.get("heartbeat")) or 0.0, seen.st.st_mtime)
    age = now - beat
    if age > limit:
        return True, f"no heartbeat from host {info['host']} for {age:.0f} s (limit {limit:.0f} s)"
    return False, f"last heartbeat {max(age, 0):.0f} s ago"


def _who(info: dict | None, command: bool = True) -> str:
    if info is None:
        return "an unknown run"
    g = info.get
    text = f"run {_one_line(g('run_id', '?'))} (host {_one_line(g('host'))}, pid {g('pid')}"
    if g("user"):
        text += f", user {_one_line(g('user'))}"
    text += f", started {_one_line(g('started', '?'))}"
    if command:
        text += f", command: {_one_line(g('command') or '?')}"
    return text + ")"


def _held_message(folder: str, seen: _Seen, why: str) -> str:
    if seen.info is not None and why == "this very process holds it":
        return (f"{folder} is already claimed by this process ({_who(seen.info, command=False)}): claim each "
                "folder once (do two of its options name the same folder?)")
    if seen.info is None:
        return (f"{folder} is being claimed by another run: {why} ({os.path.join(folder, CLAIM_FILE)}). Try again in "
                f"a minute, use another folder, or pass {STEAL_FLAG} if you are sure no other run uses it")
    return (f"{folder} is in use by another run: {_who(seen.info)}; {why}. Wait for it to finish, use another "
            f"folder, or pass {STEAL_FLAG} if you are sure that run is dead")


# ----------------------------------------------------------------------------------------
# Writing


def _lock_path(folder: str, key: str, k: int) -> str:
    return os.path.join(folder, f"{CLAIM_FILE}.{key}.take{k}")


def _take_lock(folder: str, key: str, data: bytes, stale_after_s: float) -> str | None:
    """The right to replace the claim ``key``: the path of the takeover lock this process created, or
    None when a live successor holds it. A lock whose creator is gone is skipped for the next one."""
    for k in range(1, MAX_TAKEOVER_LOCKS + 1):
        path = _lock_path(folder, key, k)
        if _create_exclusive(path, data):
            return path
        seen = _read(path)
        if seen is None or not _judge(seen, stale_after_s)[0]:
            return None
    raise UserError(f"{folder}: {MAX_TAKEOVER_LOCKS} takeovers of its claim were abandoned half-way; remove "
                    f"{os.path.join(folder, CLAIM_FILE)}.*.take* and try again")


# ----------------------------------------------------------------------------------------
# Claims

_LIVE: set[Claim] = set()
_SIGTERM: dict[str, Any] = {"pid": None, "prev": None}
_ATEXIT: list[int] = []


class Claim:
    """This process's hold on ``folder`` (returned by claim_folder). Attributes: run_id, claim_id,
    folder, path (the claim file), info (what the file holds), took_over (the previous holder's
    info when this claim replaced one, else None)."""

    is_main = True

    def __init__(self, folder: str, info: dict, heartbeat_s: float | None, took_over: dict | None):
        self.folder = folder
        self.path = os.path.join(folder, CLAIM_FILE)
        self.info = info
        self.run_id: str = info["run_id"]
        self.claim_id: str = info["claim_id"]
        self.took_over = took_over
        self.heartbeat_s = heartbeat_s
        self._pid = os.getpid()
        self._released = False
        self._done = False  # release() has removed the file, or found it not ours
        self._lock = threading.RLock()  # reentrant: SIGTERM may arrive while the main thread is in release()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat_s:
            self._thread = threading.Thread(target=self._beat, name=f"claim-heartbeat {folder}", daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<Claim {self.folder} run {self.run_id} {state}>"

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _ours(self, seen: _Seen | None) -> bool:
        return seen is not None and seen.info is not None and seen.info.get("claim_id") == self.claim_id

    def check(self) -> None:
        """Raise ClaimLost unless the claim file still holds this claim. Call it before every write."""
        if self._released:
            raise RuntimeError(f"{self!r}: check() after release()")
        seen = _read(self.path)
        if not self._ours(seen):
            raise ClaimLost(self._lost_message(seen))

    def _lost_message(self, seen: _Seen | None) -> str:
        if seen is None:
            what = f"its claim file {self.path} was removed"
        elif seen.info is None:
            what = f"its claim file {self.path} was replaced by an unreadable one"
        else:
            what = f"it was taken over by {_who(seen.info)}"
        return (f"{self.folder}: this run (run {self.run_id}, pid {self._pid}) no longer holds the folder: {what}. "
                f"This run wrote nothing more there and did not finish")

    def release(self) -> bool:
        """Remove the claim file if it still holds this claim (never another run's). Idempotent; does
        nothing in a forked child. True when the file was removed now."""
        if self._done or os.getpid() != self._pid:
            return False
        self._released = True  # no more heartbeats, no more check()
        self._stop.set()
        _LIVE.discard(self)
        with self._lock:  # a heartbeat being written finishes first (it then sees _released and stops)
            if self._done:
                return False
            try:  # (a SIGTERM arriving in here runs release() again, to the end: the RLock lets it in)
                seen = _read(self.path)
                if self._ours(seen):  # (a steal landing right here would be removed: documented race)
                    os.unlink(self.path)
                    return True
            except OSError:
                pass
            finally:
                self._done = True
        return False

    def stamp(self, checkpoint_dir: str | os.PathLike) -> None:
        """write_run_id(checkpoint_dir, self.run_id)."""
        write_run_id(checkpoint_dir, self.run_id)

    def _beat(self) -> None:
        """The heartbeat thread: every heartbeat_s seconds rewrite the claim with a new heartbeat, while
        it is ours; stop on release or as soon as the file holds something else (never resurrect it)."""
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                if self._released:
                    return
                try:
                    if not self._ours(_read(self.path)):
                        return  # stolen or removed: check() will tell the run
                    self.info["heartbeat"] = time.time()
                    _replace(self.path, _encode(self.info))  # (a steal landing right here is overwritten)
                except OSError:
                    continue  # a transient filesystem error: try again at the next beat


class FollowerClaim:
    """What a process other than the job's main one gets from claim_for_job: it holds nothing,
    check(), release() and stamp() do nothing. run_id is the main process's when ``share`` was given."""

    is_main = False

    def __init__(self, folder: str, run_id: str | None = None):
        self.folder = folder
        self.path = os.path.join(folder, CLAIM_FILE)
        self.run_id = run_id
        self.claim_id = None
        self.took_over = None

    def __repr__(self) -> str:
        return f"<FollowerClaim {self.folder} run {self.run_id}>"

    def __enter__(self) -> FollowerClaim:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def check(self) -> None:
        pass

    def release(self) -> bool:
        return False

    def stamp(self, checkpoint_dir: str | os.PathLike) -> None:
        pass


def check_all(held) -> None:
    """Claim.check() every claim of a run (ClaimLost at the first one taken over); before every write."""
    for c in held:
        c.check()


def claim_folder(folder: str | os.PathLike, *, command: str | None = None, steal: bool = False,
                 run_id: str | None = None, heartbeat_s: float | None = DEFAULT_HEARTBEAT_S,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S, on_sigterm: bool = True) -> Claim:
    """Claim ``folder`` for this process (creating the folder if needed), or raise ClaimHeld naming the
    run that holds it. A holder that is provably gone is taken over (note on stderr); ``steal`` takes
    the folder whatever the holder's state (warning on stderr; see the module docstring for the risk).

    command: recorded for the messages (default: sys.argv, shell-quoted). run_id: the run's id, stamped
    into checkpoints (default: a new uuid4 hex; pass the id of the logical run, e.g. a resumed run's
    manifest run id, to make it stable across relaunches). heartbeat_s: period of the heartbeat
    thread (None or 0: none, and then other hosts never judge this claim gone). stale_after_s: how old
    another host's heartbeat must be for its claim to be taken over. on_sigterm: install the SIGTERM
    handler that releases the process's claims (install_sigterm_release; main thread only)."""
    folder = os.fspath(folder)
    if heartbeat_s and stale_after_s < 2 * heartbeat_s:
        raise ValueError(f"stale_after_s ({stale_after_s}) must be at least twice heartbeat_s ({heartbeat_s})")
    if run_id is not None and not _RUN_ID.fullmatch(run_id):
        raise UserError(f"run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-'")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the folder ({e.strerror or e})") from None
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: not a folder")
    now = time.time()
    me = _machine()
    stat = _proc_stat(os.getpid())
    claim_id = uuid.uuid4().hex
    info = {"format": FORMAT, "claim_id": claim_id, "run_id": run_id or claim_id, "folder": os.path.abspath(folder),
            "host": me["host"], "pid": os.getpid(), "user": me["user"], "pid_start": stat[1] if stat else None,
            "boot_id": me["boot_id"], "pid_ns": me["pid_ns"], "started": _now_iso(now), "started_epoch": now,
            "command": shlex.join(sys.argv) if command is None else command, "heartbeat": now,
            "heartbeat_s": heartbeat_s or None, "took_over": None}
    path = os.path.join(folder, CLAIM_FILE)
    try:
        previous, why = _acquire(folder, path, info, steal, stale_after_s)
    except OSError as e:
        raise UserError(f"{folder}: cannot claim the folder ({e.strerror or e}: {e.filename or path})") from None
    if previous is not None:
        p = previous.info
        if steal:
            print(f"warning: stealing {folder} from {_who(p)}: if that run is still alive it stops at its next "
                  "write, and what it wrote until then stays in the folder", file=sys.stderr, flush=True)
        else:
            print(f"note: taking over {folder} from {_who(p, command=False)}: {why}", file=sys.stderr, flush=True)
    claim = Claim(folder, info, heartbeat_s or None, info["took_over"])
    _LIVE.add(claim)
    if os.getpid() not in _ATEXIT:
        _ATEXIT.append(os.getpid())
        atexit.register(release_all)
    if on_sigterm:
        install_sigterm_release()
    return claim


def _acquire(folder: str, path: str, info: dict, steal: bool, stale_after_s: float) -> tuple[_Seen | None, str]:
    """Create the claim file, or replace a gone (or, with ``steal``, any) holder's. Returns the
    replaced file (None when the folder was free) and why it was replaced."""
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        if _create_exclusive(path, _encode(info)):
            return None, ""
        seen = _settle(path, _read(path))
        if time.monotonic() > deadline:
            raise ClaimHeld(f"{folder}: other runs have been claiming or taking over the folder for {BUSY_WAIT_S:.0f} s "
                            f"(see {path} and the .take files next to it); try again later")
        if seen is None:
            continue  # released in between: create again
        why = "steal requested"
        if not steal:
            gone, why = _judge(seen, stale_after_s)
            if not gone:
                raise ClaimHeld(_held_message(folder, seen, why))
        lock = _take_lock(folder, seen.key, _encode({**info, "lock": True}), stale_after_s)
        if lock is None:  # another successor is replacing this very claim: see what it leaves
            time.sleep(random.uniform(0.002, 0.02))
            continue
        try:
            again = _read(path)  # under the lock: nobody else may replace this claim now
            if again is None or again.key != seen.key:
                continue  # it changed before we locked: judge it afresh
            if not steal:
                gone, why = _judge(again, stale_after_s)
                if not gone:
                    raise ClaimHeld(_held_message(folder, again, why))
            p = again.info or {}
            info["took_over"] = {"claim_id": p.get("claim_id"), "run_id": p.get("run_id"), "host": p.get("host"),
                                 "pid": p.get("pid"), "started": p.get("started"), "command": p.get("command"),
                                 "reason": why, "stolen": steal}
            _replace(path, _encode(info))
            return again, why
        finally:
            for k in range(1, MAX_TAKEOVER_LOCKS + 1):  # ours, and those of successors that died before us
                _unlink(_lock_path(folder, seen.key, k))
                if _lock_path(folder, seen.key, k) == lock:
                    break


def claim_for_job(folder: str | os.PathLike, *, is_main: bool, share: Callable[[Any], Any] | None = None,
                  **kwargs) -> Claim | FollowerClaim:
    """claim_folder(folder, **kwargs) on the job's global main process (``is_main``); a FollowerClaim
    elsewhere, which holds nothing (non-main processes never claim, on any node). ``share``, when given,
    is called on every process, with the main process's outcome there and None elsewhere, and must
    return the main process's value on every process (a torch.distributed.broadcast_object_list): then
    the followers learn the run id, and raise the main process's ClaimHeld too instead of waiting on it."""
    folder = os.fspath(folder)
    if not is_main:
        outcome = share(None) if share is not None else None
        if isinstance(outcome, dict) and outcome.get("error"):
            raise (ClaimHeld if outcome.get("held") else UserError)(outcome["error"])
        return FollowerClaim(folder, outcome.get("run_id") if isinstance(outcome, dict) else None)
    try:
        claim = claim_folder(folder, **kwargs)
    except Exception as e:
        if share is not None:  # the followers must not wait for a broadcast that never comes
            share({"error": f"{e} (on the main process)" if not isinstance(e, UserError) else str(e),
                   "held": isinstance(e, ClaimHeld)})
        raise
    if share is not None:
        share({"run_id": claim.run_id})
    return claim


def release_all() -> None:
    """Release every claim this process holds (registered with atexit by claim_folder)."""
    for claim in list(_LIVE):
        claim.release()


def _on_sigterm(signum: int, frame: Any) -> None:
    prev = _SIGTERM["prev"]
    if callable(prev) and prev is not _on_sigterm:
        prev(signum, frame)  # the earlier handler decides; the claims go as the program unwinds
        return
    if prev == signal.SIG_IGN:
        return
    release_all()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)  # the default action: the process ends by SIGTERM (status 143)
    time.sleep(5)
    os._exit(128 + signal.SIGTERM)


def install_sigterm_release() -> bool:
    """On SIGTERM, release this process's claims, then die by SIGTERM as without the handler (exit
    status 143; the default action). Installed once per process, from the main thread only (False
    elsewhere). A Python handler installed before is called instead, unchanged: it decides whether the
    process ends, and the claims are released as the program unwinds (with-block, release_all at exit);
    a SIGTERM ignored before stays ignored.

    Python runs the handler when the main thread next runs Python code: a process stuck in a C call (a
    hung NCCL collective) then ends only at the SIGKILL that Slurm or torchrun send after their grace
    period, and its claim is taken over by the pid or heartbeat rule. Forked children (DataLoader
    workers) inherit the handler but release nothing: a claim belongs to the process that made it."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if _SIGTERM["pid"] == os.getpid():
        return True
    prev = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _SIGTERM.update(pid=os.getpid(), prev=None if prev is _on_sigterm else prev)
    return True


# ----------------------------------------------------------------------------------------
# Run ids


def owner_run_id(folder: str | os.PathLike) -> str | None:
    """The run id in ``folder``'s claim file, or None when there is none (or it is unreadable)."""
    seen = _read(os.path.join(os.fspath(folder), CLAIM_FILE))
    run_id = seen.info.get("run_id") if seen is not None and seen.info is not None else None
    return run_id if isinstance(run_id, str) else None


def write_run_id(checkpoint_dir: str | os.PathLike, run_id: str) -> None:
    """Record in ``checkpoint_dir`` (created if needed) the id of the run that wrote it, atomically:
    ``small2large-run.json`` = {"run_id": ..., "written": ISO time}."""
    data = json.dumps({"run_id": run_id, "written": _now_iso(time.time())})
    with atomic_write(os.path.join(os.fspath(checkpoint_dir), RUN_ID_FILE)) as f:
        f.write(data + "\n")


def read_run_id(checkpoint_dir: str | os.PathLike) -> str | None:
    """The run id write_run_id recorded in ``checkpoint_dir``; None when there is none or it is
    unreadable (a checkpoint from before run ids, or not written by this code)."""
    try:
        with open(os.path.join(os.fspath(checkpoint_dir), RUN_ID_FILE), "rb") as f:
            run_id = json.loads(f.read()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


# ----------------------------------------------------------------------------------------
# Cost


def bench(folder: str | os.PathLike | None = None, n: int = 300) -> dict[str, float]:
    """Median microseconds of claim_folder (without and with the heartbeat thread), check and release
    on ``folder`` (default: a temporary folder), over ``n`` rounds."""
    import statistics
    import tempfile

    with contextlib.ExitStack() as stack:
        base = os.fspath(folder) if folder is not None else stack.enter_context(tempfile.TemporaryDirectory())
        target = os.path.join(base, "bench-claim")
        times: dict[str, list[float]] = {"claim": [], "claim+heartbeat thread": [], "check": [], "release": []}
        for i in range(n):
            hb = DEFAULT_HEARTBEAT_S if i % 2 else None
            t0 = time.perf_counter()
            claim = claim_folder(target, command="bench", heartbeat_s=hb, on_sigterm=False)
            t1 = time.perf_counter()
            claim.check()
            t2 = time.perf_counter()
            claim.release()
            t3 = time.perf_counter()
            times["claim+heartbeat thread" if hb else "claim"].append(t1 - t0)
            times["check"].append(t2 - t1)
            times["release"].append(t3 - t2)
        with contextlib.suppress(OSError):
            os.rmdir(target)
    return {k: round(statistics.median(v) * 1e6, 1) for k, v in times.items()}


if __name__ == "__main__":
    print(json.dumps(bench(sys.argv[1] if len(sys.argv) > 1 else None)))
