"""Trainer checkpoints: whether a checkpoint-N folder is complete (a kill can leave one half
written) and which one ``--resume_from_checkpoint last`` resumes from."""

from __future__ import annotations

import json
import os
import re

from small2large.claims import read_run_id
from utils import UserError, notice

STATE_FILES = (".pt", ".pth", ".bin", ".safetensors", ".json", ".distcp")  # never empty when whole


def _safetensors_intact(path: str) -> bool:
    """A .safetensors file is whole when its size is 8 + header + the end of its last tensor."""
    import struct

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return os.path.getsize(path) == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def checkpoint_problem(folder: str, save_only_model: bool = False, world_size: int = 1) -> str | None:
    """Why ``folder`` (a Trainer checkpoint-N) cannot be resumed from, or None when it is complete.

    transformers 5's Trainer._save_checkpoint writes, in this order: the model (save_model: weights,
    config, tokenizer, training_args.bin), the optimizer and scheduler (optimizer.pt/scheduler.pt, or
    FSDP's optimizer_0/ or DeepSpeed's global_stepN/), the scaler, the RNG state (rng_state[_R].pth,
    one per process), and trainer_state.json LAST, with plain non-atomic writes. A process killed
    during a save therefore leaves files that are missing, empty or cut short. Complete means:
    trainer_state.json parses and names step N; model weights, optimizer, scheduler and RNG state
    are present (without --save_only_model; RNG states of processes 0..world_size-1 when the checkpoint
    has one per process); and no file is empty or cut short (torch files are zip archives whose
    directory is written last; a .safetensors file's size follows from its header)."""
    problem = _trainer_state_problem(folder) or _damaged_file(folder)
    if problem:
        return problem
    names = set(os.listdir(folder))
    deepspeed = any(n.startswith("global_step") for n in names)
    return _shard_problem(folder, names) or _missing_state(names, deepspeed, save_only_model, world_size)


def _trainer_state_problem(folder: str) -> str | None:
    """Why ``folder``'s trainer_state.json is absent, unreadable or for another step; None when it is fine."""
    m = re.search(r"-(\d+)$", os.path.basename(os.path.normpath(folder)))
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
            step = json.load(f)["global_step"]
    except FileNotFoundError:
        return "no trainer_state.json (the Trainer writes it last: the save was interrupted)"
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is unreadable (cut short?)"
    if m and step != int(m.group(1)):
        return f"its trainer_state.json is for step {step}"
    return None


def _damaged_file(folder: str) -> str | None:
    """The first file under ``folder`` that is empty or cut short, as a problem; None when there is none."""
    import zipfile

    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if name.endswith(STATE_FILES) and os.path.getsize(path) == 0:
                return f"{rel} is empty"
            if name.endswith(".safetensors") and not _safetensors_intact(path):
                return f"{rel} is cut short"
            if name.endswith((".pt", ".pth", ".bin")) and not zipfile.is_zipfile(path):
                return f"{rel} is cut short"
    return None


def _shard_problem(folder: str, names: set[str]) -> str | None:
    """A sharded folder without .metadata, or a weight index that is unreadable or names a missing shard."""
    for n in names:  # sharded (distributed checkpoint) folders: .metadata is written after the shards
        if n.startswith(("pytorch_model_fsdp", "optimizer_")) and os.path.isdir(os.path.join(folder, n)) \
                and not os.path.isfile(os.path.join(folder, n, ".metadata")):
            return f"{n}/ has no .metadata"
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in names:
            try:
                with open(os.path.join(folder, index), encoding="utf-8") as f:
                    shards = set(json.load(f)["weight_map"].values())
            except (OSError, ValueError, KeyError, AttributeError):
                return f"{index} is unreadable"
            if shards - names:
                return f"{sorted(shards - names)[0]} (listed in {index}) is missing"
    return None


