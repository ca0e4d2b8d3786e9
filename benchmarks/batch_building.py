"""Time to build one augmented training batch of the in-memory tasks (digits,
Fashion-MNIST): the random shift as the first version's 4-D advanced-indexing gather
from a padded copy against today's zero tensor + one slice copy per image
(``smile_ray.data.apply_shift``, bit-identical output), and one Ray Train rank's shard
(each rank now builds only its own) against the whole global batch. Variants are interleaved, so a shared machine
slows them alike; the figures are medians over ``--repeats``.

    python benchmarks/batch_building.py                       # 32, 64, 224 px; batch 48; 1 and 2 threads
    python benchmarks/batch_building.py --sizes 224 --threads 1 --repeats 50
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smile_ray.data import apply_shift, shift_offsets  # noqa: E402


def gather_shift(x, pad, oy, ox):
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32,64,224")
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--world-size", type=int, default=4, help="ranks for the shard figure")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    b = args.batch_size
    print(f"torch {torch.__version__}; batch {b}, 3 channels, float32; median of {args.repeats}, interleaved")
    print(f"{'px':>4} {'threads':>7} {'gather ms':>10} {'slice ms':>9} {'speed-up':>8} "
          f"{'slice img/s':>11} {f'1/{args.world_size} shard ms':>15}")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for size in map(int, args.sizes.split(",")):
            pad = max(1, size // 16)
            x = torch.randn(b, 3, size, size)
            g = torch.Generator().manual_seed(0)
            times = {"gather": [], "slice": [], "shard": []}
            per = b // args.world_size
            for _ in range(args.repeats):
                oy, ox = shift_offsets(b, pad, g)
                for name, fn in (("gather", lambda: gather_shift(x, pad, oy, ox)),
                                 ("slice", lambda: apply_shift(x, pad, oy, ox)),
                                 ("shard", lambda: apply_shift(x[:per], pad, oy[:per], ox[:per]))):
                    t = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t)
            med = {k: 1000 * statistics.median(v) for k, v in times.items()}
            print(f"{size:>4} {threads:>7} {med['gather']:>10.2f} {med['slice']:>9.2f} "
                  f"{med['gather'] / med['slice']:>7.1f}x {1000 * b / med['slice']:>11.0f} {med['shard']:>15.2f}")


if __name__ == "__main__":
    main()
