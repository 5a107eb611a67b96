"""A process's resident memory now and at its peak, from /proc (Linux), with getrusage as the fallback.

Why not getrusage's ru_maxrss alone: Linux carries it across fork and exec, so a trainer started by a
large parent (pytest, torchrun, a notebook) would report the parent's peak as its own. VmHWM belongs to
the process image.
"""

from __future__ import annotations

import os
import resource
import sys


def rss_bytes(pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes(pid)


def peak_rss_bytes(pid: int | str = "self") -> int:
    """High-water mark of the resident set (VmHWM)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024  # kB
    except (OSError, StopIteration, ValueError, IndexError):
        if pid != "self":
            raise
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB
