"""The manifest of a perplexity dump folder: which run wrote which dump, of which dataset, how.

dump_pplxs.py (global rank 0 only) rewrites ``{dump_dir}/manifest.json`` atomically after every dump;
process_pickle.py and subset.py check the dumps they are given against it. Example::

    {"format": 1, "run_id": "3f2a...", "started": "2026-11-26T15:30:00Z", "output_dir": "/abs/output",
     "dataset": {"path": "/abs/data/alpaca_data.json", "sha256": "...", "n_records": 52002},
     "settings": {"model": "meta-llama/Llama-2-7b-hf", "tokenizer": "meta-llama/Llama-2-7b-hf",
                  "model_max_length": 512, "pplx_denominator": "nonzero", "pplx_logits": "scored", "seed": 42},
     "world_size": 4, "versions": {"python": "3.11.7", "torch": "2.13.0", ...},
     "files": {"epoch-pre.pkl": {"epoch": "pre", "run_id": "3f2a...", "partial": false, "global_step": 0,
                                 "n_records": 52002, "sha256": "...", "world_size": 4, "written": "..."}, ...}}

A folder holds the dumps of one run. A fresh run refuses a folder holding another run's dumps (or dumps
without a manifest) unless --overwrite_dumps, which removes them; a resumed run keeps its run id.
Folders without a manifest (the paper's released dumps) are read as before, unchecked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid

import data
from utils import UserError, atomic_write
from utils import file_sha256 as sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT = 1
DUMP_FILE = re.compile(r"epoch-(pre|\d+|\d+\.\d+-partial)\.pkl")  # dump_pplxs.dump_name's names
# settings that change the perplexities: a resumed run must use the same ones
RESUME_MUST_MATCH = ("model", "tokenizer", "model_max_length", "pplx_denominator", "seed")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def package_versions() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "tokenizers", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def dump_files(dump_dir: str) -> list[str]:
    """Names of the files in ``dump_dir`` that look like perplexity dumps (epoch-*.pkl), sorted."""
    if not os.path.isdir(dump_dir):
        return []
    return sorted(n for n in os.listdir(dump_dir) if DUMP_FILE.fullmatch(n))


def read_manifest(dump_dir: str) -> dict | None:
    """The manifest of ``dump_dir``, or None when it has none (a UserError when it is unreadable)."""
    path = os.path.join(dump_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
        if not (isinstance(m, dict) and isinstance(m.get("files"), dict) and isinstance(m.get("run_id"), str)):
            raise ValueError("not a dump manifest")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    return m


def write_manifest(dump_dir: str, manifest: dict) -> None:
    with atomic_write(os.path.join(dump_dir, MANIFEST_NAME)) as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


def file_entry(path: str, epoch, run_id: str, partial: bool, **extra) -> dict:
    """The manifest entry of the dump at ``path`` (just written): epoch ("pre", k, or the fractional
    epoch of a partial last epoch), run, sha256 of the file, time written; ``extra`` adds fields."""
    return {"epoch": epoch, "run_id": run_id, "partial": partial, "sha256": sha256_file(path), "written": now(),
            **extra}


def describe(m: dict) -> str:
    names = ", ".join(sorted(m["files"])) or "no dumps yet"
    return f"run {m['run_id']} ({names}; started {m.get('started', '?')}, output_dir {m.get('output_dir', '?')})"


def check_fresh_dump_dir(dump_dir: str, overwrite: bool) -> list[str]:
    """Before a fresh run: the files of an earlier run in ``dump_dir`` (its dumps and manifest), which
    --overwrite_dumps replaces. Without ``overwrite`` such files are a UserError (they would mix)."""
    m = read_manifest(dump_dir)
    old = sorted(set(dump_files(dump_dir)) | (set(m["files"]) if m else set()))
    old = [n for n in old if os.path.exists(os.path.join(dump_dir, n))]
    if not old:
        return [MANIFEST_NAME] if m else []
    if not overwrite:
        who = describe(m) if m else "a run without a manifest"
        raise UserError(f"--dump_dir {dump_dir} holds the dumps of another run: {who}; pass --overwrite_dumps to "
                        "remove them, --resume_from_checkpoint last to continue that run, or another --dump_dir")
    return [*old, MANIFEST_NAME] if m else old


def check_resume(m: dict | None, dump_dir: str, checkpoint: str, dataset: dict) -> None:
    """A resumed run continues the run recorded in ``dump_dir``: its checkpoint lies in that run's
    --output_dir, and the dataset (sha256) is the same."""
    if m is None:
        return
    folder = os.path.dirname(os.path.normpath(checkpoint))
    if m.get("output_dir") and os.path.realpath(m["output_dir"]) != os.path.realpath(folder):
        raise UserError(f"--dump_dir {dump_dir} holds the dumps of run {m['run_id']}, trained in {m['output_dir']}; "
                        f"the checkpoint resumed, {checkpoint}, is not from that run: use that run's --dump_dir")
    old = m.get("dataset", {})
    if old.get("sha256") != dataset["sha256"]:
        raise UserError(f"--data_path {dataset['path']} is not the dataset of run {m['run_id']} in {dump_dir} "
                        f"({old.get('path')}, {old.get('n_records')} records, another sha256)")


def check_settings(m: dict | None, settings: dict, dump_dir: str) -> None:
    """A resumed run must dump with the settings its earlier dumps were made with."""
    if m is None:
        return
    for key in RESUME_MUST_MATCH:
        old = m.get("settings", {}).get(key)
        if old is not None and old != settings.get(key):
            raise UserError(f"run {m['run_id']} in {dump_dir} was made with {key}={old!r}; this resumed run has "
                            f"{key}={settings.get(key)!r}: resume with the same flags")


# ----------------------------------------------------------------------------------------
# Checks of step 3 (process_pickle.py, subset.py)


def check_dumps(dataset: str, n_records: int, dumps: dict[str, str]) -> None:
    """``dumps``: flag name (epoch0..epoch3) -> path. When the dumps' folders hold manifests, every dump
    must be listed there unchanged (sha256), all must come from one run, from ``dataset`` (sha256 of the
    file and record count), none may be a partial last epoch, epoch0 must be the pre-training dump and
    the others whole epochs in increasing order (a warning when --epochK is not epoch K). Dumps without
    any manifest (the paper's) are not checked; a mix of both is a UserError."""
    manifests = {flag: read_manifest(os.path.dirname(os.path.abspath(p))) for flag, p in dumps.items()}
    with_m = [f for f, m in manifests.items() if m is not None]
    if not with_m:
        return
    if len(with_m) < len(dumps):
        bare = next(f for f, m in manifests.items() if m is None)
        raise UserError(f"{dumps[bare]} (--{bare}) has no {MANIFEST_NAME} beside it but {dumps[with_m[0]]} "
                        f"(--{with_m[0]}) has: cannot tell whether they come from one run")
    entries = {}
    for flag, path in dumps.items():
        m = manifests[flag]
        where = os.path.join(os.path.dirname(path) or ".", MANIFEST_NAME)
        e = m["files"].get(os.path.basename(path))
        if e is None:
            raise UserError(f"{path} (--{flag}) is not listed in {where}: not a dump of run {m['run_id']} "
                            "(left by an earlier run?)")
        if e.get("sha256") != sha256_file(path):
            raise UserError(f"{path} (--{flag}) is not the file run {m['run_id']} wrote (its sha256 differs from "
                            f"{where}): replaced or modified since")
        if e.get("partial"):
            raise UserError(f"{path} (--{flag}) is the dump of a partial last epoch ({e.get('epoch')} epochs, "
                            "training stopped by --max_steps or a fractional --num_train_epochs), not a whole epoch")
        entries[flag] = e
    runs = {e["run_id"] for e in entries.values()}
    if len(runs) > 1:
        detail = ", ".join(f"{dumps[f]} (--{f}): run {e['run_id']}" for f, e in entries.items())
        raise UserError(f"the dumps come from different runs ({detail})")
    digest = data.fingerprint(dataset)
    for flag in with_m:
        d = manifests[flag].get("dataset", {})
        if d.get("sha256") != digest:
            raise UserError(f"--dataset {dataset} is not the dataset {dumps[flag]} (--{flag}) was dumped for "
                            f"({d.get('path')}, {d.get('n_records')} records, another sha256)")
        if d.get("n_records") != n_records:
            raise UserError(f"--dataset {dataset} has {n_records} records; {dumps[flag]} (--{flag}) was dumped "
                            f"for {d.get('n_records')}")
    epochs = {f: e.get("epoch") for f, e in entries.items()}
    if "epoch0" in epochs and epochs["epoch0"] != "pre":
        raise UserError(f"{dumps['epoch0']} (--epoch0) is the dump after epoch {epochs['epoch0']}, not the "
                        "pre-training dump (epoch-pre.pkl)")
    later = [(f, epochs[f]) for f in sorted(epochs) if f != "epoch0"]
    for (fa, ea), (fb, eb) in zip(later, later[1:]):
        if ea == "pre" or eb == "pre" or not ea < eb:
            raise UserError(f"--{fa} is epoch {ea} and --{fb} is epoch {eb}: give the epoch dumps in training order")
    for f, e in later:
        if e != int(f[-1]):
            print(f"warning: {dumps[f]} (--{f}) is the dump after epoch {e}, not after epoch {f[-1]}")
