"""Shared pieces of the Small2Large pipeline: loading and validating files, safe pickles,
atomic writes, the Learning-Percentage formulas, the special tokens a model needs, and the
supervised data used by both train.py and dump_pplxs.py (records are rendered and tokenized by
rendering.py).

Nothing here does work at import time; the heavy imports (torch, transformers) happen
inside the functions that need them, so clustering.py / subset.py stay fast to start.

Worked example of the Learning Percentage (the paper's Eq. 1, with 3 epochs):

    >>> import numpy as np
    >>> p0, p1, p3 = np.array([10.0, 4.0, 2.0]), np.array([6.0, 3.0, 2.0]), np.array([2.0, 2.0, 2.0])
    >>> lp1(p0, p1, p3)            # (P0-P1)/(P0-P3); 0 where P0 == P3
    array([0.5, 0.5, 0. ])
    >>> lp1_approx(p0, p1)         # (P0-P1)/P0
    array([0.4 , 0.25, 0.  ])
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORE_INDEX = -100  # label value that the loss skips (prompt and padding tokens)

DEFAULT_PAD_TOKEN = "[PAD]"
DEFAULT_EOS_TOKEN = "</s>"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """-h keeps the docstring's commands as written and shows every flag's default."""


class UserError(Exception):
    """A problem with the user's input or flags: reported as one line, no traceback."""


def run_cli(main: Callable[[Any], Any], argv: Sequence[str] | None = None) -> int:
    """Entry point used under ``if __name__ == "__main__"``: user errors become a one-line
    message on stderr and exit status 1 (argparse usage errors already exit 2). Under torchrun the
    process leaves through _leave_torchrun (every rank together, no gloo abort at exit)."""
    rc = 0
    try:
        main(list(sys.argv[1:]) if argv is None else list(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        print("interrupted: no partial output was written", file=sys.stderr)
        rc = 130
    _leave_torchrun(rc)
    return rc


def _leave_torchrun(rc: int) -> None:
    """A torchrun process whose script set up torch.distributed: wait for every rank (after a
    successful run), destroy the process group, flush, and exit at once. Leaving through the
    interpreter's normal shutdown lets C++ destructors of gloo's threads run, which aborts the process
    ("terminate called without an active exception", SIGABRT) now and then, failing a finished job."""
    torch = sys.modules.get("torch")  # only if the script imported it; never import torch here
    if torch is None or not os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    with contextlib.suppress(Exception):
        if rc == 0:
            dist.barrier()  # no rank tears down the group while another still uses it
        dist.destroy_process_group()
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


# ----------------------------------------------------------------------------------------
# Atomic output


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[io.IOBase]:
    """Open a temporary file next to ``path``; on success fsync and rename it over ``path``.
    On any exception the temporary file is removed and ``path`` is left untouched."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        if "b" in mode:
            f = os.fdopen(fd, mode)
        else:
            f = os.fdopen(fd, mode, encoding=encoding, newline="")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_DOC_FILES = {"readme.md", ".gitattributes"}  # left out of folder_sha256: not part of a model or dataset


def folder_sha256(folder: str | os.PathLike) -> str:
    """sha256 of a folder's content: of every file's relative path and sha256, in sorted order (hidden
    files, README.md and .gitattributes aside), so any change of weights, tokenizer, config or data
    files changes it."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.lower() in _DOC_FILES:
                continue
            path = os.path.join(root, name)
            h.update(f"{os.path.relpath(path, folder)}\0{file_sha256(path)}\n".encode())
    return h.hexdigest()


def safe_name(text: str) -> str:
    """A file-name-safe version of a model or judge name.

    >>> safe_name("openai:gpt-4o/2024"), safe_name("hf:/models/Qwen2.5-7B")
    ('openai_gpt-4o_2024', 'hf_models_Qwen2.5-7B')
    """
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.\-]", "_", text)).strip("_") or "x"


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 4) -> None:
    """JSON with ``json.dumps`` defaults (ensure_ascii=True), indent 4: the paper's subset format."""
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=indent))


def write_pickle(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path, "wb", encoding=None) as f:
        pickle.dump(obj, f)


