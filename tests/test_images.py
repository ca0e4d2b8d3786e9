"""The file-image pipeline: transforms, normalisation, batches keyed by (seed, step, rank)
whatever the number of DataLoader workers, bad images, resume, and one end-to-end run
through the CLI."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import native_layouts as nl
from conftest import FEW_IL_PAIRS
from smile_ray.config import make_config
from smile_ray.data import build_task
from smile_ray.data.images import ImageTask, resize_side
from smile_ray.errors import SmileError
from smile_ray.models import IMAGENET_NORM

SIZE = 16  # crop side; resized to round(16 * 256 / 224) = 18 first


def folder_task(root, **values) -> ImageTask:
    return build_task(make_config({"dataset": "image_folder", "data_root": str(root), "backbone": "resnet18",
                                   "weights": "none", "image_size": SIZE, "data_workers": 0,
                                   "samples_per_class": 4, **values}))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    nl.write_image_folder(root, train=6, test=2, suffix=".png", size=(40, 30))
    return root


def reference(task: ImageTask, split: str, i: int, top: int, left: int, flip: bool, norm=IMAGENET_NORM) -> torch.Tensor:
    """torchvision's own transforms on the same file: Resize((R, R)), crop, flip, ToTensor, Normalize."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    source = task.sources[split][0]
    im = Image.open(source.name(i)).convert("RGB")
    im = TF.resize(im, [resize_side(SIZE)] * 2)
    im = TF.center_crop(im, [SIZE]) if top < 0 else TF.crop(im, top, left, SIZE, SIZE)
    if flip:
        im = TF.hflip(im)
    x = TF.to_tensor(im)
    return TF.normalize(x, *norm) if norm else x


def test_resize_side_scales_the_reference():
    assert resize_side(224) == 256 and resize_side(16) == 18 and resize_side(32) == 37 and resize_side(448) == 512


def test_eval_is_resize_then_centre_crop_with_imagenet_normalisation(folder):
    t = folder_task(folder)
    x, y = next(t.eval_batches("test"))
    assert x.shape == (6, 3, SIZE, SIZE) and y.tolist() == [0, 0, 1, 1, 2, 2]
    for i in range(6):
        torch.testing.assert_close(x[i], reference(t, "test", i, -1, -1, False))


def test_images_at_are_the_eval_images_and_decode_only_those(folder, monkeypatch):
    """What the interpolation losses read: the un-augmented images at some indices, in
    their order with repeats, equal to eval_batches' images, each file decoded once."""
    from smile_ray.data import images

    t = folder_task(folder)
    every = torch.cat([x for x, _ in t.eval_batches("train")])
    opened = []
    decode = images.decode
    monkeypatch.setattr(images, "decode", lambda source, i, side: (opened.append(i), decode(source, i, side))[1])
    wanted = [5, 1, 5, 0, 7]
    got = t.images_at("train", wanted)
    assert torch.equal(got, every[wanted])
    assert sorted(opened) == [0, 1, 5, 7]  # of the split's len(every) images


def test_train_batches_crop_and_flip_as_drawn(folder):
    t = folder_task(folder)
    flips, offsets = set(), set()
    for step in range(4):
        x, y = t.train_batch(step, 6)
        items = t.shard_items(step, 6)
        assert y.tolist() == t.train_labels()[t.train_indices(step, 6)].tolist()
        for j, (i, top, left, flip) in enumerate(items):
            torch.testing.assert_close(x[j], reference(t, "train", i, top, left, flip))
            flips.add(flip)
            offsets.add((top, left))
            assert 0 <= top <= 2 and 0 <= left <= 2  # R - S = 2
    assert flips == {True, False} and len(offsets) > 3


def test_the_backbone_declares_the_normalisation(folder):
    lite = folder_task(folder, backbone="efficientnet_lite0")  # normalises inside the model: [0, 1] here
    x, _ = next(lite.eval_batches("test"))
    torch.testing.assert_close(x[0], reference(lite, "test", 0, -1, -1, False, norm=None))
    assert 0 <= x.min() and x.max() <= 1


def test_a_weight_tag_brings_its_own_normalisation(folder):
    """The image pipeline normalises with the weights' metadata (torchvision's transforms'
    mean and std, timm's pretrained config); nothing is read or downloaded to know it."""
    import torchvision

    meta = torchvision.models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1.transforms()
    t = folder_task(folder, backbone="convnext_tiny", weights="DEFAULT")
    assert t.norm == (tuple(meta.mean), tuple(meta.std))
    pytest.importorskip("timm")
    t = folder_task(folder, backbone="timm/tf_efficientnet_lite0", weights="imagenet")
    assert t.norm == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # not ImageNet's: the weights' own
    x, _ = next(t.eval_batches("test"))
    torch.testing.assert_close(x[0], reference(t, "test", 0, -1, -1, False, norm=t.norm))


