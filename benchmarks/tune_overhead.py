"""What a Tune study costs beyond its trials' own work, with and without reused actors.

The same N digits trials (a random search over SMILE's knobs, no early stopping) run
three ways on one machine, one after another:

* ``sequential``: the N configs trained in this process, one after another (the floor:
  no Ray, no fresh processes, imports paid once);
* ``tune, fresh actors``: ``run_study`` with ``reuse_actors`` off (the first version:
  every trial a fresh process that imports torch and the core again);
* ``tune, reused actors``: ``run_study`` as the product runs it.

For each it prints the wall time, the trials' own loop time (``seconds`` in each
trial's metrics.json: steps and evaluations), and the overhead per trial in
slot-seconds: ``(wall x concurrent trials - sum of loop times) / N``, i.e. how long each
trial held a CPU slot without training. Ray's start is paid once, before all three.
The overhead is split into the part inside each trial (Tune's ``time_total_s`` of the
trial's last report minus its loop time: the run's set-up, its final evaluation and
files, the reports) and the part around the trials (slot-seconds in no trial: trial
processes starting, the study's own set-up and end, slots idle at the tail), both per
trial. The sequential run's whole overhead counts as inside its runs.

    python benchmarks/tune_overhead.py [--trials 8] [--steps 300] [--concurrent 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smile_ray.config import make_config  # noqa: E402
from smile_ray.orchestration import runner  # noqa: E402
from smile_ray.orchestration.cluster import connect  # noqa: E402
from smile_ray.orchestration.tune import run_study  # noqa: E402
from smile_ray.pretrain import load_source  # noqa: E402
from smile_ray.recipe import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--concurrent", type=int, default=2)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="smile-ray-tune-overhead-"))
    base = {"method": "smile", "dataset": "digits", "steps": args.steps, "eval_every": args.steps // 3,
            "threads": 1}
    space = {"base": base, "metric": "val_acc", "mode": "max", "num_samples": args.trials, "search": "random",
             "scheduler": "none", "max_concurrent": args.concurrent, "seed": 0,
             "resources": {"cpus": 1, "gpus": 0, "workers": 1},
             "space": {"mixup_alpha": {"loguniform": [0.05, 2.0]}, "feature_weight": {"loguniform": [0.001, 1.0]}}}
    space_file = tmp / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    load_source(make_config(base))  # the cached source model, outside every timing
    t = time.perf_counter()
    connect()
    ray_start = time.perf_counter() - t
    uri = f"sqlite:///{tmp / 'mlflow.db'}"

    rows = []
    for name, reuse in (("tune, fresh actors", False), ("tune, reused actors", True)):
        runner.REUSE_ACTORS = reuse
        out = tmp / name.replace(" ", "").replace(",", "-")
        t = time.perf_counter()
        run_study(space_file, out, tracking_uri=uri, experiment="overhead", verbose=0)
        wall = time.perf_counter() - t
        loops = [json.loads(f.read_text())["seconds"] for f in out.glob("tune/*/run/metrics.json")]
        configs = [json.loads(f.read_text())["config"] for f in out.glob("tune/*/run/metrics.json")]
        in_trials = sum(json.loads(f.read_text().strip().splitlines()[-1])["time_total_s"]
                        for f in out.glob("tune/*/result.json"))
        rows.append((name, wall, sum(loops), args.concurrent, in_trials))

    t = time.perf_counter()
    loops = [train(make_config(c), None, log=lambda m: None)["seconds"] for c in configs]
    seq_wall = time.perf_counter() - t
    rows.insert(0, ("sequential", seq_wall, sum(loops), 1, seq_wall))

    print(f"\n{args.trials} SMILE trials on digits, {args.steps} steps, 1 thread each; ray.init {ray_start:.1f} s")
    print(f"{'run':<22} {'wall s':>8} {'loops s':>8} {'vs sequential':>14} {'overhead s/trial':>17} "
          f"{'in trial':>9} {'around':>7}")
    seq = rows[0][1]
    for name, wall, loops, slots, in_trials in rows:
        n = args.trials
        print(f"{name:<22} {wall:>8.1f} {loops:>8.1f} {wall / seq:>14.2f} {(wall * slots - loops) / n:>17.2f} "
              f"{(in_trials - loops) / n:>9.2f} {(wall * slots - in_trials) / n:>7.2f}")


if __name__ == "__main__":
    main()
