"""The size of DELTA's penalty at step 0, and the first steps at several weights.

DELTA compares a train-mode student (BatchNorm on the batch's statistics) with an
eval-mode frozen copy (ImageNet's running statistics), as TLlib does, summed over the
batch; on a target far from ImageNet the penalty is large before a single step. This
prints, for the Fashion-MNIST preset at 5 images per class (or any --set), the penalty
per layer on the step-0 batch, then for each --weights value the loss parts and the
gradient norm over the first --steps steps (stopping at a non-finite loss).

    python benchmarks/delta_scale.py                                  # weights 0.01 and 1e-5
    python benchmarks/delta_scale.py --weights 1e-3,1e-4,1e-5 --steps 30
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smile_ray.config import load_config_values, make_config, parse_overrides  # noqa: E402
from smile_ray.losses import delta_penalty  # noqa: E402
from smile_ray.methods.delta import recording  # noqa: E402
from smile_ray.recipe import learning_rate, setup  # noqa: E402

PRESET = Path(__file__).resolve().parents[1] / "smile_ray" / "shipped" / "presets" / "fashion_mnist.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="0.01,1e-5", help="delta_weight values to run")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    torch.set_num_threads(1)
    values = {**load_config_values(PRESET), "method": "delta", "samples_per_class": 5, "seed": 0}
    values.update(parse_overrides(args.overrides))

    for n, w in enumerate(float(v) for v in args.weights.split(",")):
        run = setup(make_config({**values, "delta_weight": w}), log=lambda m: None)
        method, c = run.method, run.config
        if n == 0:  # the penalty before any step (the same for every weight)
            x, y = run.to_device(*run.task.train_batch(0, c.batch_size))
            before = copy.deepcopy(run.model.state_dict())
            with torch.no_grad():
                with recording(method._student_layers) as fm:
                    run.model(x)  # train mode, as in training
                with recording(method._teacher_layers) as ref:
                    method.teacher(x)
            run.model.load_state_dict(before)  # undo the forward's BatchNorm statistics update
            parts = [float(delta_penalty([a], [b], None if method.weights is None else [wt]))
                     for a, b, wt in zip(fm, ref, method.weights or [None] * len(fm))]
            print(f"step-0 penalty on {c.dataset}, {c.backbone}, batch {c.batch_size}, {c.delta_variant} variant: "
                  f"{sum(parts):.3g} in all")
            for layer, v in zip(method.layers, parts):
                print(f"  {layer:<28} {v:10.3g}  ({v / max(sum(parts), 1e-30):.0%})")
        print(f"\ndelta_weight {w:g} (lr {c.lr:g}):")
        print(f"{'step':>5} {'cls':>8} {'delta':>10} {'grad norm':>10}")
        for step in range(args.steps):
            x, y = run.to_device(*run.task.train_batch(step, c.batch_size))
            for group in run.optimizer.param_groups:
                group["lr"] = learning_rate(c, step)
            loss, parts = method.loss(run.model, x, y, step)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_(run.model.parameters(), float("inf")))
            run.optimizer.step()
            if step % 5 == 0 or not torch.isfinite(loss):
                print(f"{step:>5} {parts['cls'].item():>8.3f} {parts['delta'].item():>10.3g} {norm:>10.3g}")
            if not torch.isfinite(loss):
                print("  (diverged)")
                break


if __name__ == "__main__":
    main()
