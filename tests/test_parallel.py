"""Data parallelism in plain torch.distributed (gloo, two processes; no Ray): N workers
compute the single-process loss and gradient of the same global batch."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from smile_ray.losses import all_reduce_sum, feature_mixup_loss

B, WORLD = 8, 2
LAM = 0.7


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, 6, 6, generator=g)
    teacher = torch.randn(B, 4, 6, 6, generator=g)
    # each rank mixes inside its own shard; the single process uses the same pairs
    local = [torch.randperm(B // WORLD, generator=g) for _ in range(WORLD)]
    glob = torch.cat([p + r * (B // WORLD) for r, p in enumerate(local)])
    return x, teacher, local, glob


def model():
    torch.manual_seed(1)
    return nn.Conv2d(3, 4, 3, padding=1)


def worker(rank: int, init_file: str, results, reduce: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, teacher, local, _ = data()
        shard = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        net = nn.parallel.DistributedDataParallel(model())
        loss = feature_mixup_loss(net(x[shard]), teacher[shard], local[rank], LAM,
                                  sum_over_ranks=all_reduce_sum if reduce else None)
        loss.backward()
        results[rank] = (loss.item(), [p.grad.clone() for p in net.parameters()])
    finally:
        dist.destroy_process_group()


def run(tmp_path, reduce: bool):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(str(tmp_path / f"init-{reduce}"), results, reduce), nprocs=WORLD, join=True)
        return dict(results)


def test_feature_loss_over_two_workers_equals_one_process(tmp_path):
    x, teacher, _, glob = data()
    net = model()
    single = feature_mixup_loss(net(x), teacher, glob, LAM)
    single.backward()
    want = [p.grad for p in net.parameters()]

    got = run(tmp_path, reduce=True)
    for rank in range(WORLD):
        value, grads = got[rank]
        assert abs(value - single.item()) <= 1e-5 * single.item()
        for g, w in zip(grads, want):  # DDP averaged the ranks' gradients
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)

    # Without the reduction each rank's norm covers its shard only: about 1/sqrt(2) of
    # the value, which is what the test above rules out.
    per_shard = run(tmp_path, reduce=False)
    assert all(per_shard[r][0] < 0.85 * single.item() for r in range(WORLD))
