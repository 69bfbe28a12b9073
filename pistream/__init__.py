"""pistream: PI Web API channels into Delta Lake tables, exactly once."""

import os
import sys

# pistream does no linear algebra: without this, numpy's OpenBLAS keeps a thread per core spinning, which
# on a small PI host takes CPU from the pipeline (measured: ~7 % of a core in the throughput benchmark).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Arrow's jemalloc pool hands freed pages back at once; its default (mimalloc) kept the commit thread's
# Parquet buffers resident: 100,000 tags at 1 Hz peaked ~50 MB higher. Arrow reads this once, before its
# first allocation, so it is set before pyarrow is imported (``heap.use_returning_arrow_pool`` covers a
# process that imported pyarrow first). Linux wheels have jemalloc; elsewhere Arrow would warn.
if sys.platform.startswith("linux"):
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")

__version__ = "0.1.0"
