"""The embedded digits task: fixed splits, seeded subsets, deterministic batches."""
import numpy as np
import pytest
import torch

from smile_ray.config import make_config
from smile_ray.data import build_task
from smile_ray.data.digits import digits_arrays, digits_cache_path, digits_source
from smile_ray.errors import SmileError


def rows(x):
    return {tuple(r.flatten().tolist()) for r in x}


def test_splits_are_fixed_disjoint_and_balanced():
    a = build_task(make_config({"seed": 1}))
    b = build_task(make_config({"seed": 2}))
    sizes = a.split_sizes()
    assert sizes["train"] == 25 and sizes["val"] >= 170 and sizes["test"] >= 350
    for split in ("val", "test"):  # every run is scored on the same images
        assert torch.equal(a.splits[split][0], b.splits[split][0])
    assert not rows(a.splits["train"][0]) & rows(a.splits["test"][0])
    assert not rows(a.splits["val"][0]) & rows(a.splits["test"][0])
    assert torch.bincount(a.splits["train"][1]).tolist() == [5] * 5
    assert a.num_classes == 5 and a.in_channels == 1
    assert a.splits["train"][0].shape[-2:] == (32, 32)


def test_training_subset_depends_on_seed_only():
    a = build_task(make_config({"seed": 1}))
    again = build_task(make_config({"seed": 1}))
    b = build_task(make_config({"seed": 2}))
    assert torch.equal(a.splits["train"][0], again.splits["train"][0])
    assert rows(a.splits["train"][0]) != rows(b.splits["train"][0])


def test_digits_are_cached_beside_the_source_models_and_read_back_identically(tmp_path):
    from sklearn.datasets import load_digits

    reference = load_digits()
    path = digits_cache_path(tmp_path)
    assert not path.exists()
    first = build_task(make_config({"seed": 3}), cache_dir=tmp_path)  # reads scikit-learn, writes the cache
    assert path.is_file()
    images, labels = digits_arrays(tmp_path)
    assert images.dtype == np.uint8 and np.array_equal(images, reference.images)  # exact: the values are 0..16
    assert np.array_equal(labels, reference.target)
    again = build_task(make_config({"seed": 3}), cache_dir=tmp_path)  # from the cache
    for split in ("train", "val", "test"):
        assert torch.equal(first.splits[split][0], again.splits[split][0])
        assert torch.equal(first.splits[split][1], again.splits[split][1])
    path.write_bytes(b"not an npz")  # a damaged cache is rebuilt, not trusted
    assert np.array_equal(digits_arrays(tmp_path)[0], reference.images)
    assert np.load(path)["images"].shape == (1797, 8, 8)


def test_source_task_holds_other_digits_than_the_target():
    src = digits_source(make_config({"image_size": 32}))
    tgt = build_task(make_config({"samples_per_class": 60}))
    assert not rows(src.splits["train"][0]) & rows(tgt.splits["train"][0])


def test_batches_are_a_function_of_step_and_shards_partition_them():
    task = build_task(make_config({"samples_per_class": 4}))  # 20 images, batch of 48 spans epochs
    x1, y1 = task.train_batch(7, 48)
    x2, y2 = task.train_batch(7, 48)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = task.train_batch(8, 48)
    assert not torch.equal(x1, x3)
    shards = [task.train_batch(7, 48, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([s[0] for s in shards]), x1)
    # every image is seen once per epoch
    idx = torch.cat([task.train_indices(s, 4) for s in range(5)])
    assert sorted(idx.tolist()) == list(range(20))


def test_both_task_kinds_implement_the_task_protocol():
    from smile_ray.data import Task, TensorTask
    from smile_ray.data.images import ImageTask

    task = build_task(make_config({"samples_per_class": 4}))
    members = [n for n in vars(Task) if not n.startswith("_")] + list(Task.__annotations__)
    assert {"train_batch", "eval_batches", "train_on", "normalize", "builds_ahead", "classes"} <= set(members)
    assert all(hasattr(task, n) for n in members)
    assert all(hasattr(ImageTask, n) for n in vars(Task) if callable(vars(Task)[n]) and not n.startswith("_"))
    assert TensorTask.builds_ahead is False and ImageTask.builds_ahead is True
    x, _ = task.train_batch(0, 8)
    task.train_on(torch.device("cpu"))
    assert torch.equal(task.train_batch(0, 8)[0], x) and task.normalize(x) is x  # float batches, as they were


def test_samples_per_class_larger_than_the_pool():
    with pytest.raises(SmileError, match="samples_per_class=500 needs 500 training images of digits class '5', but its pool holds 73 after holding out 40% for test and 20% for validation"):
        build_task(make_config({"samples_per_class": 500}))


def _gather_shift(x, pad, oy, ox):
    """The first version's shift: one 4-D advanced-indexing gather from the padded batch."""
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows_ = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows_, cols]


