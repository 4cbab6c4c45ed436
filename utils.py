"""Shared pieces of the Small2Large pipeline: loading and validating files, safe pickles,
atomic writes, the Learning-Percentage formulas, and the supervised (Alpaca-prompt) data
used by both train.py and dump_pplxs.py.

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

import contextlib
import functools
import gzip
import io
import json
import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

IGNORE_INDEX = -100  # label value that the loss skips (prompt and padding tokens)

# Fixed by the paper's repo (Stanford Alpaca's prompt); the perplexities depend on it.
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}
# Chat records ({"messages": [...]}) are rendered turn by turn as "### {Role}:\n{content}\n\n";
# only the content of assistant turns (plus an eos token after each) is scored / trained on.
CHAT_SYSTEM_PREFIX = "Below is a conversation between a user and an assistant.\n\n"
CHAT_TURN = "### {role}:\n"
DEFAULT_PAD_TOKEN = "[PAD]"
DEFAULT_EOS_TOKEN = "</s>"
DEFAULT_BOS_TOKEN = "<s>"
DEFAULT_UNK_TOKEN = "<unk>"


class UserError(Exception):
    """A problem with the user's input or flags: reported as one line, no traceback."""


def run_cli(main: Callable[[Any], Any], argv: Sequence[str] | None = None) -> int:
    """Entry point used under ``if __name__ == "__main__"``: user errors become a one-line
    message on stderr and exit status 1 (argparse usage errors already exit 2)."""
    try:
        main(list(sys.argv[1:]) if argv is None else list(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no partial output was written", file=sys.stderr)
        return 130
    return 0


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


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def load_records(path: str | os.PathLike, allow_chat: bool = False) -> list[dict]:
    """Read a dataset: the paper's JSON list of records, or JSONL (one record per line);
    ``.gz`` is decompressed. Every record is validated once; errors name the record number.

    Alpaca records need string ``instruction`` and ``output``; ``input`` is optional ("" if absent).
    With ``allow_chat``, records of the form {"messages": [{"role", "content"}, ...]} are accepted.
    Returned records are the original dicts (with "input" filled in for Alpaca records)."""
    path = os.fspath(path)
    text = _read_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{path}: the dataset is empty")
    if stripped[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
    else:
        with contextlib.suppress(json.JSONDecodeError):
            whole = json.loads(text)
            if isinstance(whole, dict) and not ({"instruction", "messages"} & whole.keys()):
                keys = ", ".join(list(whole)[:5])
                raise UserError(f"{path}: expected a JSON list of records (or JSONL), got an object with keys {keys}")
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {lineno} is not valid JSON ({e})") from None
        if len(records) == 1 and not isinstance(records[0], dict):
            raise UserError(f"{path}: expected a JSON list of records or JSONL, got {type(records[0]).__name__}")
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise UserError(f"{path}: the dataset is empty")
    for i, r in enumerate(records):
        _validate_record(path, i, r, allow_chat)
    return records


def _validate_record(path: str, i: int, r: Any, allow_chat: bool) -> None:
    if not isinstance(r, dict):
        raise UserError(f"{path}: record {i} is a {type(r).__name__}, expected an object")
    if "messages" in r and allow_chat:
        msgs = r["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{path}: record {i}: 'messages' must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise UserError(f"{path}: record {i}: message {j} needs string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{path}: record {i}: no assistant turn to score")
        return
    for key in ("instruction", "output"):
        if key not in r:
            what = "an Alpaca record" + (" or a chat record" if allow_chat else "")
            raise UserError(f"{path}: record {i} has no '{key}' field (expected {what})")
        if not isinstance(r[key], str):
            raise UserError(f"{path}: record {i}: '{key}' must be a string, got {type(r[key]).__name__}")
    if "input" not in r or r["input"] is None:
        r["input"] = ""
    elif not isinstance(r["input"], str):
        raise UserError(f"{path}: record {i}: 'input' must be a string, got {type(r['input']).__name__}")


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


def format_prompt(record: dict) -> str:
    """The Stanford Alpaca prompt for one record (the no-input variant when input is empty)."""
    key = "prompt_input" if record.get("input", "") != "" else "prompt_no_input"
    return PROMPT_DICT[key].format_map(record)


def add_missing_special_tokens(tokenizer, model) -> int:
    """Give the tokenizer a pad token (and eos/bos/unk if missing), as the paper does, resize the
    model's embeddings and set each new input and output row to the mean of the old rows.
    This changes the softmax, so perplexities depend on it. Returns the number of tokens added."""
    special: dict[str, str] = {}
    if tokenizer.pad_token is None:
        special["pad_token"] = DEFAULT_PAD_TOKEN
    if tokenizer.eos_token is None:
        special["eos_token"] = DEFAULT_EOS_TOKEN
    if tokenizer.bos_token is None:
        special["bos_token"] = DEFAULT_BOS_TOKEN
    if tokenizer.unk_token is None:
        special["unk_token"] = DEFAULT_UNK_TOKEN
    if not special:
        return 0
    num_new = tokenizer.add_special_tokens(special)
    if num_new > 0:
        import torch

        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # rows set to the plain mean below
        with torch.no_grad():
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is None:
                    continue
                w = emb.weight
                w[-num_new:] = w[:-num_new].mean(dim=0, keepdim=True)
    return num_new


def _tokenize_lengths(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]


def tokenize_records(records: Sequence[dict], tokenizer, model_max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Tokenize records into (input_ids, labels) lists, in dataset order.

    Alpaca records: text = prompt + output + eos, truncated at ``model_max_length``; the first
    len(tokenize(prompt)) tokens are masked with IGNORE_INDEX (the prompt tokenized alone, as the
    paper does). If the prompt fills the window, every label is masked ("fully truncated").
    Chat records: every non-assistant span is masked; see CHAT_TURN."""
    eos = tokenizer.eos_token
    alpaca_idx = [i for i, r in enumerate(records) if not is_chat(r)]
    input_ids: list[list[int] | None] = [None] * len(records)
    labels: list[list[int] | None] = [None] * len(records)
    if alpaca_idx:
        sources = [format_prompt(records[i]) for i in alpaca_idx]
        examples = [s + f"{records[i]['output']}{eos}" for s, i in zip(sources, alpaca_idx)]
        ex_ids = _tokenize_lengths(tokenizer, examples, model_max_length)
        src_ids = _tokenize_lengths(tokenizer, sources, model_max_length)
        for i, ids, src in zip(alpaca_idx, ex_ids, src_ids):
            lab = list(ids)
            n = min(len(src), len(lab))
            lab[:n] = [IGNORE_INDEX] * n
            input_ids[i], labels[i] = list(ids), lab
    for i, r in enumerate(records):
        if is_chat(r):
            input_ids[i], labels[i] = _tokenize_chat(r["messages"], tokenizer, model_max_length)
    return input_ids, labels  # type: ignore[return-value]


def _tokenize_chat(messages: list[dict], tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    eos = tokenizer.eos_token
    text = CHAT_SYSTEM_PREFIX
    spans = []  # (start_char_prefix, end_char_prefix) of scored parts, as prefix strings
    for m in messages:
        text += CHAT_TURN.format(role=m["role"].capitalize())
        if m["role"] == "assistant":
            start = text
            text += m["content"] + eos
            spans.append((start, text))
            text += "\n\n"
        else:
            text += m["content"] + "\n\n"
    ids = _tokenize_lengths(tokenizer, [text], max_length)[0]
    lab = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        a, b = (len(x) for x in _tokenize_lengths(tokenizer, [start, end], max_length))
        lab[a:b] = ids[a:b]
    return ids, lab


@dataclass
class SupervisedData:
    """Tokenized records, dataset order. ``n_fully_truncated`` counts records with no label."""

    input_ids: list[list[int]]
    labels: list[list[int]]

    @functools.cached_property
    def n_fully_truncated(self) -> int:  # asked once per dump: counted once
        return sum(1 for lab in self.labels if all(t == IGNORE_INDEX for t in lab))

    def __len__(self) -> int:
        return len(self.input_ids)


def make_supervised_data(data_path: str, tokenizer, model_max_length: int) -> SupervisedData:
    records = load_records(data_path, allow_chat=True)
    ids, labels = tokenize_records(records, tokenizer, model_max_length)
    return SupervisedData(ids, labels)


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
