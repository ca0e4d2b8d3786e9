"""What a process pays before its first training step, broken down.

Every CLI call, every Tune trial and every Ray Train worker is a fresh Python process, so
each pays these costs. Each figure is the median of ``--repeats`` fresh interpreters,
the variants interleaved so that a shared machine slows them alike:

* ``import torch``; ``import smile_ray.recipe`` (torch plus the core, no torchvision);
* ``torch.optim.SGD(...)``: constructing any torch optimiser imports ``torch._dynamo``
  (torch 2.x's optimiser wrappers), paid once per process;
* the digits task from scikit-learn (``import sklearn.datasets`` + ``load_digits``, what
  every run paid before the cache) against the same arrays from the cache file;
* a whole ``smile-ray train --set steps=1`` on digits with the source model cached,
  with the digits cache deleted before the run (the old start-up) and with it in place.

    python benchmarks/startup.py [--repeats 5]
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
    "SGD construction (torch._dynamo)": (
        "import torch\nm = torch.nn.Linear(2, 2)\nt = time.perf_counter()\ntorch.optim.SGD(m.parameters(), lr=0.1)"
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


def timed_train(cache: Path, out: Path, env: dict) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "smile_ray", "train", "--quiet", "--set", "steps=1", "--set", "eval_every=1",
                    "--cache-dir", str(cache), "--output", str(out), "--overwrite"],
                   capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    tmp = Path(tempfile.mkdtemp(prefix="smile-ray-startup-"))
    cache = tmp / "cache"
    from smile_ray.config import make_config
    from smile_ray.data.digits import digits_cache_path
    from smile_ray.pretrain import load_source

    load_source(make_config(), cache, log=lambda m: None)  # the source model, outside every timing
    npz = digits_cache_path(cache)
    timed_train(cache, tmp / "warm-up", env)  # page cache, the .pyc files
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, code in SNIPPETS.items():
            times.setdefault(name, []).append(timed_snippet(code, cache, env))
        npz.unlink(missing_ok=True)
        times.setdefault("train, digits from scikit-learn", []).append(timed_train(cache, tmp / "cold", env))
        times.setdefault("train, digits from the cache", []).append(timed_train(cache, tmp / "warm", env))
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nstart-up costs, median of {args.repeats} fresh processes (min-max), 1 thread")
    print(f"{'what':<36} {'seconds':>8} {'range':>14}")
    for name, ts in times.items():
        print(f"{name:<36} {statistics.median(ts):>8.3f} {min(ts):>6.3f}-{max(ts):<6.3f}")
    cold = statistics.median(times["train, digits from scikit-learn"])
    warm = statistics.median(times["train, digits from the cache"])
    print(f"whole train call (1 step, eval, metrics, plot): cache saves {cold - warm:.2f} s ({1 - warm / cold:.0%})")


if __name__ == "__main__":
    main()
