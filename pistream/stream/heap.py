"""Memory the process no longer uses goes back to the operating system: glibc's heap is trimmed after
each commit, and Arrow allocates from a pool that returns freed pages.

glibc's malloc keeps freed memory mapped: a commit frees a whole batch (tens of MB of columns, Parquet
pages) in pieces scattered over the heap, and without a trim the process's RSS stays at its high-water
mark, so a steady stream looks like it holds ~50-80 MB it does not use. Elsewhere (Windows, macOS, musl)
the trim is a no-op: those allocators return memory on their own or have no such call.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable


def _find_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on; glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _find_trim()


def release_free_memory() -> None:
    """Return freed heap pages to the OS (2-4 ms with a few hundred MB of heap)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def use_returning_arrow_pool() -> str:
    """Arrow's jemalloc pool for pyarrow's own allocations, where the wheel has it, also in a process that
    imported pyarrow before pistream could set ``ARROW_DEFAULT_MEMORY_POOL`` (see ``pistream/__init__``).
    A pool named in that variable by the user wins. Returns the pool's name."""
    import pyarrow as pa

    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL", "jemalloc") != "jemalloc":
        return pa.default_memory_pool().backend_name
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # not built in (e.g. Windows wheels): keep the default
        pass
    return pa.default_memory_pool().backend_name