def test_batches_are_a_pure_function_of_seed_step_and_rank(folder):
    a = folder_task(folder, seed=5)
    steps = [a.train_batch(s, 8) for s in range(5)]
    two = folder_task(folder, seed=5, data_workers=2)  # decoded in two worker processes
    for s in (0, 1, 2, 3, 4):
        x, y = two.train_batch(s, 8)
        assert torch.equal(x, steps[s][0]) and torch.equal(y, steps[s][1])
    fresh = folder_task(folder, seed=5)
    for s in (3, 1, 4, 0):  # out of order: the loader restarts at the asked step
        assert torch.equal(fresh.train_batch(s, 8)[0], steps[s][0])
    shards = [two.train_batch(2, 8, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat([s[0] for s in shards]), steps[2][0])
    assert torch.equal(torch.cat([s[1] for s in shards]), steps[2][1])
    assert not torch.equal(steps[0][0], steps[1][0])
    other = folder_task(folder, seed=6)
    assert not torch.equal(other.train_batch(0, 8)[0], steps[0][0])
    assert not a.pin_memory  # CPU run


def test_an_image_task_trains_on_the_device_it_is_told(folder):
    # the Task protocol's train_on: a CUDA run gets uint8 pixels (normalised after the copy)
    # and pinned batches; a CPU run float batches, unpinned. Nothing here touches a GPU.
    t = folder_task(folder, data_workers=0)
    assert t.builds_ahead and not t.uint8_batches
    t.train_on(torch.device("cuda"))
    assert t.device.type == "cuda" and t.uint8_batches and t.pin_memory
    t.train_on(torch.device("cpu"))
    assert t.device.type == "cpu" and not t.uint8_batches and not t.pin_memory


@pytest.mark.parametrize("backbone", ["resnet18", "efficientnet_lite0"])
def test_uint8_batches_normalised_after_the_copy_are_the_float_batches(folder, backbone):
    # what a CUDA run does: the workers hand over pixels, Run.to_device normalises them
    t = folder_task(folder, backbone=backbone, data_workers=1)
    floats = [t.train_batch(s, 8) for s in range(3)] + [next(t.eval_batches("val"))]
    t.uint8_batches = True
    raw = [t.train_batch(s, 8) for s in range(3)] + [next(t.eval_batches("val"))]
    for (xf, yf), (xr, yr) in zip(floats, raw):
        assert xr.dtype == torch.uint8 and xr.shape == xf.shape
        assert torch.equal(t.normalize(xr), xf) and torch.equal(yr, yf)  # bit for bit
    t.uint8_batches = False
    assert torch.equal(t.train_batch(1, 8)[0], floats[1][0])
    from smile_ray.recipe import Run

    run = Run(make_config({"channels_last": True}), torch.device("cpu"), t, None, None, None, "")
    x, y = run.to_device(*raw[0])
    assert torch.equal(x, floats[0][0]) and x.is_contiguous(memory_format=torch.channels_last)


def test_the_global_torch_generator_is_not_touched(folder):
    t = folder_task(folder, data_workers=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    t.train_batch(0, 4)
    list(t.eval_batches("val"))
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------ bad images


@pytest.fixture
def cub(tmp_path):
    base = nl.write_cub(tmp_path, classes=3, train=8, test=2)
    return tmp_path, base


def cub_task(root, **values):
    return build_task(make_config({"dataset": "cub200", "data_root": str(root), "backbone": "resnet18",
                                   "weights": "none", "image_size": SIZE, "data_workers": 0,
                                   "samples_per_class": 2, **values}))


def truncate(path):
    path.write_bytes(path.read_bytes()[:200])


def test_an_unreadable_image_stops_the_run_at_indexing(cub):
    root, base = cub
    bad = base / "images" / "002.Bird_1" / "Bird_1_0003.jpg"
    truncate(bad)
    with pytest.raises(SmileError) as err:
        cub_task(root)
    message = str(err.value)
    assert "\n" not in message and f"cannot read image {bad}" in message and "skip_bad_images=true" in message
    (base / "images" / "003.Bird_2" / "Bird_2_0000.jpg").write_text("not a picture")
    bad.unlink()
    with pytest.raises(SmileError, match=r"Bird_1_0003.jpg \(no such file\) \(2 unreadable among the 30"):
        cub_task(root)


def test_skip_bad_images_leaves_them_out_with_a_warning(cub):
    root, base = cub
    bad = [base / "images" / "002.Bird_1" / "Bird_1_0003.jpg", base / "images" / "001.Bird_0" / "Bird_0_0009.jpg"]
    for path in bad:
        truncate(path)
    with pytest.warns(UserWarning, match=r"cub200: left out 2 unreadable images"):
        t = cub_task(root, skip_bad_images=True, sample_rate=1.0)
    assert sorted(t.skipped_images) == sorted(map(str, bad))
    assert t.split_sizes() == {"train": 3 * 7 - 1, "val": 3, "test": 3 * 2 - 1}  # one train, one test image fewer
    used = {t.sources[s][0].name(i) for s in t.sources for i in range(len(t.sources[s][0]))}
    assert not used & set(map(str, bad))


def test_an_image_that_breaks_after_indexing_names_itself(cub):
    root, base = cub
    for workers in (0, 1):
        breaks_naming_itself(cub_task(root, data_workers=workers, sample_rate=1.0), 0)


def breaks_naming_itself(t, position):
    """Truncate the image at ``position`` of step 0's batch after indexing: the batch
    fails in one line that names the file."""
    victim = t.sources["train"][0].name(int(t.train_indices(0, 4)[position]))
    saved = Path(victim).read_bytes()
    truncate(Path(victim))
    try:
        with pytest.raises(SmileError) as err:
            t.train_batch(0, 4)
    finally:
        Path(victim).write_bytes(saved)
        # the error's traceback holds the task in a cycle: its workers stop now, not at a
        # garbage collection in some later test (5 s; smile_ray.data.images._stop_workers)
        t.close()
    message = str(err.value)
    assert message.startswith(f"cub200: cannot read image {victim} (") and "\n" not in message


# ------------------------------------------------------------------ training on images


def run_config(root, **values):
    return make_config({"dataset": "cub200", "data_root": str(root), "backbone": "resnet18", "weights": "none",
                        "image_size": SIZE, "steps": 4, "eval_every": 2, "batch_size": 8, "samples_per_class": 3,
                        "data_workers": 1, "threads": 1, **FEW_IL_PAIRS, **values})


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(cub, tmp_path):
    from smile_ray.recipe import train

    root, _ = cub
    cfg = run_config(root)
    whole = train(cfg, tmp_path / "whole", cache_dir=tmp_path / "cache")

    class Stop(Exception):
        pass

    def stop_at_2(record, _checkpoint_dir):
        if record["step"] == 2:
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "split", cache_dir=tmp_path / "cache", on_eval=stop_at_2)
    resumed = train(cfg.replace(data_workers=0), tmp_path / "split", cache_dir=tmp_path / "cache")  # any worker count
    assert resumed["resumed_from"] == [2] and resumed["history"] == whole["history"]
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_stops_its_data_workers_when_it_ends(cub, tmp_path):
    """A run's DataLoader workers (training's and evaluation's) end with the run, even while
    its objects are still held: here by the traceback of its hook's error; in a study, by
    a cycle some library left. Left to the garbage collector, each loader's shutdown used
    to stall whatever code the collection interrupted for 5 s."""
    from conftest import descendants

    from smile_ray.recipe import train

    root, _ = cub
    before = set(descendants(os.getpid()))

    class Stop(Exception):
        pass

    def stop(record, _checkpoint_dir):
        assert set(descendants(os.getpid())) - before  # training's and evaluation's workers run
        raise Stop

    with pytest.raises(Stop) as info:
        train(run_config(root, data_workers=1), tmp_path / "run", cache_dir=tmp_path / "cache", on_eval=stop)
    assert any(entry.frame.code.name == "train" for entry in info.traceback)  # the run's frames are held
    assert set(descendants(os.getpid())) <= before


@pytest.mark.parametrize("method", ["lwf", "cotuning", "regsl", "delta"])
def test_methods_with_preparations_run_on_images(cub, tmp_path, method):
    from smile_ray.recipe import train

    root, _ = cub
    m = train(run_config(root, method=method, steps=2, data_workers=0), None, cache_dir=tmp_path / "cache")
    assert m["steps"] == 2 and m["split_sizes"]["train"] == 9


def test_end_to_end_through_the_cli(cub, tmp_path, capsys):
    from smile_ray.cli import main

    root, base = cub
    out = tmp_path / "run"
    args = ["train", "--dataset", "cub200", "--set", f"data_root={root}", "--set", "backbone=resnet18",
            "--set", "weights=none", "--set", "image_size=32", "--set", "steps=4", "--set", "eval_every=2",
            "--set", "batch_size=8", "--set", "class_fraction=0.67", "--set", "train_images=5",
            "--set", "data_workers=1", "--set", "threads=1", "--set", "il_pairs=8", "--output", str(out), "--quiet",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "cub200" and m["steps"] == 4 and len(m["history"]) == 2
    assert len(m["classes"]) == 2 and set(m["classes"]) <= {"001.Bird_0", "002.Bird_1", "003.Bird_2"}
    assert m["split_sizes"] == {"train": 5, "val": 2, "test": 4} and m["skipped_images"] == []
    assert m["config"]["class_fraction"] == 0.67 and m["config"]["train_images"] == 5
    capsys.readouterr()

    # a bad image: one line on stderr, exit code 2, nothing written
    truncate(base / "images" / "001.Bird_0" / "Bird_0_0001.jpg")
    failed = tmp_path / "failed"
    args[args.index(str(out))] = str(failed)
    args[args.index("class_fraction=0.67")] = "class_fraction=1"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Bird_0_0001.jpg" in err and err.startswith("error: cub200: cannot read image")
    assert not failed.exists()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


# ------------------------------------------------------------------ workers, pinning, the evaluation loader


def test_worker_count_follows_the_cpus_this_process_may_use():
    from smile_ray.data.images import worker_count

    assert worker_count(3, 64, "1") == 3 and worker_count(0, 64, None) == 0  # asked for: as asked
    assert worker_count(-1, 64, None) == 4 and worker_count(-1, 2, None) == 2  # min(4, affinity)
    assert worker_count(-1, 64, "2") == 2  # a Ray worker that reserved 2 CPUs of a 64-core node
    assert worker_count(-1, 64, "1") == 1  # Ray's default for an actor without num_cpus
    assert worker_count(-1, 3, "16") == 3  # the affinity is the tighter limit
    assert worker_count(-1, 64, "") == 4 and worker_count(-1, 64, "4,2") == 4 and worker_count(-1, 64, "0") == 4
    assert worker_count(-1, 0, None) == 1


def test_batches_are_pinned_only_for_a_cuda_run(folder):
    t = folder_task(folder)
    assert t.device == torch.device("cpu") and not t.pin_memory  # whatever GPUs the machine has
    t.device = torch.device("cuda")  # what the recipe sets for a CUDA run (no GPU needed to say so)
    assert t.pin_memory
    t.device = "cpu"
    assert not t.pin_memory
    device_decoded = folder_task(folder, decode="device")
    device_decoded.device = "cuda"
    assert not device_decoded.pin_memory  # its workers hand over file bytes, read where they are


def children() -> set[int]:
    """The processes this (test) process started that are alive now."""
    me, out = os.getpid(), set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me and stat.rsplit(")", 1)[1].split()[0] != "Z":
                out.add(int(d.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_evaluation_workers_live_from_one_evaluation_to_the_next(folder):
    before = children()
    t = folder_task(folder, data_workers=2)
    first = [b for b in t.eval_batches("test", batch_size=4)]
    workers = children() - before
    assert len(workers) == 2  # still alive after the evaluation ended
    second = [b for b in t.eval_batches("test", batch_size=4)]
    picked = t.images_at("val", [2, 0])
    assert children() - before == workers  # the same processes served all three
    inline = folder_task(folder, data_workers=0)
    expected = list(inline.eval_batches("test", batch_size=4))
    for got in (first, second):
        assert len(got) == len(expected) > 1
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected))
    assert torch.equal(picked, inline.images_at("val", [2, 0]))
    abandoned = t.eval_batches("test", batch_size=2)
    next(abandoned)
    again = list(t.eval_batches("val", batch_size=2))  # a new request ends the unfinished one
    assert len(again) == 2
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, inline.eval_batches("val", batch_size=2)))
    with pytest.raises(RuntimeError, match="newer one started"):
        next(abandoned)
    t.close()
    assert not (children() - before) & workers


