"""Throughput of the file-image pipeline (``smile_ray.data.images``): images per second
that ``ImageTask.train_batch`` hands over (decode, resize, random crop, flip, normalise),
with no model, for several DataLoader worker counts.

A temporary ``image_folder`` tree of generated JPEGs (500 x 375 by default, the size of
a typical CUB image, quality 90, textured so the encoder cannot shrink them to nothing)
is written once; each worker count then times ``--steps`` consecutive batches after
``--warmup`` batches (which start the workers and fill the prefetch queue). Prints one
line per worker count, and a JSON summary with ``--json``.

    python benchmarks/input_pipeline.py                          # 224 px, batch 48, workers 0,1,2
    python benchmarks/input_pipeline.py --workers 0,2,4,8 --images 600 --steps 30
    python benchmarks/input_pipeline.py --image-size 64          # JPEG draft decoding kicks in
    python benchmarks/input_pipeline.py --decode device          # workers read bytes; torchvision decodes
                                                                 # in this process (on the CPU here)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smile_ray.config import make_config  # noqa: E402
from smile_ray.data import build_task  # noqa: E402


def write_tree(root: Path, images: int, classes: int, width: int, height: int) -> None:
    from PIL import Image

    g = np.random.default_rng(0)
    base = g.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    for i in range(images):
        c = i % classes
        texture = np.roll(base, (i * 7, i * 13), axis=(0, 1))
        im = Image.fromarray(texture).resize((width, height), Image.BICUBIC)
        for split in ("train",) if i % 10 else ("train", "test"):
            folder = root / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            im.save(folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=48)
    p.add_argument("--images", type=int, default=300, help="generated training images")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--width", type=int, default=500)
    p.add_argument("--height", type=int, default=375)
    p.add_argument("--steps", type=int, default=20, help="timed batches per worker count")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--decode", default="cpu", choices=["cpu", "device"],
                   help="the config key: PIL in the workers, or bytes from the workers decoded by torchvision here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        write_tree(root, args.images, args.classes, args.width, args.height)
        print(f"wrote {args.images} {args.width}x{args.height} JPEGs in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
        for workers in [int(w) for w in args.workers.split(",")]:
            cfg = make_config({"dataset": "image_folder", "data_root": str(root), "backbone": "resnet50",
                               "weights": "none", "image_size": args.image_size, "sample_rate": 1.0,
                               "data_workers": workers, "device": "cpu", "decode": args.decode})
            started = time.perf_counter()
            task = build_task(cfg)
            index_s = time.perf_counter() - started
            for step in range(args.warmup):
                task.train_batch(step, args.batch_size)
            started = time.perf_counter()
            for step in range(args.warmup, args.warmup + args.steps):
                x, _ = task.train_batch(step, args.batch_size)
            seconds = time.perf_counter() - started
            task.close()
            rate = args.steps * args.batch_size / seconds
            results.append({"workers": workers, "images_per_s": rate, "batch_ms": 1000 * seconds / args.steps,
                            "index_s": index_s})
            print(f"workers {workers}: {rate:7.1f} images/s  ({1000 * seconds / args.steps:6.1f} ms per batch of "
                  f"{args.batch_size} at {args.image_size} px; indexing and checking took {index_s:.2f} s)")
    if args.json:
        print(json.dumps({"image_size": args.image_size, "batch_size": args.batch_size, "decode": args.decode,
                          "source": f"{args.width}x{args.height} JPEG", "results": results}))


if __name__ == "__main__":
    main()
