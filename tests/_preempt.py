"""Run dump_pplxs.py or train.py with a checkpoint save or a dump that stops part-way, so that a test
can SIGKILL the process at that very moment (tests/test_preemption.py). The project code has no test
hooks: this wrapper monkeypatches, then runs the script's main as its __main__ block does.

    python tests/_preempt.py {dump_pplxs|train} {save:STEP|dump:NAME} ARGS...

save:STEP  while the Trainer saves checkpoint-STEP, optimizer.pt is written half-way (a real torch.save
           cut in the middle), then the process prints HANGING and sleeps;
dump:NAME  while rank 0 writes the dump NAME (e.g. epoch-1.pkl), half of the pickle is written to its
           temporary file, then the process prints HANGING and sleeps.
"""

import io
import os
import pickle
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hang():
    print("HANGING", flush=True)
    time.sleep(600)
    os._exit(3)  # never reached in the tests: they kill the process


def hang_in_save(step: int) -> None:
    import torch
    from transformers import Trainer

    original = Trainer._save_optimizer_and_scheduler

    def save(self, output_dir):
        if self.state.global_step != step:
            return original(self, output_dir)
        buf = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buf)
        data = buf.getvalue()
        with open(os.path.join(output_dir, "optimizer.pt"), "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        _hang()

    Trainer._save_optimizer_and_scheduler = save


def hang_in_dump(name: str) -> None:
    import utils

    def dump(obj, f, *args, **kwargs):
        target = os.path.basename(os.readlink(f"/proc/self/fd/{f.fileno()}"))  # atomic_write's temporary file
        if target.startswith(f".{name}."):
            data = pickle.dumps(obj)
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _hang()
        return pickle.dump(obj, f, *args, **kwargs)

    utils.pickle = types.SimpleNamespace(**{**vars(pickle), "dump": dump})


def main(argv):
    script, what, *args = argv
    kind, _, arg = what.partition(":")
    if kind == "save":
        hang_in_save(int(arg))
    elif kind == "dump":
        hang_in_dump(arg)
    else:
        raise SystemExit(f"unknown hang {what!r}")
    from utils import run_cli

    module = __import__(script)
    return run_cli(module.main, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
