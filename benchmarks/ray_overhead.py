"""Overhead of Ray Train against the in-process core, for the same config.

For the in-process run and for 1 and 2 Ray Train workers it prints the training-loop
time measured inside the loop (``seconds`` in metrics.json: steps + evaluations), its
ratio to the in-process loop (the per-step overhead), and the fixed start-up cost (wall
time minus loop time: Ray start, worker group launch, process group set-up, result
copy).

    python benchmarks/ray_overhead.py [--steps 300] [--workers 1,2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smile_ray.config import make_config  # noqa: E402
from smile_ray.orchestration.cluster import connect  # noqa: E402
from smile_ray.orchestration.ray_train import train_distributed  # noqa: E402
from smile_ray.pretrain import load_source  # noqa: E402
from smile_ray.recipe import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    cfg = make_config({"steps": args.steps, "device": "cpu"})
    load_source(cfg)  # cached source model, outside every timing
    tmp = Path(tempfile.mkdtemp(prefix="smile-ray-overhead-"))

    t = time.perf_counter()
    local = train(cfg, tmp / "local", log=lambda m: None)
    local_wall = time.perf_counter() - t
    rows = [("in-process", local_wall, local["seconds"])]

    t = time.perf_counter()
    connect()
    ray_start = time.perf_counter() - t
    for n in [int(w) for w in args.workers.split(",")]:
        t = time.perf_counter()
        m = train_distributed(cfg, tmp / f"ray{n}", workers=n)
        rows.append((f"ray train x{n}", time.perf_counter() - t, m["seconds"]))

    print(f"\nsmile on digits, {args.steps} steps, batch {cfg.batch_size} (global); ray.init: {ray_start:.1f} s")
    print(f"{'run':<14} {'wall s':>8} {'loop s':>8} {'ms/step':>8} {'loop vs local':>14} {'start-up s':>11}")
    for name, wall, loop in rows:
        startup = wall - loop + (ray_start if name.startswith("ray train x1") else 0.0)
        print(f"{name:<14} {wall:>8.1f} {loop:>8.1f} {1000 * loop / args.steps:>8.1f} {loop / local['seconds']:>14.3f} "
              f"{startup if name != 'in-process' else wall - loop:>11.1f}")
    print("(start-up of the first Ray run includes ray.init; later runs reuse the running Ray)")


if __name__ == "__main__":
    main()
