"""pistream: PI Web API channels into Delta Lake tables, exactly once."""

import os

# pistream does no linear algebra: without this, numpy's OpenBLAS keeps a thread per core spinning, which
# on a small PI host takes CPU from the pipeline (measured: ~7 % of a core in the throughput benchmark).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
