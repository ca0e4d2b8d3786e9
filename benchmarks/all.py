"""Every CPU figure of the performance issue, measured in one run, one script after another.

Runs, each in its own process and in this order: the per-step time of l2, mixup and
SMILE and SMILE minus each component (``step_time.py``), the batch building at 32, 64
and 224 px (``batch_building.py``), the start-up broken down and against ``--before``
(``startup.py``), a Tune study's overhead per trial against sequential runs
(``tune_overhead.py``), Ray Train's fixed cost (``ray_overhead.py``) and the end-of-run
interpolation losses on an image-file dataset (``interpolation_cost.py``). Everything goes
to the terminal; each script's stdout (its figures) also goes, after a header (date,
commit, CPUs, torch and Ray versions), to ``--output``. Read the ratios, not the
milliseconds, when the machine is shared. About 15-20 minutes on 2 cores.

    python benchmarks/all.py [--output benchmarks-cpu.txt] [--before 9212290] [--quick]

``--quick`` runs each script with fewer repeats (for a check that they all work, not for
figures).
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

STEP_VARIANTS = ",".join(["l2", "mixup", "smile", "smile -feature_mixup", "smile -source_label", "smile -mean_teacher",
                          "smile -label_mixup", "smile -head_l2"])


def scripts(before: str | None, quick: bool) -> list[list[str]]:
    q = quick
    return [
        ["step_time.py", "--variants", STEP_VARIANTS, "--rounds", "2" if q else "5", "--steps", "5" if q else "30",
         "--warmup", "2" if q else "10"],
        ["batch_building.py", "--repeats", "3" if q else "30"],
        ["startup.py", "--repeats", "1" if q else "5", *(["--before", before] if before else [])],
        ["tune_overhead.py", "--trials", "2" if q else "8", "--steps", "30" if q else "300"],
        ["ray_overhead.py", "--steps", "30" if q else "300"],
        ["interpolation_cost.py", "--images", "300" if q else "6000", "--repeats", "1" if q else "2"],
    ]


def header() -> str:
    import ray
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout
    return (f"smile-ray benchmarks, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
            f"commit {commit.strip() or '?'}{' (uncommitted changes)' if dirty.strip() else ''}; "
            f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); python {platform.python_version()}, "
            f"torch {torch.__version__}, ray {ray.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=Path("benchmarks-cpu.txt"), help="where the combined output goes")
    ap.add_argument("--before", metavar="REV", help="startup.py also times the train call on this commit")
    ap.add_argument("--quick", action="store_true", help="few repeats: checks that every script runs")
    args = ap.parse_args()
    out = args.output.resolve()
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w") as f:
        def emit(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()
            f.write(text)
            f.flush()

        emit(header())
        total = time.perf_counter()
        for argv in scripts(args.before, args.quick):
            emit(f"\n$ python benchmarks/{shlex.join(argv)}\n")
            t = time.perf_counter()
            # stdout (the figures) to both; stderr (progress bars, Ray's shutdown chatter) to
            # the terminal only
            proc = subprocess.Popen([sys.executable, str(HERE / argv[0]), *argv[1:]], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE)
            for line in proc.stdout:
                emit(line)
            if proc.wait() != 0:
                emit(f"{argv[0]} failed (exit {proc.returncode})\n")
                raise SystemExit(f"benchmarks/{argv[0]} failed; what ran so far is in {tmp}")
            emit(f"[{argv[0]}: {time.perf_counter() - t:.0f} s]\n")
        emit(f"\nall benchmarks: {time.perf_counter() - total:.0f} s\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
