"""Profile the throughput scenario with py-spy and summarise where the time goes.

    python -m benchmarks.hotspots --record [--gil] [--quick]     # py-spy record + summary
    python -m benchmarks.hotspots profile.collapsed [--top 30]    # summary of an existing recording

``--gil`` samples only the thread holding the GIL: with one busy Trio thread and a commit thread, that is
the view that shows what limits throughput. Without it, threads waiting for the GIL are counted too.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def _name(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "/pistream/", "/benchmarks/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            path = ("pistream/" if marker == "/pistream/" else "benchmarks/" if marker == "/benchmarks/" else "") + path
            break
    return f"{m['func']} ({path})"


def record(path: str, gil: bool, quick: bool) -> None:
    """py-spy on a throughput worker (this interpreter); the blast server runs unprofiled beside it."""
    beside = Path(sys.executable).with_name("py-spy")  # a venv's script dir may not be on PATH
    cmd = [str(beside) if beside.exists() else "py-spy", "record", "--rate", "250", "--format", "raw", "-o", path]
    cmd += ["--gil"] if gil else []
    cmd += ["--", sys.executable, "-m", "benchmarks.worker", "throughput"] + (["--quick"] if quick else [])
    subprocess.run(cmd, check=True, timeout=900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default="throughput.collapsed")
    parser.add_argument("--record", action="store_true", help="record a new profile into PATH first")
    parser.add_argument("--gil", action="store_true", help="with --record: only the GIL-holding thread")
    parser.add_argument("--quick", action="store_true", help="with --record: the quick throughput size")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--match", default="", help="only functions whose name/file contains this")
    args = parser.parse_args()
    if args.record:
        record(args.path, args.gil, args.quick)
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    with open(args.path, encoding="utf-8") as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            count = int(count_text)
            frames = stack.split(";")
            threads[frames[0]] += count
            names = [_name(fr) for fr in frames[1:]]
            total += count
            for name in set(names):
                inclusive[name] += count
            if names:
                own[names[-1]] += count
    print(f"{total} samples")
    print("\nthreads:")
    for name, n in threads.most_common(8):
        print(f"  {100 * n / total:5.1f}%  {name}")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"\n{title}:")
        shown = 0
        for name, n in counter.most_common():
            if args.match and args.match not in name:
                continue
            print(f"  {100 * n / total:5.1f}%  {name}")
            shown += 1
            if shown >= args.top:
                break


if __name__ == "__main__":
    main()
