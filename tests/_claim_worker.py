"""Claim a folder in a real process, for tests/test_claims.py.

    python tests/_claim_worker.py FOLDER MODE [--barrier F] [--until F] [--check] [--steal]
                                  [--heartbeat S] [--stale S] [--judge_delay S] [--prev_handler]

Prints "ready" once imported, waits for the --barrier file (if given), claims FOLDER with
small2large.claims.claim_folder and prints "claimed <run_id>". Errors go through utils.run_cli: a
UserError (ClaimHeld, ClaimLost) is one line "error: ..." on stderr and exit status 1.

MODE  hold     wait for the --until file (calling check() every 5 ms with --check), then check() once
               more (the run's "next write") and leave the with-block (release);
      sleep    sleep until killed (the SIGKILL and SIGTERM tests);
      exit     leave the with-block at once;
      raise    raise RuntimeError inside the with-block (traceback, exit 1);
      atexit   return without releasing: release_all at interpreter exit does it;
      release  wait for the --until file, release(), print "released heartbeat_alive=<bool>", sleep 1 s.

--prev_handler installs, before claiming, a SIGTERM handler that prints "previous handler" and exits
with status 7 (SystemExit), as a program with its own handler would.

--judge_delay S makes every judgement of a claim take S seconds more (monkeypatched here, as
tests/_preempt.py does), so that racing successors all judge the stale claim before any replaces it.
"""

import argparse
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from small2large import claims  # noqa: E402
from utils import run_cli  # noqa: E402


def wait_for(path: str, every: float, claim=None) -> None:
    deadline = time.monotonic() + 300  # never outlive a failed test by long
    while not os.path.exists(path):
        if claim is not None:
            claim.check()
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(every)


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("mode", choices=["hold", "sleep", "exit", "raise", "atexit", "release"])
    p.add_argument("--barrier")
    p.add_argument("--until")
    p.add_argument("--check", action="store_true")
    p.add_argument("--steal", action="store_true")
    p.add_argument("--heartbeat", type=float, default=claims.DEFAULT_HEARTBEAT_S)
    p.add_argument("--stale", type=float, default=claims.DEFAULT_STALE_AFTER_S)
    p.add_argument("--judge_delay", type=float, default=0.0)
    p.add_argument("--prev_handler", action="store_true")
    a = p.parse_args(argv)
    if a.prev_handler:
        def previous(signum, frame):
            print("previous handler", flush=True)
            sys.exit(7)

        signal.signal(signal.SIGTERM, previous)
    if a.judge_delay:
        judge = claims._judge

        def slow_judge(*args, **kwargs):
            verdict = judge(*args, **kwargs)
            time.sleep(a.judge_delay)
            return verdict

        claims._judge = slow_judge
    print("ready", flush=True)
    if a.barrier:
        wait_for(a.barrier, 0.001)
    kw = {"steal": a.steal, "heartbeat_s": a.heartbeat or None, "stale_after_s": a.stale}
    if a.mode in ("sleep", "atexit"):
        claim = claims.claim_folder(a.folder, **kw)
        print(f"claimed {claim.run_id}", flush=True)
        if a.mode == "sleep":
            time.sleep(600)
            os._exit(3)  # never reached in the tests: they kill the process
        return
    with claims.claim_folder(a.folder, **kw) as claim:
        print(f"claimed {claim.run_id}", flush=True)
        if a.mode == "raise":
            raise RuntimeError("boom inside the claim")
        if a.mode == "hold":
            wait_for(a.until, 0.005, claim if a.check else None)
            claim.check()
        if a.mode == "release":
            wait_for(a.until, 0.005)
            claim.release()
            claim._thread.join(5)
            print(f"released heartbeat_alive={claim._thread.is_alive()}", flush=True)
            time.sleep(1.0)
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))
