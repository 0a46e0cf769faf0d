#!/usr/bin/env python3
"""Measure every test's duration and write tests/durations.json (the cost budget's input).

Run on 2 idle cores from the repository root, after `make install`:

    .venv/bin/python scripts/test-durations.py            # the whole suite, ~10 min
    .venv/bin/python scripts/test-durations.py --from LOG  # from a `pytest --durations=0 -vv` log

tests/conftest.py marks a test ``slow`` when its recorded time is over FAST_LIMIT_S (unless it is
its file's fastest), so `make test-fast` (-m 'not slow') keeps the edit loop under 3 minutes.
A test's time is its setup + call + teardown; a session fixture's setup is charged to the first
test that uses it.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^\s*([0-9.]+)s (setup|call|teardown)\s+(\S+)")


def parse(text: str) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m:
            seconds[m.group(3)] = round(seconds.get(m.group(3), 0.0) + float(m.group(1)), 3)
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="log", type=Path, help="a pytest log with --durations=0 -vv")
    args = ap.parse_args()
    if args.log is not None:
        text, wall = args.log.read_text(), None
    else:
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
                              "--durations-min=0", "-vv"], cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        text = run.stdout + run.stderr
        if run.returncode not in (0, 1):
            print(text[-3000:], file=sys.stderr)
            return run.returncode
    seconds = parse(text)
    if not seconds:
        print("no durations found (was --durations=0 given?)", file=sys.stderr)
        return 1
    out = ROOT / "tests" / "durations.json"
    out.write_text(json.dumps({"measured": time.strftime("%Y-%m-%d"), "wall_s": wall, "total_s": round(sum(seconds.values()), 1),
                               "seconds": dict(sorted(seconds.items()))}, indent=1) + "\n")
    print(f"{len(seconds)} tests, {sum(seconds.values()):.0f} s in tests" + (f", {wall:.0f} s wall" if wall else "")
          + f" → {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