# ----------------------------------------------------------------------------------------
# Safe pickle loading

_SAFE_BUILTINS = {"list", "dict", "tuple", "set", "frozenset", "float", "int", "str", "bool", "complex", "bytes"}
_SAFE_NUMPY = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if (module, name) in _SAFE_NUMPY:
            return super().find_class(module, name)
        if module == "numpy" and name in {"float64", "float32", "float16", "int64", "int32"}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: only lists, dicts, numbers, strings and numpy arrays are allowed"
        )


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle without executing code: only plain containers, numbers, strings and numpy
    scalars/arrays are admitted; anything else (e.g. os.system) raises UserError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


# ----------------------------------------------------------------------------------------
# Datasets


def load_records(path: str | os.PathLike, allow_chat: bool = False, fields=None) -> list[dict]:
    """The normalized views of a dataset's records, in the source's order (see data.py for the
    formats: JSON list, JSONL, Parquet, .gz, saved datasets, hub ids). Every record is validated
    once; errors name the record number. Views are new dicts, the source records are untouched:
    Alpaca views are {"instruction", "input" ("" when missing or null), "output"}; with
    ``allow_chat``, chat and ShareGPT records become {"messages": [{"role", "content"}, ...]}.
    ``fields`` (a data.Fields) maps other column names."""
    import data

    return data.load(path, allow_chat=allow_chat, fields=fields).views


def is_chat(record: dict) -> bool:
    return "messages" in record


# ----------------------------------------------------------------------------------------
# Perplexity files and the Learning Percentage


def load_pplxs(path: str | os.PathLike) -> np.ndarray:
    """Load a perplexity dump (pickled list of floats, dataset order) as float64, rejecting
    NaN, inf, zero and negative values with the first offending record number."""
    obj = safe_load_pickle(path)
    if isinstance(obj, (dict, str, bytes)) or not hasattr(obj, "__len__"):
        raise UserError(f"{path}: expected a list of perplexities, got {type(obj).__name__}")
    try:
        arr = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: expected a list of numbers ({e})") from None
    if arr.ndim != 1:
        raise UserError(f"{path}: expected a flat list of perplexities, got shape {arr.shape}")
    return validate_pplxs(arr, path)


def validate_pplxs(arr: np.ndarray, where: str | os.PathLike) -> np.ndarray:
    """Raise a UserError naming ``where`` and the first bad record unless every perplexity is
    finite and > 0 (and there is at least one). Returns ``arr`` unchanged."""
    if arr.size == 0:
        raise UserError(f"{where}: the perplexity list is empty")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{where}: record {i} has perplexity {float(arr[i])!r} ({int(bad.sum())} invalid values); "
            "perplexities must be finite and > 0"
        )
    return arr


def check_lengths(named_lengths: dict[str, int]) -> int:
    """All files must describe the same records: raise a UserError naming every file and its
    length if they disagree (the paper's code silently misaligns). Returns the common length."""
    lengths = set(named_lengths.values())
    if len(lengths) > 1:
        detail = ", ".join(f"{name}: {n}" for name, n in named_lengths.items())
        raise UserError(f"length mismatch between inputs ({detail})")
    return lengths.pop()


def lp1(p0: np.ndarray, p1: np.ndarray, p3: np.ndarray) -> np.ndarray:
    """LP(1) = (P0 - P1) / (P0 - P3), in float64; 0 where P0 == P3 (the paper's convention)."""
    p0, p1, p3 = (np.asarray(x, dtype=np.float64) for x in (p0, p1, p3))
    den = p0 - p3
    out = np.zeros_like(den)
    nz = den != 0
    np.divide(p0 - p1, den, out=out, where=nz)
    return out


