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

A second table splits the wall time along the runs' clocks (``started_at`` and
``finished_at`` of each metrics.json): how long after the call the first run starts (the
study's set-up, Tune's, the first processes and their imports: paid once per study), how
long a slot freed by a finished run waits for the next one (paid per trial), and how
long the call lasts after the last run ends. The per-trial overhead of a study of N
trials is about ``in trial + gap + slots x (first + end) / N``.

With several study sizes (``--trials 4,8,16``) the overhead is also split by a least-
squares line through the studies' slot-seconds outside the loops, ``O(N) = a + b N``: the
slope ``b`` is what one more trial costs (its process's reuse, its reports and files, the
slot's wait for it, its run's own set-up and end), the intercept ``a`` what a study costs
once however many trials it has (the study's and Tune's set-up, the first processes and
their imports, the outputs at the end). The sequential runs' own overhead per run (set-up,
final evaluation, interpolation losses, files: work a run does wherever it runs) is
printed beside the slope, so that ``b`` minus it is what Tune adds per trial. The MLflow
store is made before any timing, so that no study pays for its schema.

    python benchmarks/tune_overhead.py [--trials 8] [--steps 300] [--concurrent 2] [--no-fresh]
    python benchmarks/tune_overhead.py --trials 4,8,16 --no-fresh
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smile_ray.config import make_config  # noqa: E402
from smile_ray.orchestration import runner, tracking  # noqa: E402
from smile_ray.orchestration.cluster import connect  # noqa: E402
from smile_ray.orchestration.tune import run_study  # noqa: E402
from smile_ray.pretrain import load_source  # noqa: E402
from smile_ray.recipe import train  # noqa: E402


