"""Runs a project script (train.py or dump_pplxs.py) as __main__ with its own argv and, when each
process's Trainer.train() returns, writes the sha256 of that process's trained weights to
$RANK_HASH_DIR/rank{RANK}.txt (tests: under DDP every rank must end with the same weights).

    python -m torch.distributed.run --nproc_per_node 2 tests/_rank_hash.py train.py --model_name_or_path ...
"""

import hashlib
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def weights_sha256(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main():
    import transformers

    original = transformers.Trainer.train

    def train(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        path = os.path.join(os.environ["RANK_HASH_DIR"], f"rank{os.environ.get('RANK', '0')}.txt")
        with open(path, "w") as f:
            f.write(weights_sha256(self.accelerator.unwrap_model(self.model_wrapped)))
        return out

    transformers.Trainer.train = train
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


if __name__ == "__main__":
    main()
