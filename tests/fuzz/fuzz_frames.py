"""Differential fuzz target for the C frame codec (issue 15); not collected by pytest (its name has no
``test_`` prefix). See README.md here.

The property: for any bytes, ``ColumnBuffer.add_live_batch`` gives the same rows and the same malformed
count with the C codec as with the msgspec path (the codec answers alike or declines), and never raises.
Runs under atheris (libFuzzer) when it is installed, else as a seeded random mutator for a time budget:

    python tests/fuzz/fuzz_frames.py -max_total_time=600 tests/fuzz/corpus     # atheris
    python tests/fuzz/fuzz_frames.py --seconds 600 --seed 1                    # no atheris
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # tests/, for the generator

import structlog  # noqa: E402
from test_codec_differential import generate, mutate, rows_of  # noqa: E402

from pistream.stream.columns import FRAME_CODEC  # noqa: E402

structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # frame_malformed lines: not printed


def check(data: bytes) -> None:
    frames = [data] if len(data) < 2 or data[0] % 4 else [data[: len(data) // 2], data[len(data) // 2:]]
    by_codec, by_msgspec = rows_of(frames, True), rows_of(frames, False)
    if by_codec != by_msgspec:
        raise AssertionError(f"the paths differ on {frames!r}: {by_codec} != {by_msgspec}")


def main() -> None:
    if not FRAME_CODEC:
        sys.exit("the C frame codec is not built: nothing to compare")
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        atheris = None
    if atheris is not None and "--seconds" not in sys.argv:
        atheris.Setup(sys.argv, check)
        atheris.Fuzz()
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    rng = random.Random(args.seed)
    deadline, cases = time.monotonic() + args.seconds, 0
    while time.monotonic() < deadline:
        data = generate(rng)
        for _ in range(rng.randrange(4)):
            data = mutate(rng, data)
        check(data)
        cases += 1
    print(f"seed {args.seed}: {cases} frames, no difference")


if __name__ == "__main__":
    main()
