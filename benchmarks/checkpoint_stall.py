"""How long a checkpoint stalls training: written on the training thread, or handed to
the background :class:`~smile_ray.checkpoint.CheckpointWriter`.

A SMILE run's checkpoint holds the student, its optimiser's momentum and the mean
teacher: about 300 MB for ResNet-50. The script builds such a run (random-init weights,
synthetic batches: only the state's size matters), takes one step so the momentum
exists, then times, over ``--repeats`` rounds,

* ``CheckpointWriter(background=False).save``: serialise and write the file on the
  calling thread (what a step waited for before);
* ``CheckpointWriter.save``: what the training thread now waits for (a host copy of the
  state), and how long the background write takes to reach the disk after it;

and checks that both files hold the same tensors. Needs only torch (no Ray, no MLflow).

    python benchmarks/checkpoint_stall.py                       # ResNet-50, SMILE, CPU
    python benchmarks/checkpoint_stall.py --device cuda         # on a GPU (copies device -> host)
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from smile_ray.config import make_config  # noqa: E402
from smile_ray.checkpoint import CheckpointWriter, LoopState, read_checkpoint, run_state  # noqa: E402
from smile_ray.recipe import resolve_device, setup, train_step  # noqa: E402
from step_time import SyntheticTask, sync  # noqa: E402


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_tensors, a, b))
    return a == b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--method", default="smile")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=None, help="where the files go [a temporary folder]")
    args = ap.parse_args()

    device = resolve_device(args.device)
    cfg = make_config({"method": args.method, "backbone": args.backbone, "weights": "none", "image_size": 32,
                       "batch_size": 8, "device": str(device)})
    run = setup(cfg, device=device, task=SyntheticTask(8, 3, 32, 10, device), log=lambda m: None)
    x, y = run.task.train_batch(0, 8)
    train_step(run, 0, x, y)
    sync(device)

    folder = args.dir or Path(tempfile.mkdtemp(prefix="smile-ray-ckpt-"))
    sync_s, stall_s, write_s = [], [], []
    writer, at_once = CheckpointWriter(background=True), CheckpointWriter(background=False)
    loop = LoopState(step=1, loss_sum=torch.zeros((), device=device))
    for r in range(args.repeats):
        t = time.perf_counter()
        at_once.save(run_state(run, loop), folder / "sync.pt")
        sync_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        writer.save(run_state(run, loop), folder / "background.pt")
        stall_s.append(time.perf_counter() - t)
        writer.wait()
        write_s.append(time.perf_counter() - t)
    writer.close()
    mb = (folder / "sync.pt").stat().st_size / 2**20
    a, b = read_checkpoint(folder / "sync.pt"), read_checkpoint(folder / "background.pt")
    equal = same_tensors(a, b)

    med = statistics.median
    print(f"{args.method} {args.backbone} checkpoint on {device}: {mb:.0f} MB, median of {args.repeats}, "
          f"{torch.get_num_threads()} threads")
    print(f"  written on the training thread (at once):         stall {1000 * med(sync_s):7.0f} ms")
    print(f"  background writer (CheckpointWriter.save):         stall {1000 * med(stall_s):7.0f} ms "
          f"(file on disk after {1000 * med(write_s):.0f} ms)")
    print(f"  both files hold the same state: {equal}")
    if not equal:
        sys.exit(1)


if __name__ == "__main__":
    main()
