"""Is torch's fused CPU SGD as fast as :class:`smile_ray.optim.SGD`, and what does its
first use cost a fresh process?

``smile_ray.optim.SGD`` exists because constructing or stepping any ``torch.optim``
optimiser imports ``torch._dynamo``. This script prints, as median / min / max over
``--repeats``:

* the time of one ``step()`` of each optimiser (SGD, momentum 0.9, Nesterov, weight
  decay; a gradient on every parameter, set once) over two parameter sets: the
  ``digits_cnn`` model's (the default run) and a torchvision ResNet-18's; each repeat
  times ``--steps`` steps of one optimiser after a warm-up, the two alternating, so a
  change in the machine's load hits both;
* in fresh processes (``--fresh`` of them per variant): the seconds from after
  ``import torch`` to the end of the first fused step (construction + first step,
  which pay the ``torch._dynamo`` import), the same with ``import torchvision`` done
  first (what every ResNet run does), the seconds ``import torchvision`` itself takes,
  whether it leaves ``torch._dynamo`` imported, and the first step of
  ``smile_ray.optim.SGD``.

Needs only torch and torchvision.

    python benchmarks/optimizer.py                 # 2 threads default, 7 repeats
    python benchmarks/optimizer.py --threads 1 --repeats 11
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KW = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}


def spread(values: list[float], scale: float = 1.0, unit: str = "ms") -> str:
    v = [x * scale for x in values]
    return f"median {statistics.median(v):8.3f} {unit}  min {min(v):8.3f}  max {max(v):8.3f}  (n={len(v)})"


def parameter_sets():
    import torch
    import torchvision

    from smile_ray.models import build_source_model

    torch.manual_seed(0)
    sets = {"digits_cnn": build_source_model("digits_cnn", 10), "resnet18": torchvision.models.resnet18()}
    for model in sets.values():
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    return sets


def time_steps(repeats: int, steps: int) -> None:
    import torch

    from smile_ray.optim import SGD

    for name, model in parameter_sets().items():
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        makers = {"smile_ray.optim.SGD": lambda: SGD(params, **KW),
                  "torch.optim.SGD(fused=True)": lambda: torch.optim.SGD(params, **KW, fused=True)}
        optimisers = {k: make() for k, make in makers.items()}
        for opt in optimisers.values():  # warm-up: buffers allocated, kernels chosen
            for _ in range(3):
                opt.step()
        times: dict[str, list[float]] = {k: [] for k in optimisers}
        for _ in range(repeats):
            for k, opt in optimisers.items():
                t0 = time.perf_counter()
                for _ in range(steps):
                    opt.step()
                times[k].append((time.perf_counter() - t0) / steps)
        print(f"{name}: {len(params)} tensors, {n / 1e6:.2f} M parameters; one step ({steps} steps per repeat)")
        for k, v in times.items():
            print(f"  {k:28s} {spread(v, 1e3)}")


FRESH = r"""
import json, sys, time
import torch
vision = sys.argv[1] == "1"
fused = sys.argv[2] == "1"
t0 = time.perf_counter()
if vision:
    import torchvision
t1 = time.perf_counter()
dynamo_after_vision = "torch._dynamo" in sys.modules
p = torch.nn.Parameter(torch.randn(64, 64))
p.grad = torch.randn_like(p)
if fused:
    opt = torch.optim.SGD([p], lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4, fused=True)
else:
    from smile_ray.optim import SGD
    opt = SGD([p], lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
opt.step()
t2 = time.perf_counter()
print(json.dumps({"vision_s": t1 - t0, "first_step_s": t2 - t1, "dynamo_after_vision": dynamo_after_vision,
                  "dynamo_at_end": "torch._dynamo" in sys.modules}))
"""


def fresh(runs: int, threads: int) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    results: dict[tuple[bool, bool], list[dict]] = {}
    variants = [(False, True), (True, True), (False, False), (True, False)]
    for _ in range(runs):
        for vision, fused in variants:  # interleaved, as above
            out = subprocess.run([sys.executable, "-c", FRESH, str(int(vision)), str(int(fused))],
                                 capture_output=True, text=True, cwd=ROOT, env=env, check=True)
            results.setdefault((vision, fused), []).append(json.loads(out.stdout.splitlines()[-1]))
    print(f"fresh processes ({runs} per variant): construction + first step, after import torch")
    for (vision, fused), rs in results.items():
        label = f"{'torch fused SGD' if fused else 'smile_ray.optim.SGD'}, {'after' if vision else 'without'} import torchvision"
        print(f"  {label:50s} {spread([r['first_step_s'] for r in rs], 1.0, 's')}  "
              f"torch._dynamo imported at the end: {sorted({r['dynamo_at_end'] for r in rs})}")
    vis = [r for (vision, _), rs in results.items() if vision for r in rs]
    print(f"  {'import torchvision itself':50s} {spread([r['vision_s'] for r in vis], 1.0, 's')}  "
          f"leaves torch._dynamo imported: {sorted({r['dynamo_after_vision'] for r in vis})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per optimiser and parameter set")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--fresh", type=int, default=5, help="fresh processes per variant")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    time_steps(args.repeats, args.steps)
    fresh(args.fresh, args.threads)


if __name__ == "__main__":
    main()
