"""Writing subsets: the paper's JSON text of the chosen original records, built fast and exactly,
and a staging folder so that a run writes all its subset files or none."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

import numpy as np


def record_elements(records: list[dict], need) -> np.ndarray:
    """The text of each needed record as an element of a json.dumps(..., indent=4) list (object array,
    None where not needed). Records sharing the first record's keys with string values (the usual
    Alpaca case) are encoded column by column with json's C string encoder; others go through json.dumps.

    >>> record_elements([{"a": "x"}, {"a": 1}], [0, 1]).tolist()
    ['    {\\n        "a": "x"\\n    }', '    {\\n        "a": 1\\n    }']
    """
    enc = json.encoder.encode_basestring_ascii  # what json.dumps uses with ensure_ascii=True
    out = np.full(len(records), None, dtype=object)
    need = np.unique(np.asarray(need, dtype=np.int64)).tolist()
    if not need:
        return out
    keys = tuple(records[need[0]])
    same = [i for i in need if tuple(records[i]) == keys] if keys else []
    cols = [[records[i][k] for i in same] for k in keys]
    if same and all(type(k) is str for k in keys) and all(set(map(type, c)) == {str} for c in cols):
        acc = ["    {\n        " + enc(keys[0]) + ": " + e for e in map(enc, cols[0])]
        for k, c in zip(keys[1:], cols[1:]):
            sep = ",\n        " + enc(k) + ": "
            acc = [a + sep + e for a, e in zip(acc, map(enc, c))]
        out[same] = [a + "\n    }" for a in acc]
    for i in need:
        if out[i] is None:
            out[i] = json.dumps([records[i]], indent=4)[2:-2]
    return out


def records_json(elements: np.ndarray, indices) -> str:
    """json.dumps([records[i] for i in indices], indent=4) from record_elements' pieces."""
    if len(indices) == 0:
        return "[]"
    return "[\n" + ",\n".join(elements[np.asarray(indices, dtype=np.int64)].tolist()) + "\n]"


@contextlib.contextmanager
def staged_outputs(output_dir: str):
    """Yield a new hidden folder inside ``output_dir`` to write a run's files into; when the block ends
    without error, move each file into ``output_dir`` under its name (os.replace: atomic per file).
    If the block fails, the folder and what it holds are removed (and ``output_dir`` too if this call
    created it and it is empty), so no file in ``output_dir`` is added or changed. A kill -9 while
    writing leaves the hidden .subset-*.tmp folder behind, never a partial set of outputs; a crash during
    the renames (a few milliseconds) can leave some files new and some old, never a truncated one."""
    created = not os.path.isdir(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".subset-", suffix=".tmp", dir=output_dir)
    try:
        yield stage
        for name in os.listdir(stage):
            os.replace(os.path.join(stage, name), os.path.join(output_dir, name))
        os.rmdir(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(output_dir)
        raise