def _missing_state(names: set[str], deepspeed: bool, save_only_model: bool, world_size: int) -> str | None:
    """The first of weights, optimizer, scheduler and RNG state the checkpoint lacks; None when none is."""
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")
    if not (names & set(weights) or deepspeed or any(n.startswith("pytorch_model_fsdp") for n in names)):
        return "no model weights"
    if save_only_model:
        return None
    if not (deepspeed or names & {"optimizer.pt", "optimizer.bin"} or any(n.startswith("optimizer_") for n in names)):
        return "no optimizer state"
    if not deepspeed and "scheduler.pt" not in names:
        return "no scheduler.pt"
    if not any(re.fullmatch(r"rng_state(_\d+)?\.pth", n) for n in names):
        return "no rng_state.pth"
    if "rng_state.pth" not in names:  # one per process: a process killed before writing its own
        lost = [f"rng_state_{r}.pth" for r in range(world_size) if f"rng_state_{r}.pth" not in names]
        if lost:
            return f"no {lost[0]}"
    return None


def _checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N folders of ``output_dir``, newest (highest N) first."""
    from transformers.trainer_utils import sort_checkpoints

    return sort_checkpoints(output_dir)[::-1] if os.path.isdir(output_dir) else []


def run_checkpoints(output_dir: str, run_id: str | None) -> list[str]:
    """_checkpoints(output_dir) of the run ``run_id`` (the run that owns the folder): checkpoints that
    record another run's id are left out with a one-line note; those without one (written before run
    ids, or by another tool) are kept. All of them when ``run_id`` is None."""
    found = _checkpoints(output_dir)
    if run_id is None:
        return found
    other = [c for c in found if read_run_id(c) not in (None, run_id)]
    if other:
        notice(f"note: skipping {', '.join(os.path.basename(c) for c in other)} in {output_dir}: written by "
               f"another run than the one that owns the folder (run {run_id})")
    return [c for c in found if c not in other]


def newest_run_id(output_dir: str) -> str | None:
    """The run id recorded in the newest checkpoint-N of ``output_dir`` that has one, or None."""
    return next((r for r in map(read_run_id, _checkpoints(output_dir)) if r is not None), None)


def _newest_complete(output_dir: str, run_id: str | None = None, **check) -> tuple[str | None, list[tuple[str, str]]]:
    """(newest complete checkpoint of the run ``run_id`` or None, [(newer incomplete checkpoint, why), ...])."""
    skipped = []
    for c in run_checkpoints(output_dir, run_id):
        why = checkpoint_problem(c, **check)
        if why is None:
            return c, skipped
        skipped.append((c, why))
    return None, skipped


def resolve_resume(training_args, run_id: str | None = None) -> str | None:
    """--resume_from_checkpoint: a checkpoint folder, or "last"/"true" for the newest COMPLETE
    checkpoint-N in --output_dir (see checkpoint_problem: a run killed while saving leaves a partial
    one, which is skipped with a one-line note). An explicit incomplete checkpoint is a UserError
    naming the newest complete one. With ``run_id``, "last" considers only that run's checkpoints
    (run_checkpoints). Returns the folder (or None)."""
    value = training_args.resume_from_checkpoint
    if value is None or value == "":
        return None
    check = {"save_only_model": bool(getattr(training_args, "save_only_model", False)),
             "world_size": int(os.environ.get("WORLD_SIZE", "1"))}  # the processes torchrun started
    if str(value).lower() in ("last", "true"):
        out = training_args.output_dir
        if not _checkpoints(out):
            raise UserError(f"--resume_from_checkpoint {value}: no checkpoint-N folder in {out}")
        last, skipped = _newest_complete(out, run_id, **check)
        gone = "; ".join(f"{os.path.basename(c)}: {why}" for c, why in skipped)
        if last is None:
            raise UserError(f"--resume_from_checkpoint {value}: no complete checkpoint in {out} ({gone})")
        if skipped:
            notice(f"note: skipping incomplete {gone}; resuming from {last}")
        return last
    if not os.path.isdir(value):
        raise UserError(f"--resume_from_checkpoint {value}: no such checkpoint folder")
    why = checkpoint_problem(value, **check)
    if why is not None:
        newest, _ = _newest_complete(os.path.dirname(os.path.normpath(value)), **check)
        hint = f"the newest complete one is {newest}" if newest else "there is no complete checkpoint beside it"
        raise UserError(f"--resume_from_checkpoint {value} is incomplete ({why}); {hint}")
    return value
