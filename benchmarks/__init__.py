"""pistream's benchmark suite: ``python -m benchmarks`` (see benchmarks/README.md)."""

# First, as in the ``pistream`` command: importing pistream picks Arrow's memory pool before pyarrow loads.
import pistream  # noqa: F401
