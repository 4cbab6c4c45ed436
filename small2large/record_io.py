"""Data formats: the one loader every script uses for --dataset / --data_path, and the writer of subsets.

Sources (``load``):
  * a JSON list of records (the paper's ``alpaca_data.json``), read with plain ``json``: exact and fast;
  * JSONL (one record per line; ``.jsonl``, ``.ndjson``, or any text file not starting with ``[``);
  * ``.gz`` of either;
  * Parquet (``.parquet``, read with pyarrow);
  * a folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``);
  * a Hugging Face hub dataset id (``tatsu-lab/alpaca``), through ``datasets.load_dataset``. It works
    offline from the local cache (HF_HUB_OFFLINE=1 is honoured by ``datasets``).
A split is chosen with a ``:SPLIT`` suffix: ``databricks/databricks-dolly-15k:train``,
``HuggingFaceH4/ultrachat_200k:train_sft``, ``tatsu-lab/alpaca:train[:1000]``, ``my_saved_dict:test``.
Without one: the id's split in KNOWN_HUB_DATASETS, else ``train`` (or a folder's only split).

Records, in the source's order and number:
  * Alpaca: string ``instruction`` and ``output``, optional ``input`` (missing or null: "").
  * chat: ``{"messages": [{"role", "content"}, ...]}`` with at least one assistant turn, or ShareGPT
    ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}`` (human -> user,
    gpt -> assistant; any other ``from`` is an error naming the record).
Other column names are mapped with Fields (--instruction_field, --input_field, --output_field,
--messages_field); KNOWN_HUB_DATASETS holds the maps of a few hub datasets (Dolly: context -> input,
response -> output). Flags given explicitly win over the table.

The rest of the code sees *views*: new dicts ``{"instruction", "input", "output"}`` (strings) or
``{"messages": [{"role", "content"}, ...]}``; the source records are never modified. A subset is
written from the *original* records, in the format of its source (``subset_format``): the paper's
JSON list (indent 4, ``json.dumps`` defaults) for JSON input, the source lines verbatim for JSONL,
Parquet (the source rows and schema) for Parquet files, saved datasets and hub ids; a Parquet subset
records the column map it was read with in its schema metadata, and the loader uses it as the file's
default map (a Dolly subset loads without --input_field/--output_field).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from utils import UserError, atomic_write, file_sha256, folder_sha256

SHAREGPT_KEY = "conversations"  # ShareGPT's list of turns


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


SUBSET_EXTENSIONS = {"json": ".json", "jsonl": ".jsonl", "parquet": ".parquet"}


# Parquet subsets carry the column map they were read with (e.g. Dolly's), so train.py reads them without flags
COLUMNS_METADATA_KEY = b"small2large.columns"


# Column maps (and default split) of known hub datasets; an explicit --*_field flag wins.
KNOWN_HUB_DATASETS: dict[str, dict[str, str]] = {
    "tatsu-lab/alpaca": {},
    "yahma/alpaca-cleaned": {},
    "vicgalle/alpaca-gpt4": {},
    "databricks/databricks-dolly-15k": {"input": "context", "output": "response"},
    "HuggingFaceH4/ultrachat_200k": {"split": "train_sft"},
    "HuggingFaceH4/no_robots": {},
}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class Fields:
    """Column names of the source records (None: the default name, or the known hub dataset's)."""

    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    messages: str | None = None

    def resolved(self, known: dict[str, str] | None = None) -> dict[str, str]:
        known = known or {}
        out = {}
        for name in ("instruction", "input", "output", "messages"):
            given = getattr(self, name)
            out[name] = given if given is not None else known.get(name, name)
        return out

    @classmethod
    def from_args(cls, args: Any) -> Fields:
        return cls(*(getattr(args, f"{n}_field", None) for n in ("instruction", "input", "output", "messages")))


FIELD_HELP = {
    "instruction": "column holding the instruction (default: instruction)",
    "input": "column holding the optional input/context (default: input; Dolly on the hub: context)",
    "output": "column holding the response (default: output; Dolly on the hub: response)",
    "messages": "column holding a chat's list of turns, {role, content} or ShareGPT {from, value} "
                "(default: messages; a 'conversations' column is read as ShareGPT)",
}


DATASET_HELP = ("JSON list (the paper's), JSONL, Parquet, .gz of JSON/JSONL, a datasets.save_to_disk folder, "
                "or a hub dataset id; ':SPLIT' picks a split (e.g. databricks/databricks-dolly-15k:train)")


def add_data_arguments(parser: argparse.ArgumentParser, dataset_help: str, required: bool = True) -> None:
    """--dataset and the column-mapping flags, shared by clustering.py, process_pickle.py, subset.py and
    report.py (where --dataset is optional: ``required`` False, default None)."""
    parser.add_argument("--dataset", required=required, default=None, help=f"{dataset_help}: {DATASET_HELP}")
    g = parser.add_argument_group("dataset columns (other names than the Alpaca / chat ones)")
    for name, text in FIELD_HELP.items():
        g.add_argument(f"--{name}_field", default=None, metavar="NAME", help=text)


@dataclass
class Records:
    """A loaded dataset: ``views`` (what the code uses) and what is needed to write subsets of the
    original records: ``originals`` (JSON/JSONL dicts as read), ``lines`` (JSONL source lines) or
    ``table`` (a pyarrow Table for Parquet and datasets)."""

    name: str
    fmt: str  # "json", "jsonl" or "parquet": the format subsets are written in
    views: list[dict]
    originals: list[dict] = field(repr=False)
    lines: list[str] | None = field(default=None, repr=False)
    table: Any = field(default=None, repr=False)
    columns: dict[str, str] = field(default_factory=dict)  # the column map used, non-default names only

    def __len__(self) -> int:
        return len(self.views)


def split_source(source: str) -> tuple[str, str | None]:
    """(path or hub id, split or None). A local path that exists is taken whole; otherwise a ':SPLIT'
    suffix is split off.

    >>> split_source("databricks/databricks-dolly-15k:train[:100]")
    ('databricks/databricks-dolly-15k', 'train[:100]')
    >>> split_source("tatsu-lab/alpaca")
    ('tatsu-lab/alpaca', None)
    """
    if os.path.exists(source):
        return source, None
    base, sep, split = source.partition(":")
    if sep and base and split:
        return base, split
    return source, None


def looks_like_hub_id(source: str) -> bool:
    """A hub id is 'name' or 'owner/name' with no file extension of a data file and no leading ./ or /.

    >>> looks_like_hub_id("tatsu-lab/alpaca"), looks_like_hub_id("data/x.json"), looks_like_hub_id("./d")
    (True, False, False)
    """
    if not _HUB_ID.match(source) or source.startswith((".", "/")):
        return False
    return not re.search(r"\.(json|jsonl|ndjson|parquet|gz|csv|txt|pkl)$", source, re.IGNORECASE)


def check_source(source: str, flag: str = "--dataset") -> None:
    """Fail early with a one-line error when ``source`` is neither an existing path nor a hub id."""
    path, _ = split_source(os.fspath(source))
    if not os.path.exists(path) and not looks_like_hub_id(path):
        raise UserError(f"{flag} {source}: no such file")


def load(source: str | os.PathLike, allow_chat: bool = False, fields: Fields | None = None) -> Records:
    """Read every record of ``source`` (see the module doc), validate it and build its view.
    Errors are one line naming the source and the record number."""
    source = os.fspath(source)
    fields = fields or Fields()
    path, split = split_source(source)
    known = KNOWN_HUB_DATASETS.get(path, {}) if not os.path.exists(path) else {}
    names = fields.resolved(known)
    if os.path.isdir(path):
        fmt, originals, table, lines = "parquet", *_read_saved_dataset(source, path, split), None
    elif os.path.isfile(path):
        if split is not None:
            raise UserError(f"{source}: a ':SPLIT' suffix only applies to hub ids and saved DatasetDict folders")
        base = path[:-3] if path.endswith(".gz") else path
        if base.lower().endswith(".parquet"):
            if path.endswith(".gz"):
                raise UserError(f"{path}: Parquet is compressed inside the file; give the .parquet file")
            fmt, lines = "parquet", None
            originals, table = _read_parquet(path)
            names = fields.resolved(_columns_metadata(table))
        else:
            jsonl = base.lower().endswith((".jsonl", ".ndjson"))
            fmt, originals, lines = _read_json_or_jsonl(path, jsonl, [*names.values(), SHAREGPT_KEY])
            table = None
    elif looks_like_hub_id(path):
        fmt, lines = "parquet", None
        originals, table = _read_hub(source, path, split or known.get("split", "train"))
    else:
        raise UserError(f"{source}: no such file")
    if not originals:
        raise UserError(f"{source}: the dataset is empty")
    views = [make_view(source, i, r, allow_chat, names) for i, r in enumerate(originals)]
    columns = {k: v for k, v in names.items() if v != k}
    return Records(source, fmt, views, originals, lines, table, columns)


def fingerprint(source: str | os.PathLike) -> str:
    """sha256 identifying a dataset's content, for the dump manifests: of the file's bytes for a file
    (what ``sha256sum`` prints), of every file's relative path and bytes for a saved-dataset folder, and
    of the records themselves (canonical JSON) for a hub id."""
    source = os.fspath(source)
    path, split = split_source(source)
    if os.path.isfile(path):
        return file_sha256(path)
    if os.path.isdir(path):
        return folder_sha256(path) if split is None else hashlib.sha256(f"{folder_sha256(path)}:{split}".encode()).hexdigest()
    h = hashlib.sha256()
    for r in load(source, allow_chat=True).originals:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _decode(path: str, raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{path}: not UTF-8: it starts with a UTF-16 byte-order mark; re-save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 byte-order mark, if any, is dropped
    except UnicodeDecodeError as e:
        hint = "UTF-16" if raw[1:200:2].count(0) > 10 or raw[0:200:2].count(0) > 10 else "Latin-1/cp1252"
        raise UserError(f"{path}: not UTF-8: byte 0x{raw[e.start]:02x} at offset {e.start} (is it {hint}?); "
                        "re-save it as UTF-8") from None


def read_text(path: str) -> str:
    """The text of a UTF-8 file (``.gz`` decompressed; a byte-order mark dropped); one-line errors."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    return _decode(path, raw)


def _read_json_or_jsonl(path: str, force_jsonl: bool, record_keys) -> tuple[str, list, list[str] | None]:
    """parse_json_or_jsonl of the text of ``path`` (read_text: plain or .gz)."""
    return parse_json_or_jsonl(read_text(path), path, force_jsonl, record_keys)


def parse_json_or_jsonl(text: str, path: str, force_jsonl: bool = False, record_keys=(),
                        what: str = "the dataset") -> tuple[str, list, list[str] | None]:
    r"""THE reading of a JSON list or JSONL text (``path`` names it in errors, ``what`` in the empty-file
    error): ("json", records, None) for a JSON list, ("jsonl", records, source lines) for JSONL (lines
    split at "\n" only, so U+2028/U+2029/U+0085 inside a string stay in it). A text holding one JSON
    object with none of ``record_keys`` is an error (a wrapper such as {"data": [...]}). Bad JSON is a
    one-line UserError.

    >>> parse_json_or_jsonl('{"a": "x\u2028y"}\n{"a": 2}\n', "f.jsonl")[1]
    [{'a': 'x\u2028y'}, {'a': 2}]
    >>> parse_json_or_jsonl('[{"a": 1}]', "f.json")
    ('json', [{'a': 1}], None)
    """
    stripped = text.lstrip()
    if not stripped:
        raise UserError(f"{path}: {what} is empty")
    if stripped[0] == "[" and not force_jsonl:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise UserError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        return "json", records, None
    if not force_jsonl:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict) and not (set(record_keys) & whole.keys()):
            keys = ", ".join(list(whole)[:5])
            raise UserError(f"{path}: expected a JSON list of records (or JSONL), got an object with keys {keys}")
    records, lines = [], []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {lineno} is not valid JSON ({e})") from None
        lines.append(line)
    if len(records) == 1 and not isinstance(records[0], dict):
        raise UserError(f"{path}: expected a JSON list of records or JSONL, got {type(records[0]).__name__}")
    return "jsonl", records, lines


def _read_parquet(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    return table.to_pylist(), table


def _columns_metadata(table) -> dict[str, str]:
    raw = (table.schema.metadata or {}).get(COLUMNS_METADATA_KEY)
    try:
        cols = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return {k: v for k, v in cols.items() if k in ("instruction", "input", "output", "messages") and isinstance(v, str)} \
        if isinstance(cols, dict) else {}


def _dataset_table(ds):
    """The pyarrow Table of a datasets.Dataset's rows, in order (indices mapping applied)."""
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    return ds.data.table


def _read_saved_dataset(source: str, path: str, split: str | None):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UserError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            split = "train" if "train" in ds or len(ds) != 1 else next(iter(ds))
        if split not in ds:
            raise UserError(f"{source}: no split {split!r} (splits: {', '.join(ds)}); add ':SPLIT'")
        ds = ds[split]
    elif split is not None:
        raise UserError(f"{source}: {path} holds a single Dataset, not a DatasetDict with splits")
    table = _dataset_table(ds)
    return table.to_pylist(), table


def _read_hub(source: str, repo: str, split: str):
    import datasets

    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception as e:  # noqa: BLE001 - hub, cache and network errors have many types; all are one line
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set: only datasets in the local cache load)" if offline else ""
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{source}: no such file or folder, and the hub dataset {repo!r} split {split!r} does not "
                        f"load{hint}: {msg}") from None
    if isinstance(ds, datasets.DatasetDict):  # a split expression can still give a dict
        raise UserError(f"{source}: give a split with ':SPLIT' (splits: {', '.join(ds)})")
    table = _dataset_table(ds)
    return table.to_pylist(), table