@pytest.mark.parametrize("size,pad", [(8, 1), (32, 2), (224, 14)])
def test_the_sliced_shift_is_bit_identical_to_the_gather(size, pad):
    from smile_ray.data import apply_shift, random_shift, shift_offsets

    x = torch.randn(6, 3, size, size)
    oy, ox = shift_offsets(6, pad, torch.Generator().manual_seed(3))
    out = apply_shift(x, pad, oy, ox)
    assert torch.equal(out, _gather_shift(x, pad, oy, ox))
    # by hand: offset (pad, pad) is the image itself; offset (0, 0) moves it down-right by pad, zeros above
    still = apply_shift(x[:1], pad, torch.tensor([pad]), torch.tensor([pad]))
    assert torch.equal(still, x[:1])
    moved = apply_shift(x[:1], pad, torch.tensor([0]), torch.tensor([0]))
    assert torch.equal(moved[0, :, pad:, pad:], x[0, :, :-pad, :-pad]) and not moved[0, :, :pad].any()
    assert torch.equal(random_shift(x, pad, torch.Generator().manual_seed(3)), out)
    assert apply_shift(x[:0], pad, oy[:0], ox[:0]).shape == (0, 3, size, size)


def test_prefetched_batches_are_the_tasks_keyed_batches_in_any_order():
    from smile_ray.recipe import Prefetcher

    task = build_task(make_config({"samples_per_class": 4}))
    pre = Prefetcher(task, 12, rank=1, world_size=2)
    try:
        for step in [0, 1, 2, 7, 8, 3]:  # consecutive steps come from the pipeline; a jump restarts it
            x, y = pre.batch(step)
            ex, ey = task.train_batch(step, 12, 1, 2)
            assert torch.equal(x, ex) and torch.equal(y, ey)
    finally:
        pre.close()


def test_batch_indices_from_two_threads_equal_the_single_threaded_ones():
    # The prefetch thread builds step k + 1 while the step's methods (RegSL, LwF) look up
    # step k's indices: both read and refill the cache of epoch permutations.
    import pickle
    import sys
    import threading

    from smile_ray.data import TensorTask

    x, y = torch.zeros(7, 1, 2, 2), torch.arange(7) % 5
    steps = range(300)  # batches of 16 over 7 images: every step spans 3 epochs and the cache turns over

    def task():
        return TensorTask({"train": (x, y), "val": (x, y), "test": (x, y)}, 5, seed=3)

    want = [task().train_indices(s, 16) for s in steps]
    shared, errors, got = task(), [], [[], []]

    def hammer(i):
        try:
            for s in steps:
                got[i].append(shared.train_indices(s, 16))
        except Exception as e:  # noqa: BLE001 - reported below, the thread must not die silently
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        for _ in range(5):
            got = [[], []]
            threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors[0]
            assert all(torch.equal(a, b) for a, b in zip(got[0], want)) and len(got[0]) == len(want)
            assert all(torch.equal(a, b) for a, b in zip(got[1], want)) and len(got[1]) == len(want)
    finally:
        sys.setswitchinterval(interval)
    # the lock does not stop a task from being pickled (spawned DataLoader workers, Ray)
    assert torch.equal(pickle.loads(pickle.dumps(shared)).train_indices(5, 16), want[5])
