"""The CPUs this process may use: one home for the count that torch's CPU threads
(``threads: 0``, set by :func:`smile_ray.recipe.setup`), DataLoader workers
(``data_workers: -1``) and torch.compile's worker processes follow.

A process on a Ray node sees the whole node in its CPU affinity; what Ray reserved for
it shows only in ``OMP_NUM_THREADS``, which Ray sets in every task, actor and Train
worker to its ``num_cpus`` (floored, at least 1). So the count is the affinity capped by
``OMP_NUM_THREADS`` when that is a positive integer, and by the ``threads`` key when set.
"""
from __future__ import annotations

import os


def cpu_share(affinity: int, omp_num_threads: str | None, threads: int = 0) -> int:
    """The pure rule: ``affinity`` cores, capped by ``OMP_NUM_THREADS`` (when it is a
    positive integer: "4,2" names nested levels, not a reservation) and ``threads``."""
    cpus = max(1, affinity)
    try:
        omp = int(omp_num_threads) if omp_num_threads is not None else 0
    except ValueError:
        omp = 0
    for cap in (omp, threads):
        if cap >= 1:
            cpus = min(cpus, cap)
    return cpus


def process_cpus(threads: int = 0) -> int:
    """:func:`cpu_share` for this process."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count() or 1
    return cpu_share(affinity, os.environ.get("OMP_NUM_THREADS"), threads)