def lp1_approx(p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """LP(1)-approx = (P0 - P1) / P0, in float64 (needs only the pre-training and epoch-1 dumps)."""
    p0, p1 = (np.asarray(x, dtype=np.float64) for x in (p0, p1))
    return (p0 - p1) / p0


def truncated_mask(pplxs: Sequence[np.ndarray]) -> np.ndarray:
    """Records that look fully truncated: perplexity exactly 1.0 in every dump (no response
    token was scored, so the loss was taken as 0)."""
    m = np.ones(len(pplxs[0]), dtype=bool)
    for p in pplxs:
        m &= np.asarray(p) == 1.0
    return m


# ----------------------------------------------------------------------------------------
# Supervised data (shared by train.py and dump_pplxs.py)


def embedding_gather(params):
    """Context manager under which the full embedding matrices can be read and written on every
    process: DeepSpeed ZeRO-3 shards them (each rank holds a slice), so they are gathered, and rank
    0's writes are broadcast on exit (``GatheredParameters(..., modifier_rank=0)``). Without ZeRO-3
    the parameters are whole already: a no-op."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)
    return contextlib.nullcontext()


def _rows(weight) -> int:
    return int(getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3 keeps the full shape in ds_shape


def add_missing_special_tokens(tokenizer, model, pad_to_multiple_of: int | None = None) -> int:
    """Give the tokenizer a pad token ("[PAD]", as the paper does) when it has none, and an eos
    ("</s>") when it has none; never a bos or unk (a Qwen2.5-like tokenizer has neither, on purpose).
    Returns the number of tokens added.

    The embedding matrices never shrink: a new id that fits inside them (Qwen2.5, Phi-2: rows padded
    past the tokenizer) needs no resize; otherwise they grow to len(tokenizer) rows, rounded up to
    ``pad_to_multiple_of`` if given (the paper: exactly len(tokenizer); extra rows would take part in
    the softmax and change every perplexity). Each new token's input and output rows are set to the
    mean of the rows the tokenizer used before the addition (ids 0 .. len(tokenizer)-1; the padding
    rows past the tokenizer are left out), as the paper does -- on Llama-2 and OPT this is the mean of
    all old rows, the paper's number. A tied matrix is written once and stays tied. Under DeepSpeed
    ZeRO-3 the rows are written on gathered parameters (see embedding_gather)."""
    special: dict[str, str] = {}
    if tokenizer.pad_token is None:
        special["pad_token"] = DEFAULT_PAD_TOKEN
    if tokenizer.eos_token is None:
        special["eos_token"] = DEFAULT_EOS_TOKEN
    if not special:
        return 0
    n_before = len(tokenizer)
    num_new = tokenizer.add_special_tokens(special)
    if num_new <= 0:
        return 0
    import torch

    def weights():
        out = []
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            if emb is not None and all(emb.weight is not w for w in out):
                out.append(emb.weight)  # a tied matrix once
        return out

    tied = len(weights()) == 1 and model.get_output_embeddings() is not None
    rows = _rows(model.get_input_embeddings().weight)
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of,
                                      mean_resizing=False)  # the new rows are set to the plain mean below
    new_ids = list(range(n_before, len(tokenizer)))
    params = weights()
    with embedding_gather(params), torch.no_grad():
        for w in params:
            used = min(n_before, w.shape[0])
            w[new_ids] = w[:used].mean(dim=0, keepdim=True)
    if tied and len(weights()) != 1:
        raise RuntimeError("the input and output embeddings were tied before adding tokens and are not after")
    return num_new


@dataclass
class SupervisedData:
    """Tokenized records, dataset order. ``n_fully_truncated`` counts records with no label."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    n_boundary_mismatch: int = 0  # records whose prompt tokens are not a prefix of the full text's
    n_boundary_fixed: int = 0  # of those, tokenized prompt and response separately (--response_boundary exact)
    boundary_message: str | None = None  # the warning to show (None: nothing to report)

    @functools.cached_property
    def n_fully_truncated(self) -> int:  # asked once per dump: counted once
        return sum(1 for lab in self.labels if all(t == IGNORE_INDEX for t in lab))

    def __len__(self) -> int:
        return len(self.input_ids)


def make_supervised_data(data_path: str, tokenizer, model_max_length: int, options=None, fields=None) -> SupervisedData:
    """Load the records (``fields``: a data.Fields column map) and tokenize them
    (rendering.tokenize_records; ``options``: a rendering.RenderOptions, default the paper's rendering)."""
    from rendering import BoundaryStats, RenderOptions, tokenize_records

    records = load_records(data_path, allow_chat=True, fields=fields)
    stats = BoundaryStats()
    ids, labels = tokenize_records(records, tokenizer, model_max_length, options or RenderOptions(), stats=stats)
    return SupervisedData(ids, labels, len(stats.mismatched), stats.fixed, stats.message())


class SupervisedDataset:
    """torch-style map dataset over SupervisedData: item i -> {"input_ids", "labels"} (int64 tensors)."""

    def __init__(self, data: SupervisedData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        import torch

        return {
            "input_ids": torch.tensor(self.data.input_ids[i], dtype=torch.long),
            "labels": torch.tensor(self.data.labels[i], dtype=torch.long),
        }


def pad_batch(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_token_id: int):
    """Right-pad a batch of records: input_ids with the pad id, labels with IGNORE_INDEX; the attention
    mask comes from the true lengths (not from ``input_ids != pad``, which breaks when pad == eos).
    Returns (input_ids, labels, attention_mask) int64 tensors of shape [batch, longest].

    >>> ids, lab, att = pad_batch([[5, 6, 7], [8]], [[-100, 6, 7], [8]], pad_token_id=0)
    >>> ids.tolist(), lab.tolist(), att.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[-100, 6, 7], [8, -100, -100]], [[1, 1, 1], [1, 0, 0]])
    """
    import torch

    n = max(len(x) for x in input_ids)
    b = len(input_ids)
    ids = torch.full((b, n), pad_token_id, dtype=torch.long)
    lab = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
    att = torch.zeros((b, n), dtype=torch.long)
    for j, (x, y) in enumerate(zip(input_ids, labels)):
        k = len(x)
        ids[j, :k] = torch.as_tensor(x)
        lab[j, :k] = torch.as_tensor(y)
        att[j, :k] = 1
    return ids, lab, att


def pack_batch(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]):
    """Pack a batch of records into one row, in order, without padding (transformers'
    DataCollatorWithFlattening): position ids restart at 0 for every record, from which transformers
    builds a block-diagonal causal mask (sdpa, eager) or variable-length flash-attention calls, and the
    first label of every record is IGNORE_INDEX, so that no record's last token is trained to predict the
    next record's first one. A causal LM never predicts position 0 of a padded row either, so the loss
    over the packed row equals the loss over the padded batch. Returns (input_ids, labels, position_ids)
    int64 tensors of shape [1, total tokens].

    >>> ids, lab, pos = pack_batch([[5, 6, 7], [8, 9]], [[-100, 6, 7], [8, 9]])
    >>> ids.tolist(), lab.tolist(), pos.tolist()
    ([[5, 6, 7, 8, 9]], [[-100, 6, 7, -100, 9]], [[0, 1, 2, 0, 1]])
    """
    from transformers import DataCollatorWithFlattening

    flat = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    b = flat([{"input_ids": x, "labels": y} for x, y in zip(input_ids, labels)], return_tensors="pt")
    return b["input_ids"], b["labels"], b["position_ids"]


@dataclass
class DataCollatorForSupervisedDataset:
    """The Trainer's collator over a list of SupervisedDataset items: utils.pad_batch (the paper's
    right-padded batch), or with ``padding_free`` utils.pack_batch (the same records in the same order,
    packed into one row). ``use_cache=False`` goes with a packed batch: with a cache (the default of
    most configs) transformers does not look for packing in the position ids and lets records attend
    to each other."""

    pad_token_id: int
    padding_free: bool = False

    def __call__(self, instances: Sequence[dict]) -> dict:
        ids = [x["input_ids"] for x in instances]
        labels = [x["labels"] for x in instances]
        if self.padding_free:
            ids, lab, pos = pack_batch(ids, labels)
            return {"input_ids": ids, "labels": lab, "position_ids": pos, "use_cache": False}
        ids, lab, att = pad_batch(ids, labels, self.pad_token_id)
        return {"input_ids": ids, "labels": lab, "attention_mask": att}


def fmt_share(n: int, total: int) -> str:
    return f"{n} records ({100.0 * n / total:.1f}% of {total})" if total else f"{n} records"
