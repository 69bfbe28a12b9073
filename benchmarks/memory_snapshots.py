r"""Where the memory of the *memory* (or *restart*) scenario goes: the scenario in this process, with
snapshots at set times.

    python -m benchmarks.memory_snapshots [--duration 60] [--at 10,30,50]
    python -m benchmarks.memory_snapshots --scenario restart --at 5,10,30,60

Each snapshot prints the process's resident memory by mapping (``/proc/self/smaps``: shared libraries,
glibc's main heap, anonymous maps by size), glibc's own account (``mallinfo2``: in use vs. free but kept),
Arrow's pool, pymalloc's blocks, the most numerous Python objects by type, and the Python containers of
over 50,000 items with their owners. The times count from the start of the pipeline this process runs (for
*restart*: the second run, after the first one and the downtime). Linux with glibc only.
The scenario's figures (peak, warm-up, end RSS, slope) print at the end as the suite reports them.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import re
import sys
import threading
import time

from . import scenarios


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def by_mapping() -> list[str]:
    """Resident MB per kind of mapping, largest first."""
    kinds: collections.Counter[str] = collections.Counter()
    lazy_free = 0  # pages an allocator gave back with MADV_FREE: counted in RSS until the kernel needs them
    kind = ""
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split()
                low, high = (int(x, 16) for x in parts[0].split("-"))
                name = parts[5] if len(parts) > 5 else ""
                size_mb = (high - low) >> 20
                kind = ("lib " + name.rsplit("/", 1)[-1] if name.startswith("/") else name
                        or (f"anon {min(size_mb, 128)} MB maps" if size_mb else "anon < 1 MB maps"))
            elif line.startswith("Rss:"):
                kinds[kind] += int(line.split()[1])
            elif line.startswith("LazyFree:"):
                lazy_free += int(line.split()[1])
    libraries = sum(v for k, v in kinds.items() if k.startswith("lib "))
    lines = [f"RSS {sum(kinds.values()) / 1024:.0f} MB, of it shared libraries {libraries / 1024:.0f} MB, "
             f"freed lazily (MADV_FREE) {lazy_free / 1024:.0f} MB"]
    lines += [f"  {k}: {v / 1024:.1f} MB" for k, v in kinds.most_common(12)]
    return lines


def heap_account() -> str:
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (f"glibc: heaps {info.arena / 1e6:.0f} MB (in use {info.uordblks / 1e6:.0f}, free but kept "
            f"{info.fordblks / 1e6:.0f}), mmapped blocks {info.hblkhd / 1e6:.0f} MB")


def big_containers() -> list[str]:
    """dicts and lists of over 50,000 items (tag tables), and which attribute of what holds them."""
    lines = []
    for obj in gc.get_objects():
        if isinstance(obj, dict | list) and len(obj) > 50_000:
            owners = [f"{type(r).__name__}.{k}" for r in gc.get_referrers(obj) if hasattr(r, "__dict__")
                      for k, v in vars(r).items() if v is obj]
            lines.append(f"  {type(obj).__name__} of {len(obj)}: {sys.getsizeof(obj) / 1e6:.1f} MB, "
                         f"held by {', '.join(owners) or '?'}")
    return lines


def object_counts(top: int = 12) -> str:
    """The most numerous Python objects the collector tracks, by type (tuples of atoms are not tracked)."""
    counts = collections.Counter(type(obj).__name__ for obj in gc.get_objects())
    return "objects: " + ", ".join(f"{name} {n:,}" for name, n in counts.most_common(top))


DEEP_ROOTS = ("EventFilter", "ColumnBuffer", "GapQueue", "MemoryChannelState", "TagIndex", "TagIds", "GapFiller",
              "CommitWriter", "Flusher")


def deep_sizes(limit_mb: float = 1.0) -> list[str]:
    """Bytes reachable from each attribute of the pipeline's main objects (``--deep``), each object counted
    once, under the first attribute that reaches it: slow (every object visited), so only for diagnosis."""
    seen: set[int] = set()
    lines = []

    def reach(root: object) -> tuple[int, int]:
        total = count = 0
        stack = [root]
        while stack:
            obj = stack.pop()
            if id(obj) in seen or isinstance(obj, type) or callable(obj) and not isinstance(obj, list | dict):
                continue
            seen.add(id(obj))
            total += sys.getsizeof(obj)
            count += 1
            stack.extend(gc.get_referents(obj))
        return total, count

    roots = [obj for obj in gc.get_objects() if type(obj).__name__ in DEEP_ROOTS]
    for root in roots:
        seen.add(id(root))
    for root in roots:
        fields = vars(root) if hasattr(root, "__dict__") else {
            name: getattr(root, name) for name in getattr(type(root), "__slots__", ()) if hasattr(root, name)}
        for name, value in fields.items():
            size, count = reach(value)
            if size >= limit_mb * 1e6:
                lines.append(f"  {type(root).__name__}.{name}: {size / 1e6:.1f} MB in {count:,} objects")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("memory", "restart"), default="memory")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--deep", action="store_true", help="also the bytes behind each attribute (slow)")
    parser.add_argument("--at", default="10,30,50", help="seconds after the start, comma-separated")
    args = parser.parse_args(argv)
    sizes = scenarios.SIZES[args.scenario]
    sizes["duration"] = (args.duration, sizes["duration"][1])
    times = [float(t) for t in args.at.split(",")]
    pipeline_started = threading.Event()
    run_pipeline = scenarios._run_pipeline

    def timed_run(*a, **kw):  # type: ignore[no-untyped-def]
        pipeline_started.set()
        return run_pipeline(*a, **kw)

    scenarios._run_pipeline = timed_run

    def snapshots() -> None:
        import pyarrow as pa

        pipeline_started.wait()
        started = time.time()
        for at in times:
            time.sleep(max(0.0, started + at - time.time()))
            lines = [f"--- {at:.0f} s", *by_mapping(), heap_account(),
                     f"Arrow pool ({pa.default_memory_pool().backend_name}): "
                     f"{pa.total_allocated_bytes() / 1e6:.0f} MB",
                     f"pymalloc blocks {sys.getallocatedblocks():,}", object_counts(), *big_containers()]
            if args.deep:
                lines += deep_sizes()
            print("\n".join(lines), file=sys.stderr, flush=True)

    threading.Thread(target=snapshots, daemon=True).start()
    result = scenarios.SCENARIOS[args.scenario](False)
    result.pop("rss_series_MB")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