class Row(NamedTuple):
    name: str
    trials: int
    reuse: bool | None  # None: the sequential runs
    wall: float
    loops: float  # the trials' loop seconds, summed
    slots: int
    in_trials: float  # Tune's time_total_s of the trials, summed (the sequential wall)

    @property
    def outside(self) -> float:
        """Slot-seconds outside the training loops."""
        return self.wall * self.slots - self.loops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", default="8", help="trials per study; a comma list (4,8,16) runs one study per size")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--concurrent", type=int, default=2)
    ap.add_argument("--no-fresh", action="store_true", help="skip the studies with fresh actors (the first version)")
    args = ap.parse_args()
    sizes = sorted({int(n) for n in args.trials.split(",")})
    tmp = Path(tempfile.mkdtemp(prefix="smile-ray-tune-overhead-"))
    base = {"method": "smile", "dataset": "digits", "steps": args.steps, "eval_every": args.steps // 3,
            "threads": 1}
    load_source(make_config(base))  # the cached source model, outside every timing
    t = time.perf_counter()
    connect()
    ray_start = time.perf_counter() - t
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracking.connect(uri)  # the store's schema, outside every timing

    modes = ([] if args.no_fresh else [("tune, fresh actors", False)]) + [("tune, reused actors", True)]
    rows, clocks, configs = [], {}, []
    for n in sizes:
        space = {"base": base, "metric": "val_acc", "mode": "max", "num_samples": n, "search": "random",
                 "scheduler": "none", "max_concurrent": args.concurrent, "seed": 0,
                 "resources": {"cpus": 1, "gpus": 0, "workers": 1},
                 "space": {"mixup_alpha": {"loguniform": [0.05, 2.0]},
                           "feature_weight": {"loguniform": [0.001, 1.0]}}}
        space_file = tmp / f"space-{n}.yaml"
        space_file.write_text(yaml.safe_dump(space))
        for name, reuse in modes:
            runner.REUSE_ACTORS = reuse
            label = name if len(sizes) == 1 else f"{name}, N={n}"
            out = tmp / f"{name.replace(' ', '').replace(',', '-')}-{n}"
            t0, t = time.time(), time.perf_counter()
            run_study(space_file, out, tracking_uri=uri, experiment="overhead", verbose=0)
            wall = time.perf_counter() - t
            runs = [json.loads(f.read_text()) for f in out.glob("tune/*/run/metrics.json")]
            if n == sizes[-1]:
                configs = [m["config"] for m in runs]  # the sequential runs train the largest study's
            in_trials = sum(json.loads(f.read_text().strip().splitlines()[-1])["time_total_s"]
                            for f in out.glob("tune/*/result.json"))
            rows.append(Row(label, n, reuse, wall, sum(m["seconds"] for m in runs), args.concurrent, in_trials))
            clocks[label] = timeline(runs, t0, t0 + wall, args.concurrent)

    t0, t = time.time(), time.perf_counter()
    runs = [train(make_config(c), None, log=lambda m: None) for c in configs]
    seq_wall = time.perf_counter() - t
    seq = Row("sequential", len(configs), None, seq_wall, sum(m["seconds"] for m in runs), 1, seq_wall)
    rows.insert(0, seq)
    clocks["sequential"] = timeline(runs, t0, t0 + seq_wall, 1)

    print(f"\nSMILE trials on digits, {args.steps} steps, 1 thread each, {args.concurrent} at a time; "
          f"ray.init {ray_start:.1f} s")
    print(f"{'run':<28} {'wall s':>8} {'loops s':>8} {'vs sequential':>14} {'overhead s/trial':>17} "
          f"{'in trial':>9} {'around':>7}")
    for r in rows:
        n = r.trials
        print(f"{r.name:<28} {r.wall:>8.1f} {r.loops:>8.1f} {r.wall / (seq.wall / seq.trials * n):>14.2f} "
              f"{r.outside / n:>17.2f} {(r.in_trials - r.loops) / n:>9.2f} {(r.wall * r.slots - r.in_trials) / n:>7.2f}")
    print(f"\n{'run':<28} {'first run starts s':>19} {'slot waits s/trial':>19} {'after the last s':>17}")
    for r in rows:
        first, gap, end = clocks[r.name]
        print(f"{r.name:<28} {first:>19.2f} {gap:>19.2f} {end:>17.2f}")

    seq_overhead = seq.outside / seq.trials
    for name, reuse in modes:
        points = [(r.trials, r.outside) for r in rows[1:] if r.reuse == reuse]
        if len(points) < 2:
            continue
        b, a = statistics.linear_regression([n for n, _ in points], [o for _, o in points])
        worst = max(abs(o - a - b * n) for n, o in points)
        print(f"\n{name}: slot-seconds outside the loops = {a:.1f} s per study + {b:.2f} s per trial "
              f"(least squares over N = {', '.join(str(n) for n, _ in points)}; largest residual {worst:.1f} s)")
        print(f"  a run's own overhead in-process (set-up, final evaluation, interpolation losses, files): "
              f"{seq_overhead:.2f} s; Tune's own cost per trial beyond it: {b - seq_overhead:.2f} s")


def timeline(runs: list[dict], t0: float, t1: float, slots: int) -> tuple[float, float, float]:
    """(first run's start after ``t0``, mean wait of a freed slot for its next run, ``t1``
    after the last run's end) from the runs' ``started_at``/``finished_at``: each run
    after the first ``slots`` takes the slot freed longest ago, by a run that ended before
    it started."""
    spans = sorted((datetime.fromisoformat(m["started_at"]).timestamp(),
                    datetime.fromisoformat(m["finished_at"]).timestamp()) for m in runs)
    freed, taken, waits = sorted(e for _, e in spans), set(), []
    for start, _ in spans[slots:]:
        slot = next((i for i, e in enumerate(freed) if e <= start and i not in taken), None)
        if slot is not None:
            taken.add(slot)
            waits.append(start - freed[slot])
    return max(spans[0][0] - t0, 0.0), sum(waits) / max(len(waits), 1), t1 - freed[-1]


if __name__ == "__main__":
    main()