def make_view(where: str, i: int, r: Any, allow_chat: bool, names: dict[str, str]) -> dict:
    """The normalized view of record ``i`` (a new dict; ``r`` is not modified).

    >>> names = Fields().resolved()
    >>> make_view("d", 0, {"instruction": "Hi", "output": "Yo", "extra": 1}, False, names)
    {'instruction': 'Hi', 'input': '', 'output': 'Yo'}
    >>> make_view("d", 0, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
    ...           True, names)
    {'messages': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Yo'}]}
    """
    if not isinstance(r, dict):
        raise UserError(f"{where}: record {i} is a {type(r).__name__}, expected an object")
    key = names["messages"] if r.get(names["messages"]) is not None else SHAREGPT_KEY
    if allow_chat and r.get(key) is not None:
        return {"messages": _chat_view(where, i, key, r[key])}
    for name in ("instruction", "output"):
        col = names[name]
        if col not in r or r[col] is None:
            what = "an Alpaca record" + (" or a chat record" if allow_chat else "")
            flag = f"; --{name}_field names another column" if col == name else ""
            raise UserError(f"{where}: record {i} has no '{col}' field (expected {what}{flag})")
        if not isinstance(r[col], str):
            raise UserError(f"{where}: record {i}: '{col}' must be a string, got {type(r[col]).__name__}")
    inp = r.get(names["input"])
    if inp is None:
        inp = ""
    elif not isinstance(inp, str):
        raise UserError(f"{where}: record {i}: '{names['input']}' must be a string, got {type(inp).__name__}")
    return {"instruction": r[names["instruction"]], "input": inp, "output": r[names["output"]]}


