"""The claim files of small2large.claims: which machine and process a claim names, and reading,
writing and replacing the files atomically (O_CREAT|O_EXCL, os.replace)."""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

from utils import atomic_write

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MACHINE: dict[str, str | None] = {}


def _machine() -> dict[str, str | None]:
    """Host name, kernel boot id and pid namespace of this process (the last two None off Linux)."""
    if not _MACHINE:
        boot_id = pid_ns = None
        with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as f:
            boot_id = f.read().strip() or None
        with contextlib.suppress(OSError):
            pid_ns = os.readlink("/proc/self/ns/pid")
        _MACHINE.update(host=socket.gethostname(), boot_id=boot_id, pid_ns=pid_ns, user=_user())
    return _MACHINE


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks after boot) of a pid from /proc, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()  # the command name (field 2) may hold spaces and ")"
    try:
        return fields[0].decode(), int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError, OSError):  # no passwd entry (some containers), or not Unix
        return os.environ.get("USER") or (str(os.getuid()) if hasattr(os, "getuid") else "?")


def _now_iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).astimezone().isoformat(timespec="seconds")


def _one_line(text: Any) -> str:
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


@dataclass
class _Seen:
    """One read of a claim (or takeover lock) file: its bytes, its parsed content (None when
    unreadable) and its stat."""

    raw: bytes
    info: dict | None
    st: os.stat_result

    @property
    def key(self) -> str:
        """The claim's identity, safe in a file name: its claim_id, or a hash of an unreadable file."""
        cid = self.info.get("claim_id") if self.info else None
        if isinstance(cid, str) and _RUN_ID.fullmatch(cid) and len(cid) <= 64:
            return cid
        h = hashlib.sha256(self.raw + f"{self.st.st_ino}:{self.st.st_mtime_ns}".encode()).hexdigest()
        return "x" + h[:31]


def _parse(raw: bytes) -> dict | None:
    try:
        info = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not (isinstance(info, dict) and isinstance(info.get("claim_id"), str) and isinstance(info.get("host"), str)
            and type(info.get("pid")) is int and info["pid"] > 0):
        return None
    return info


def _read(path: str) -> _Seen | None:
    """The file at ``path`` now, or None when there is none. Retries NFS's stale file handle (the
    file was replaced between lookup and open)."""
    for attempt in range(5):
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                raw = f.read()
            return _Seen(raw, _parse(raw), st)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno != errno.ESTALE or attempt == 4:
                raise
    return None  # not reached


def _same_machine(info: dict) -> bool:
    me = _machine()
    if info.get("host") != me["host"]:
        return False
    return all(not info.get(k) or not me[k] or info.get(k) == me[k] for k in ("boot_id", "pid_ns"))


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _encode(info: dict) -> bytes:
    return (json.dumps(info) + "\n").encode()  # one line (indent would use json's slow pure-Python encoder)


def _create_exclusive(path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` if it does not exist (O_EXCL: atomic); False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    try:
        view = memoryview(data)
        while view:  # no fsync: after a crash of the machine its holder is gone anyway (and an empty
            view = view[os.write(fd, view):]  # file left by the crash is judged by its mtime)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
    return True


def _replace(path: str, data: bytes) -> None:
    with atomic_write(path, "wb", encoding=None) as f:
        f.write(data)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
