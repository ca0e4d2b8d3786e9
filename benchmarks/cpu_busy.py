"""How busy the machine's cores are while a command runs: is it waiting, or computing?

``/usr/bin/time`` and ``resource.getrusage`` count only the processes their command waits
for. Ray's processes (GCS, raylet, its workers, Tune's trial actors, Ray Train's workers)
are started detached, so a test suite or a study measured that way looks mostly idle
when it is not. This script reads the kernel's counters for the whole machine
(``/proc/stat``) once a second while the command runs and prints:

* the wall time and the command's exit status;
* the cores' mean use over the run: busy (user, nice, system, irq, softirq, steal),
  waiting on the disk (iowait) and idle, each as a share of all cores' time;
* how the run's seconds split by use: the share of samples with the cores more than
  90 % busy, 50-90 %, and under 50 %.

It counts everything on the machine, so run it on an otherwise idle one (the first
figure printed is the load before the start, for that check).

    python benchmarks/cpu_busy.py -- python -m pytest -q
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time


def cpu_times() -> tuple[int, int, int]:
    """(busy, iowait, total) jiffies summed over all cores since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, iowait, busy + idle + iowait


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")

    print(f"load average before the start: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores", flush=True)
    samples: list[float] = []  # the cores' busy share in each interval
    done = threading.Event()

    def sample() -> None:
        last = cpu_times()
        while not done.wait(args.interval):
            now = cpu_times()
            total = now[2] - last[2]
            if total > 0:
                samples.append((now[0] - last[0]) / total)
            last = now

    first = cpu_times()
    start = time.perf_counter()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    status = subprocess.call(command)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    end = cpu_times()

    total = max(end[2] - first[2], 1)
    busy, iowait = (end[0] - first[0]) / total, (end[1] - first[1]) / total
    print(f"\ncommand: {' '.join(command)}")
    print(f"exit status {status}, wall {wall:.1f} s ({wall / 60:.1f} min)")
    print(f"cores' mean use: busy {busy:.0%}, waiting on the disk {iowait:.0%}, idle {1 - busy - iowait:.0%} "
          f"(busy {busy * (os.cpu_count() or 1):.2f} of {os.cpu_count()} cores)")
    if samples:
        n = len(samples)
        high = sum(b > 0.9 for b in samples) / n
        low = sum(b < 0.5 for b in samples) / n
        print(f"seconds with the cores >90 % busy: {high:.0%}, 50-90 %: {1 - high - low:.0%}, <50 %: {low:.0%} "
              f"({n} samples of {args.interval:g} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
