"""The manifest of a perplexity dump folder: which run wrote which dump, of which dataset, how.

dump_pplxs.py (global rank 0 only) rewrites ``{dump_dir}/manifest.json`` atomically after every dump;
process_pickle.py and subset.py check the dumps they are given against it. Example::

    {"format": 1, "run_id": "3f2a...", "started": "2026-11-26T15:30:00Z", "output_dir": "/abs/output",
     "dataset": {"path": "/abs/data/alpaca_data.json", "sha256": "...", "n_records": 52002},
     "settings": {"model": "meta-llama/Llama-2-7b-hf", "tokenizer": "meta-llama/Llama-2-7b-hf",
                  "model_max_length": 512, "pplx_denominator": "nonzero", "pplx_logits": "scored", "seed": 42},
     "world_size": 4, "versions": {"python": "3.11.7", "torch": "2.13.0", ...},
     "files": {"epoch-pre.pkl": {"epoch": "pre", "run_id": "3f2a...", "partial": false, "global_step": 0,
                                 "n_records": 52002, "sha256": "...", "world_size": 4, "written": "..."},
               "noprompt/epoch-pre.pkl": {"epoch": "pre", "noprompt": true, ...}, ...}}

The settings also hold the rendering flags (response_boundary, chat_template, alpaca_as_chat, the
column map "fields") and the LoRA flags ("lora"); --score_only runs add ``"score_only": true``.

A folder holds the dumps of one run, the no-prompt (IFD) dumps in ``noprompt/`` included. A fresh run refuses a folder holding another run's dumps (or dumps
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

from small2large import record_io
from utils import UserError, atomic_write, notice
from utils import file_sha256 as sha256_file

MANIFEST_NAME = "manifest.json"


FORMAT = 1


DUMP_FILE = re.compile(r"epoch-(pre|\d+|\d+\.\d+-partial)\.pkl")  # dump_pplxs.dump_name's names


NOPROMPT_SUBDIR = "noprompt"  # {dump_dir}/noprompt/epoch-*.pkl: the no-prompt (IFD) dumps, listed as "noprompt/epoch-*.pkl"


# settings that change the perplexities (the scored tokens and the model): a resumed run must use the same ones
RESUME_MUST_MATCH = ("model", "tokenizer", "model_max_length", "pplx_denominator", "seed", "response_boundary",
                     "chat_template", "alpaca_as_chat", "fields", "lora")


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
    """Names of the files in ``dump_dir`` that look like perplexity dumps (epoch-*.pkl, and
    noprompt/epoch-*.pkl for the no-prompt ones), sorted."""
    out = []
    for sub in ("", NOPROMPT_SUBDIR):
        d = os.path.join(dump_dir, sub)
        if os.path.isdir(d):
            out += [f"{sub}/{n}" if sub else n for n in os.listdir(d) if DUMP_FILE.fullmatch(n)]
    return sorted(out)


def epoch_of(name: str):
    """The epoch of a dump file name: "pre", k (whole epoch) or the float of a partial one.

    >>> [epoch_of(n) for n in ("epoch-pre.pkl", "noprompt/epoch-3.pkl", "epoch-2.33-partial.pkl")]
    ['pre', 3, 2.33]
    """
    label = os.path.basename(name)[len("epoch-"):-len(".pkl")].removesuffix("-partial")
    return label if label == "pre" else float(label) if "." in label else int(label)


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
    if m.get("score_only"):
        raise UserError(f"--dump_dir {dump_dir} holds the dumps of run {m['run_id']}, a --score_only run (no "
                        "training, no checkpoint): nothing to resume there; use another --dump_dir")
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
    recorded = m.get("settings", {})
    for key in RESUME_MUST_MATCH:  # a setting the manifest does not record (an older run) is not compared
        old = recorded.get(key)
        if key in recorded and old != settings.get(key):
            raise UserError(f"run {m['run_id']} in {dump_dir} was made with {key}={old!r}; this resumed run has "
                            f"{key}={settings.get(key)!r}: resume with the same flags")


def _listing(path: str) -> tuple[str, str]:
    """(folder of the manifest that lists the dump at ``path``, its name there): a no-prompt dump
    {dump_dir}/noprompt/epoch-*.pkl is listed in {dump_dir}/manifest.json as "noprompt/epoch-*.pkl"."""
    folder, name = os.path.split(os.path.abspath(path))
    if os.path.basename(folder) == NOPROMPT_SUBDIR and not os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        return os.path.dirname(folder), f"{NOPROMPT_SUBDIR}/{name}"
    return folder, name


def check_dumps(dataset: str, n_records: int, dumps: dict[str, str], noprompt: tuple[str, int] | None = None) -> None:
    """``dumps``: flag name (epoch0..epoch3) -> path; ``noprompt``: (path, epoch) of the --noprompt dump
    (epoch 0 = before training). When the dumps' folders hold manifests, every dump must be listed there
    unchanged (sha256), all must come from one run, from ``dataset`` (sha256 of the file and record
    count), none may be a partial last epoch, epoch0 must be the pre-training dump and the others whole
    epochs in increasing order (a warning when --epochK is not epoch K); the no-prompt dump must be
    listed as one ("noprompt/epoch-*.pkl") of the same run, at its epoch. Dumps without any manifest
    (the paper's) are not checked; a mix of both is a UserError."""
    dumps = dict(dumps)
    if noprompt is not None:
        dumps["noprompt"] = noprompt[0]
    listing = {flag: _listing(p) for flag, p in dumps.items()}
    manifests = {flag: read_manifest(folder) for flag, (folder, _) in listing.items()}
    with_m = [f for f, m in manifests.items() if m is not None]
    if not with_m:
        return
    if len(with_m) < len(dumps):
        bare = next(f for f, m in manifests.items() if m is None)
        raise UserError(f"{dumps[bare]} (--{bare}) has no {MANIFEST_NAME} beside it but {dumps[with_m[0]]} "
                        f"(--{with_m[0]}) has: cannot tell whether they come from one run")
    entries = _listed_entries(dumps, listing, manifests)
    if noprompt is not None:
        _check_noprompt_entry(entries, listing, dumps, noprompt)
    _check_one_run(entries, dumps)
    _check_dataset(dataset, n_records, dumps, manifests, with_m)
    _check_epoch_order(entries, dumps)


def _listed_entries(dumps: dict[str, str], listing: dict[str, tuple[str, str]], manifests: dict) -> dict:
    """flag -> manifest entry of each dump, after checking it is listed, unchanged and a whole epoch."""
    entries = {}
    for flag, path in dumps.items():
        m = manifests[flag]
        where = os.path.join(listing[flag][0], MANIFEST_NAME)
        e = m["files"].get(listing[flag][1])
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
    return entries


def _check_noprompt_entry(entries: dict, listing: dict[str, tuple[str, str]], dumps: dict[str, str],
                          noprompt: tuple[str, int]) -> None:
    """The --noprompt dump must be listed as a no-prompt dump at --noprompt_epoch (``entries`` is reordered)."""
    e, want = entries.pop("noprompt"), "pre" if noprompt[1] == 0 else noprompt[1]
    if not listing["noprompt"][1].startswith(f"{NOPROMPT_SUBDIR}/") or e.get("epoch") != want:
        is_np = listing["noprompt"][1].startswith(f"{NOPROMPT_SUBDIR}/")
        what = f"the no-prompt dump at epoch {e.get('epoch')}" if is_np else "not a no-prompt dump"
        raise UserError(f"{dumps['noprompt']} (--noprompt) is {what}; --noprompt_epoch {noprompt[1]} needs "
                        f"{NOPROMPT_SUBDIR}/{'epoch-pre.pkl' if want == 'pre' else f'epoch-{want}.pkl'}")
    entries["noprompt"] = e


def _check_one_run(entries: dict, dumps: dict[str, str]) -> None:
    """All the dumps' entries must name one run id."""
    runs = {e["run_id"] for e in entries.values()}
    if len(runs) > 1:
        detail = ", ".join(f"{dumps[f]} (--{f}): run {e['run_id']}" for f, e in entries.items())
        raise UserError(f"the dumps come from different runs ({detail})")


def _check_dataset(dataset: str, n_records: int, dumps: dict[str, str], manifests: dict, with_m: list[str]) -> None:
    """Every manifest must record ``dataset``'s sha256 and ``n_records``."""
    digest = record_io.fingerprint(dataset)
    for flag in with_m:
        d = manifests[flag].get("dataset", {})
        if d.get("sha256") != digest:
            raise UserError(f"--dataset {dataset} is not the dataset {dumps[flag]} (--{flag}) was dumped for "
                            f"({d.get('path')}, {d.get('n_records')} records, another sha256)")
        if d.get("n_records") != n_records:
            raise UserError(f"--dataset {dataset} has {n_records} records; {dumps[flag]} (--{flag}) was dumped "
                            f"for {d.get('n_records')}")


def _check_epoch_order(entries: dict, dumps: dict[str, str]) -> None:
    """epoch0 must be the pre-training dump and the others whole epochs in increasing order (a warning
    when --epochK is not epoch K)."""
    epochs = {f: e.get("epoch") for f, e in entries.items() if f != "noprompt"}
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


def start_manifest(data_args, training_args, dump_args, ckpt) -> dict:
    """Global rank 0, before loading anything: check --dump_dir against the run. A fresh run refuses a
    folder holding another run's dumps (unless --overwrite_dumps, which replaces them); a resumed run
    continues the run recorded there (same --output_dir, same dataset) under the same run id."""

    d = dump_args.dump_dir
    dataset = {"path": os.path.abspath(data_args.data_path), "sha256": record_io.fingerprint(data_args.data_path)}
    old = read_manifest(d)
    if ckpt is None:
        replace = check_fresh_dump_dir(d, dump_args.overwrite_dumps)
        return {"replace": replace, "dataset": dataset}
    check_resume(old, d, ckpt, dataset)
    return {"old": old, "replace": [], "dataset": dataset}


def run_settings(tokenizer, model_args, data_args, training_args, dump_args) -> dict:
    """The settings a manifest records: those that change the perplexities (model, tokenizer, window,
    denominator, seed, the rendering flags and column map that decide the scored tokens, LoRA) and the
    logits mode."""
    lora = None
    if model_args.lora_r:
        lora = {"r": model_args.lora_r, "alpha": model_args.lora_alpha, "dropout": model_args.lora_dropout,
                "target_modules": model_args.lora_target_modules}
    return {"model": model_args.model_name_or_path, "tokenizer": tokenizer.name_or_path,
            "model_max_length": training_args.model_max_length, "pplx_denominator": dump_args.pplx_denominator,
            "pplx_logits": dump_args.pplx_logits, "seed": training_args.seed,
            "response_boundary": data_args.response_boundary, "chat_template": data_args.chat_template,
            "alpaca_as_chat": data_args.alpaca_as_chat, "fields": data_args.data_fields.resolved(), "lora": lora}


def settle_manifest(run, data, tokenizer, model_args, data_args, training_args, dump_args) -> tuple[dict, list[str]]:
    """The run's manifest (dataset, model, settings, versions) and the files to replace; a resumed run
    keeps its run id and files and must have the settings its dumps were made with."""

    settings = run_settings(tokenizer, model_args, data_args, training_args, dump_args)
    old = run.get("old")
    check_settings(old, settings, dump_args.dump_dir)
    m = old if old is not None else {"format": FORMAT, "run_id": new_run_id(),
                                     "started": now(), "files": {}}
    m.update(output_dir=os.path.abspath(training_args.output_dir), dataset={**run["dataset"], "n_records": len(data)},
             settings=settings, world_size=training_args.world_size, versions=package_versions())
    if old is None and training_args.resume_from_checkpoint:  # resuming a run made before manifests existed
        for name in dump_files(dump_args.dump_dir):
            epoch = epoch_of(name)
            extra = {"noprompt": True} if name.startswith(f"{NOPROMPT_SUBDIR}/") else {}
            m["files"][name] = file_entry(os.path.join(dump_args.dump_dir, name), epoch, m["run_id"],
                                                   partial=isinstance(epoch, float), adopted=True, **extra)
        if m["files"]:
            notice(f"note: {dump_args.dump_dir} has no manifest.json: its dumps {', '.join(m['files'])} are "
                         f"taken as this run's (run {m['run_id']})")
    return m, run["replace"]