# ------------------------------------------------------------------ decode: device


def write_textured(root: Path, size=(40, 30), classes=3, train=6, test=2, suffix=".jpg") -> Path:
    """JPEGs with detail at every scale (smooth test images would hide resize differences)."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    for c in range(classes):
        for k in range(train + test):
            split = "train" if k < train else "test"
            noise = g.integers(0, 256, (size[1] // 3, size[0] // 3, 3), dtype=np.uint8)
            im = Image.fromarray(noise).resize(size, Image.BICUBIC)
            path = root / split / f"c{c}" / f"{k}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            im.save(path, quality=90) if suffix == ".jpg" else im.save(path)
    return root


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    # 40 x 30 at SIZE 16: resized to 18 x 18, under twice that, so PIL decodes at full scale too
    return write_textured(tmp_path_factory.mktemp("jpegs"))


def uint8_batches(task, steps=3):
    task.uint8_batches = True  # compare pixels, before the normalisation
    return [task.train_batch(s, 8) for s in range(steps)] + list(task.eval_batches("val")) \
        + list(task.eval_batches("test"))


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_device_decoding_on_the_cpu_is_the_pil_pipeline_within_one_level(jpegs, folder, kind):
    """decode=device, run with device='cpu': the same labels, order, crops and flips as the
    PIL path, pixels within 1 of 255 (torchvision's antialiased bilinear resize and PIL's
    round differently; the JPEG decoders agree bit for bit on the CPU)."""
    root = jpegs if kind == "jpeg" else folder
    pil = uint8_batches(folder_task(root, data_workers=1))
    dev = uint8_batches(folder_task(root, data_workers=1, decode="device"))
    differs = 0
    for (xp, yp), (xd, yd) in zip(pil, dev):
        assert xd.dtype == torch.uint8 and xd.shape == xp.shape and torch.equal(yd, yp)
        diff = (xd.int() - xp.int()).abs()
        assert diff.max() <= 1
        differs += int((diff > 0).sum())
    assert len(dev) == len(pil)
    if kind == "jpeg":
        assert differs > 0  # the comparison sees real resizing, not a copy


def test_device_decoding_is_reproducible_and_normalised_like_the_pil_path(jpegs):
    a = folder_task(jpegs, decode="device", seed=3)
    floats = [a.train_batch(s, 8) for s in range(3)]
    b = folder_task(jpegs, decode="device", seed=3, data_workers=2)
    for s in (0, 1, 2):
        x, y = b.train_batch(s, 8)
        assert x.dtype == torch.float32 and torch.equal(x, floats[s][0]) and torch.equal(y, floats[s][1])
    b.uint8_batches = True
    assert torch.equal(b.normalize(b.train_batch(1, 8)[0]), floats[1][0])
    assert not torch.equal(floats[0][0], floats[1][0])
    pil = folder_task(jpegs, seed=3).train_batch(1, 8)[0]
    assert (pil - floats[1][0]).abs().max() <= 1 / 255 / 0.224 + 1e-6  # one level over ImageNet's smallest std


def test_device_decoding_of_in_memory_images(folder):
    from smile_ray.data.catalog import ArrayImages

    pil = folder_task(folder)
    arrays = {}
    for split, (source, labels) in pil.sources.items():
        pixels = torch.stack([torch.from_numpy(__import__("numpy").array(source.open(i).convert("RGB")))
                              for i in range(len(source))]).numpy()
        arrays[split] = (ArrayImages(pixels, [source.name(i) for i in range(len(source))]), labels)
    tasks = [ImageTask(arrays, pil.classes, pil.seed, SIZE, IMAGENET_NORM, decode=d) for d in ("cpu", "device")]
    for t in tasks:
        t.uint8_batches = True
    for s in range(2):
        (xc, yc), (xd, yd) = (t.train_batch(s, 6) for t in tasks)
        assert torch.equal(yc, yd) and (xc.int() - xd.int()).abs().max() <= 1


def test_device_decoding_of_bad_images(cub):
    root, base = cub
    bad = base / "images" / "002.Bird_1" / "Bird_1_0003.jpg"
    truncate(bad)
    with pytest.warns(UserWarning, match=r"left out 1 unreadable"):  # checked as before, by PIL
        t = cub_task(root, skip_bad_images=True, sample_rate=1.0, decode="device")
    assert t.skipped_images == [str(bad)] and t.split_sizes()["train"] == 3 * 7 - 1
    assert t.train_batch(0, 4)[0].shape == (4, 3, SIZE, SIZE)
    for workers in (0, 1):  # one that breaks after indexing stops the run naming itself
        breaks_naming_itself(cub_task(root, data_workers=workers, sample_rate=1.0, skip_bad_images=True,
                                      decode="device"), 1)