def _chat_view(where: str, i: int, key: str, msgs: Any) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{where}: record {i}: '{key}' must be a non-empty list")
    out = []
    for j, m in enumerate(msgs):
        if isinstance(m, dict) and m.get("role") is not None:
            role, content = m.get("role"), m.get("content")
        elif isinstance(m, dict) and m.get("from") is not None:
            role, content = SHAREGPT_ROLES.get(m["from"]), m.get("value")
            if role is None:
                raise UserError(f"{where}: record {i}: turn {j} is from {m['from']!r}; ShareGPT turns must be from "
                                f"{', '.join(SHAREGPT_ROLES)}")
        else:
            role = content = None
        if not isinstance(role, str) or not isinstance(content, str):
            raise UserError(f"{where}: record {i}: message {j} needs string 'role' and 'content' "
                            "(or ShareGPT 'from' and 'value')")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: record {i}: no assistant turn to score")
    return out


def alpaca_text(view: dict) -> dict:
    """Instruction, input and output of a view, for the steps that read text (clustering's embedded
    sentence, the ranking CSV's sample column): a chat's system and user turns joined by newlines
    are its instruction, its assistant turns its output.

    >>> alpaca_text({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
    ...                           {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]})
    {'instruction': 'Hi\\nBye', 'input': '', 'output': 'Yo\\nCiao'}
    """
    if "messages" not in view:
        return view
    msgs = view["messages"]
    return {"instruction": "\n".join(m["content"] for m in msgs if m["role"] != "assistant"), "input": "",
            "output": "\n".join(m["content"] for m in msgs if m["role"] == "assistant")}


