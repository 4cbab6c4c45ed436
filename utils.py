"""The ground floor of the Small2Large pipeline: one-line user errors and the CLI entry point,
the one HelpFormatter, notices printed once per torchrun job, atomic writes, sha256 of files,
folders and texts, and pickles that never execute code on load. It imports no project module.

    >>> with atomic_write("/tmp/small2large-doctest.txt") as f:
    ...     _ = f.write("whole or nothing")
    >>> file_sha256("/tmp/small2large-doctest.txt") == sha256_text("whole or nothing")
    False
    >>> file_sha256("/tmp/small2large-doctest.txt") == hashlib.sha256(b"whole or nothing").hexdigest()
    True

Nothing here does work at import time; heavy imports (torch, transformers) happen inside the
functions that need them, so clustering.py and subset.py stay fast to start.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

IGNORE_INDEX = -100  # label value that the loss skips (prompt and padding tokens)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """-h keeps the docstring's commands as written and shows every flag's default (unless its help
    already explains the default in words; required flags and flags without a default show none)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


class UserError(Exception):
    """A problem with the user's input or flags: reported as one line, no traceback."""


def is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def notice(msg: str) -> None:
    if is_main_rank():  # once per job, not once per process
        print(msg, file=sys.stderr, flush=True)


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
# Messages and text hashes


def fmt_share(n: int, total: int) -> str:
    return f"{n} records ({100.0 * n / total:.1f}% of {total})" if total else f"{n} records"


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
