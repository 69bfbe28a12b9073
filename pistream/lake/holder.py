"""Who holds a claim on a table (a writer's claim on its app id, the maintenance lease): the host, the process
and when it started. A claim of a process on this host that no longer runs is free at once; on another host
only its expiry frees it, since no pid there can be checked.

The process's start time makes a reused pid harmless: on Linux it is read from ``/proc/<pid>/stat`` and must
match, elsewhere a running pid counts as the holder."""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass

_BOOT_TICKS: dict[int, int | None] = {}


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    start_ticks: int | None = None  # the process's start time in clock ticks since boot (Linux), else None
    role: str = ""  # e.g. "scheduler", "optimize": one process may hold claims in several roles

    def text(self) -> str:
        """``host:pid[:role]`` - what a person reads in messages and in ``maintenance status``."""
        return f"{self.host}:{self.pid}" + (f":{self.role}" if self.role else "")

    def to_dict(self) -> dict[str, object]:
        return {"host": self.host, "pid": self.pid, "start_ticks": self.start_ticks, "role": self.role}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Holder | None:
        """A holder written by ``to_dict``, or None for anything else (an older or foreign record)."""
        try:
            ticks = data.get("start_ticks")
            return cls(str(data["host"]), int(data["pid"]),  # type: ignore[call-overload]
                       int(ticks) if ticks is not None else None,  # type: ignore[call-overload]
                       str(data.get("role") or ""))
        except (KeyError, TypeError, ValueError):
            return None

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """``host:pid[:role]`` back into a holder (without a start time), or None."""
        host, _, rest = text.partition(":")
        pid, _, role = rest.partition(":")
        return cls(host, int(pid), None, role) if host and pid.isdigit() else None


def this_process(role: str = "") -> Holder:
    return Holder(socket.gethostname(), os.getpid(), process_start_ticks(os.getpid()), role)


def process_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (field 22 of /proc/<pid>/stat), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            text = stat.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = text[text.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_running(pid: int) -> bool:
    """Whether a process with this pid runs on this host now."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        return _windows_pid_running(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    except OSError:
        return False
    return True


def gone(holder: Holder, *, host: str | None = None) -> bool:
    """True only when ``holder`` is certainly not running: it was on this host and its process has ended (or
    its pid now belongs to a process started at another time). A holder on another host is never gone here."""
    if holder.host != (host or socket.gethostname()):
        return False
    if holder.pid == os.getpid() and holder.start_ticks in (None, process_start_ticks(os.getpid())):
        return False
    if not pid_running(holder.pid):
        return True
    if holder.start_ticks is not None:
        now = process_start_ticks(holder.pid)
        return now is not None and now != holder.start_ticks
    return False


def _windows_pid_running(pid: int) -> bool:
    import ctypes

    process_query_limited_information = 0x1000
    still_active = 259
    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def now_ms() -> int:
    return int(time.time() * 1000)
