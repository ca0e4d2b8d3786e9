"""What the end-of-run interpolation losses (the paper's Eq. 1, on 256 image pairs per
split) cost on an image-file dataset, and how much of it is reading images.

Builds an ``image_folder`` task from generated 500x375 JPEGs (the layout and decoding of
the real datasets; ``--images`` of them, a tenth also in the test split), a randomly
initialised backbone at a small image size (so that the forwards are cheap and the
reading shows), and times, median of ``--repeats``:

* ``interpolation_losses`` as every run calls it at its end;
* one pass of ``eval_batches`` over the train and the test split (reading every image
  once, no model): the cost of a measurement that reads whole splits.

It prints the four losses to full precision, so two commits can be checked to measure
the same numbers. Needs only torch, torchvision and pillow (no Ray, no MLflow).

    python benchmarks/interpolation_cost.py [--images 2000] [--image-size 64] [--backbone resnet18]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from input_pipeline import write_tree  # noqa: E402
from smile_ray.config import make_config  # noqa: E402
from smile_ray.metrics import interpolation_losses  # noqa: E402
from smile_ray.recipe import setup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--data-workers", type=int, default=-1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="smile-ray-il-cost-"))
    write_tree(root, args.images, args.classes, 500, 375)
    cfg = make_config({"method": "l2", "dataset": "image_folder", "data_root": str(root), "backbone": args.backbone,
                       "image_size": args.image_size, "weights": "none", "device": "cpu",
                       "data_workers": args.data_workers, "sample_rate": 1.0})
    run = setup(cfg, None, log=lambda m: None)
    sizes = run.task.split_sizes()
    il_times, read_times, result = [], [], {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        result = interpolation_losses(run.model, run.task, cfg.seed, run.to_device, pairs=cfg.il_pairs)
        il_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        for split in ("train", "test"):
            for _batch in run.task.eval_batches(split):
                pass
        read_times.append(time.perf_counter() - t)
    print(f"\n{args.backbone} {args.image_size}px, image_folder of 500x375 JPEGs: train {sizes['train']}, "
          f"test {sizes['test']} images; {run.task.workers} DataLoader workers, {torch.get_num_threads()} threads; "
          f"median of {args.repeats}")
    print(f"interpolation_losses (256 pairs per split):  {statistics.median(il_times):7.2f} s")
    print(f"reading the train and test splits once:      {statistics.median(read_times):7.2f} s")
    print("losses: " + "  ".join(f"{k} {result[k]!r}" for k in
                                 ("label_il_train", "feature_il_train", "label_il_test", "feature_il_test")))


if __name__ == "__main__":
    main()
