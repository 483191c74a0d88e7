"""Wall-clock time of README command 1 (`robustlab run`, defaults) against its 10-minute CPU budget.

    python benchmarks/main_job.py [--out-dir /tmp/robustlab-main-job] [-- extra robustlab run args]

Prints the elapsed seconds, the machine, and whether the budget held. The CPU steal the machine saw
during the run is printed too (from /proc/stat), since a contended VM stretches every number.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time

BUDGET_S = 600


def _steal() -> tuple[int, int]:
    try:
        fields = open("/proc/stat").readline().split()[1:]
        vals = list(map(int, fields))
        return vals[7] if len(vals) > 7 else 0, sum(vals)
    except OSError:
        return 0, 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="/tmp/robustlab-main-job")
    p.add_argument("extra", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = ["robustlab", "run", "--out-dir", args.out_dir, *[a for a in args.extra if a != "--"]]
    s0, t0_all = _steal()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    elapsed = time.perf_counter() - t0
    s1, t1_all = _steal()
    steal = 100.0 * (s1 - s0) / max(t1_all - t0_all, 1)
    print(f"\n{' '.join(cmd)}: {elapsed:.0f} s (budget {BUDGET_S} s: {'met' if elapsed <= BUDGET_S else 'MISSED'}); "
          f"exit {r.returncode}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"CPU steal during the run {steal:.0f}%")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
