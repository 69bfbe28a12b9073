"""Runs one scenario in this (fresh) process and writes its figures as JSON:

    python -m benchmarks.worker throughput [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks.scenarios import SCENARIOS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="write the JSON here (default: stdout)")
    args = parser.parse_args()
    started = time.monotonic()
    result = SCENARIOS[args.scenario](args.quick)
    result["scenario_wall_s"] = round(time.monotonic() - started, 2)
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip native thread-pool teardown (see pistream.cli.entry)


if __name__ == "__main__":
    main()