def subset_payload(records: Records, indices, json_list_text=None) -> str | bytes:
    """The bytes (or text) of the subset ``indices`` of the original records, in the source's format.
    ``json_list_text(indices)`` builds a JSON list's text (subset.py passes its fast, exact encoder);
    without it ``json.dumps(..., indent=4)``."""
    idx = [int(i) for i in indices]
    if records.fmt == "json":
        if json_list_text is not None:
            return json_list_text(indices)
        return json.dumps([records.originals[i] for i in idx], indent=4)
    if records.fmt == "jsonl":
        return "".join(records.lines[i] + "\n" for i in idx)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = records.table.take(pa.array(idx, type=pa.int64()))
    if records.columns:
        meta = dict(table.schema.metadata or {})
        meta[COLUMNS_METADATA_KEY] = json.dumps(records.columns).encode()
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_subset(path: str, payload: str | bytes) -> None:
    """Write one subset (from subset_payload) atomically. An OSError (disk full, ...) propagates:
    subset.py turns it into one line naming the final path, after removing the run's staged files."""
    if isinstance(payload, bytes):
        with atomic_write(path, "wb", encoding=None) as f:
            f.write(payload)
    else:
        with atomic_write(path) as f:
            f.write(payload)


def load_records(path: str | os.PathLike, allow_chat: bool = False, fields=None) -> list[dict]:
    """The normalized views of a dataset's records, in the source's order (see data.py for the
    formats: JSON list, JSONL, Parquet, .gz, saved datasets, hub ids). Every record is validated
    once; errors name the record number. Views are new dicts, the source records are untouched:
    Alpaca views are {"instruction", "input" ("" when missing or null), "output"}; with
    ``allow_chat``, chat and ShareGPT records become {"messages": [{"role", "content"}, ...]}.
    ``fields`` (a data.Fields) maps other column names."""

    return load(path, allow_chat=allow_chat, fields=fields).views


def is_chat(record: dict) -> bool:
    return "messages" in record
