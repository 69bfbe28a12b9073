"""Freed memory goes back to the operating system: glibc's heap after a trim, Arrow's pool by choice."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest

from pistream.stream import heap


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


@pytest.mark.skipif(heap._malloc_trim is None, reason="glibc's malloc_trim is not here")
def test_freed_heap_pages_are_returned_by_the_trim():
    blocks = [bytearray(1024) for _ in range(150_000)]  # ~150 MB of small malloc'd (not mmapped) blocks
    keep = bytearray(1024)  # allocated last, so the heap cannot simply shrink from its top
    del blocks
    before = rss_mb()
    heap.release_free_memory()
    after = rss_mb()
    assert before - after > 100, (before, after)
    del keep


def test_the_arrow_pool_returns_memory_unless_the_user_chose_one():
    chosen = heap.use_returning_arrow_pool()
    assert chosen == pa.default_memory_pool().backend_name
    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        assert chosen == "mimalloc"  # the default where jemalloc is not built in
    else:
        assert chosen == "jemalloc"
    script = "from pistream.stream.heap import use_returning_arrow_pool as use; print(use())"
    named = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"})
    assert named.stdout.strip() == "system"


def test_arrow_s_own_default_pool_is_the_returning_one_from_the_start():
    """Set before pyarrow is imported, so that Arrow's C++ code (the Parquet writer) allocates from it
    too, not only pyarrow's calls."""
    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow has no jemalloc")
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    script = "import pistream, pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert shown.stdout.strip() == "jemalloc"
    bare = subprocess.run([sys.executable, "-c", script.replace("import pistream, ", "import ")],
                          capture_output=True, text=True, check=True, env=env)
    assert bare.stdout.strip() == "mimalloc"  # what Arrow picks by itself
