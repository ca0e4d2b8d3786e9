"""What a process pays before its first training step, broken down, and against an
older commit.

Every CLI call, every Tune trial and every Ray Train worker is a fresh Python process, so
each pays these costs. Each figure is the median of ``--repeats`` fresh interpreters,
the variants interleaved so that a shared machine slows them alike:

* ``import torch``; ``import smile_ray.recipe`` (torch plus the core, no torchvision);
* ``torch.optim.SGD`` constructed and stepped: any torch optimiser imports
  ``torch._dynamo`` (torch 2.x's optimiser wrappers), against ``smile_ray.optim.SGD``
  (the same updates, what the core uses off CUDA);
* the digits task from scikit-learn (``import sklearn.datasets`` + ``load_digits``, what
  every run paid before the cache) against the same arrays from the cache file;
* ``smile-ray train --set steps=1`` on digits with the source model cached: the time
  from launching the process to its first ``backward()`` (the start-up: interpreter,
  imports, data, model, method, optimiser, the first batch and forward), and the whole
  call (plus one step, the final evaluation, the plot, the files). With ``--before REV``
  the same command also runs on a checkout of commit REV (a temporary git worktree),
  interleaved with this tree's runs.

    python benchmarks/startup.py [--repeats 5] [--before 9212290]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Each snippet runs in a fresh interpreter; the time from its ``t = time.perf_counter()``
# (the wrapper sets one first) to its end is the figure.
SNIPPETS = {
    "import torch": "import torch",
    "import smile_ray.recipe": "import smile_ray.recipe",
    "torch.optim.SGD, built and stepped": (
        "import torch\nm = torch.nn.Linear(2, 2)\nm(torch.ones(1, 2)).sum().backward()\nt = time.perf_counter()\n"
        "o = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)\no.step()"
    ),
    "smile_ray.optim.SGD, built and stepped": (
        "import torch\nfrom smile_ray.optim import SGD\nm = torch.nn.Linear(2, 2)\nm(torch.ones(1, 2)).sum().backward()\n"
        "t = time.perf_counter()\no = SGD(m.parameters(), lr=0.1, momentum=0.9)\no.step()"
    ),
    "digits from scikit-learn": (
        "import numpy\nt = time.perf_counter()\nfrom sklearn.datasets import load_digits\nload_digits()"
    ),
    "digits from the cache file": (
        "import numpy\nfrom smile_ray.data.digits import digits_arrays\nt = time.perf_counter()\ndigits_arrays(CACHE)"
    ),
}


def timed_snippet(code: str, cache: Path, env: dict) -> float:
    """Seconds from the snippet's last ``t = time.perf_counter()`` to its end, in a fresh
    interpreter (the interpreter's own start excluded)."""
    prog = f"import time\nCACHE = {str(cache)!r}\nt = time.perf_counter()\n{code}\nprint(time.perf_counter() - t)\n"
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return float(out.stdout.split()[-1])


# Runs the CLI in this interpreter after hooking Tensor.backward, and prints the wall
# clock of the first backward() on stderr; torch is imported here first, which the CLI
# does anyway.
FIRST_BACKWARD = """
import runpy, sys, time
import torch
_backward = torch.Tensor.backward
def backward(self, *a, **k):
    if not backward.seen:
        backward.seen = True
        sys.stderr.write(f"FIRST_BACKWARD {time.time()}\\n")
        sys.stderr.flush()
    return _backward(self, *a, **k)
backward.seen = False
torch.Tensor.backward = backward
sys.argv = ["smile-ray"] + sys.argv[1:]
runpy.run_module("smile_ray", run_name="__main__")
"""


def timed_train(tree: Path, cache: Path, out: Path, env: dict) -> tuple[float, float]:
    """(seconds from launch to the first backward, seconds of the whole call) of
    ``smile-ray train --set steps=1`` run from the checkout ``tree``."""
    args = ["train", "--quiet", "--set", "steps=1", "--set", "eval_every=1", "--cache-dir", str(cache),
            "--output", str(out), "--overwrite"]
    t, wall = time.perf_counter(), time.time()
    done = subprocess.run([sys.executable, "-c", FIRST_BACKWARD, *args], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(tree)}, cwd=tree, check=True)
    whole = time.perf_counter() - t
    first = [line for line in done.stderr.splitlines() if line.startswith("FIRST_BACKWARD ")]
    return float(first[0].split()[1]) - wall, whole


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--before", metavar="REV", help="also time the train call on a checkout of this commit")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="smile-ray-startup-"))
    cache = tmp / "cache"
    trees = {"now": ROOT}
    if args.before:
        subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "before"), args.before], cwd=ROOT,
                       check=True, capture_output=True)
        trees[f"before ({args.before})"] = tmp / "before"
    try:
        from smile_ray.config import make_config
        from smile_ray.pretrain import load_source

        load_source(make_config(), cache, log=lambda m: None)  # the source model, outside every timing
        for name, tree in trees.items():  # page cache, .pyc files, and whatever each tree caches
            timed_train(tree, cache, tmp / "warm-up", env)
        times: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for name, code in SNIPPETS.items():
                times.setdefault(name, []).append(timed_snippet(code, cache, env))
            for name, tree in trees.items():
                first, whole = timed_train(tree, cache, tmp / "run", env)
                times.setdefault(f"train {name}: launch to first step", []).append(first)
                times.setdefault(f"train {name}: whole call", []).append(whole)
    finally:
        if args.before:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "before")], cwd=ROOT, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nstart-up costs, median of {args.repeats} fresh processes (min-max), 1 thread")
    print(f"{'what':<48} {'seconds':>8} {'range':>14}")
    for name, ts in times.items():
        print(f"{name:<48} {statistics.median(ts):>8.3f} {min(ts):>6.3f}-{max(ts):<6.3f}")
    if args.before:
        for part in ("launch to first step", "whole call"):
            now = statistics.median(times[f"train now: {part}"])
            old = statistics.median(times[f"train before ({args.before}): {part}"])
            print(f"{part}: {old:.2f} s before, {now:.2f} s now ({now / old:.2f}x)")


if __name__ == "__main__":
    main()
