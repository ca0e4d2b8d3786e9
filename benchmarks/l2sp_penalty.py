"""L2-SP's penalty on a ResNet-50-sized parameter list (torchvision's ``resnet50`` body:
every parameter but the classifier's, 159 tensors, 23.5 M values), forward and backward:
the first version's per-tensor formula ``0.5 * sum_i (p_i - p0_i).pow(2).sum()`` against
``smile_ray.losses.l2sp_penalty`` (``_foreach_sub`` + ``_foreach_norm``, a hand-written
backward). Prints the operators and kernels the profiler records per call (on CUDA the
foreach operators are one multi-tensor kernel each, so the operator count is what a GPU
launches), and median seconds per call, the variants interleaved so that a shared
machine slows them alike.

    python benchmarks/l2sp_penalty.py                 # CPU, 2 threads, 20 repeats
    python benchmarks/l2sp_penalty.py --threads 1 --repeats 40 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smile_ray.losses import l2sp_penalty  # noqa: E402


def per_tensor(params, ref_params):
    return 0.5 * sum((p - p0.detach()).float().pow(2).sum() for p, p0 in zip(params, ref_params, strict=True))


def call(penalty, params, refs, weight=0.01):
    for p in params:
        p.grad = None
    (weight * penalty(params, refs)).backward()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: operators that only make a new view of a tensor: no kernel (AccumulateGrad's detach
#: of each gradient it stores is one, whatever the formula)
METADATA = {"aten::detach", "aten::view", "aten::expand", "aten::as_strided", "aten::alias", "aten::t",
            "aten::_reshape_alias", "aten::reshape", "aten::unsqueeze", "aten::squeeze"}


def inside_aten(event) -> bool:
    """Whether an operator runs inside another (its work is then the outer one's)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def profile(penalty, params, refs, device):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        call(penalty, params, refs)
        sync(device)
    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::") and e.name not in METADATA and not inside_aten(e))
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return ops, kernels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torchvision

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).to(device)
    params = [p for n, p in net.named_parameters() if not n.startswith("fc.")]
    refs = [(p + 0.01 * torch.randn_like(p)).detach() for p in params]
    variants = {"per-tensor": per_tensor, "foreach": l2sp_penalty}
    print(f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f} M values, {device}, "
          f"torch {torch.__version__}, {args.threads} threads")
    for name, penalty in variants.items():
        call(penalty, params, refs)  # warm up
        ops, kernels = profile(penalty, params, refs, device)
        print(f"{name:>10}: {ops} aten operators (outermost, views aside)" + (f", {kernels} CUDA kernels" if kernels else ""))
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, penalty in variants.items():
            sync(device)
            t = time.perf_counter()
            call(penalty, params, refs)
            sync(device)
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4)
        print(f"{name:>10}: median {statistics.median(ts) * 1e3:.1f} ms per forward + backward "
              f"(quartiles {q[0] * 1e3:.1f}-{q[2] * 1e3:.1f} ms, {len(ts)} calls)")


if __name__ == "__main__":
    main()
