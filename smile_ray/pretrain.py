"""Source models: where pre-trained weights come from.

``weights=source`` pre-trains the backbone on the dataset's source task (digits 0-4 for
the embedded default) once and caches the result under the cache directory, keyed by
everything that determines it; later runs, and every trial of a study, reuse the file.
``weights=imagenet`` (= ``DEFAULT``) or another weight tag (``IMAGENET1K_V2``, ...) reads
the backbone's published weights (:func:`~smile_ray.models.load_pretrained`: the
framework's cache, downloaded when online), ``weights=none`` is a random
initialisation with the backbone's ``source_classes`` outputs, and any other value is a
path to a weight file.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from smile_ray import rng
from smile_ray.checkpoint import atomic_write, write_json
from smile_ray.config import Config
from smile_ray.data import Task
from smile_ray.errors import SmileError
from smile_ray.models import (SourceModel, build_source_model, imagenet_weights_path, is_weight_tag, load_pretrained,
                              load_source_model)
from smile_ray.optim import build_sgd
from smile_ray.paths import cache_root
from smile_ray.registry import BACKBONES, DATASETS

# Bump when pre-training code changes what it produces: old cache entries are then unused.
RECIPE_VERSION = 2
#: ``threads``: torch's CPU threads while pre-training. A CPU's sums come out in an order
#: that follows the thread count, so the weights would follow it too, and the cached model
#: would depend on which command (a 1-thread Ray trial, a many-thread ``train``) filled
#: the cache first; one fixed count makes the file a function of its key. One thread:
#: the source task's small models gain little from more, and a shared machine loses none.
RECIPE = {"steps": 1000, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "seed": 0, "threads": 1}



def source_weights_path(config: Config, cache_dir: Path) -> Path:
    """The cache file of the source model for ``config`` (keyed by everything that
    determines it: dataset, backbone, image size, data folder and the recipe, its thread
    count included)."""
    dataset, backbone, image_size = config.dataset, config.backbone, config.image_size
    key = {"dataset": dataset, "backbone": backbone, "image_size": image_size, "recipe": RECIPE, "v": RECIPE_VERSION}
    if config.data_root:
        key["data_root"] = str(Path(config.data_root).resolve())
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    safe = backbone.replace("/", "_")  # timm/<name>: one file, not a folder
    return Path(cache_dir) / f"source-{dataset}-{safe}-{image_size}px-{digest}.pt"


@torch.no_grad()
def accuracy(model: SourceModel, task: Task, split: str) -> float:
    model.eval()
    correct = total = 0
    for x, y in task.eval_batches(split):
        correct += int((model(x)[1].argmax(1) == y).sum())
        total += len(y)
    model.train()
    return correct / total


def pretrain_source(task: Task, backbone: str, log=print, progress: bool = False) -> tuple[SourceModel, dict]:
    """Supervised pre-training on the source task (SGD, Nesterov, cosine schedule), on
    ``RECIPE["threads"]`` torch threads whatever the caller's, which are restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(RECIPE["threads"])
    try:
        return _pretrain(task, backbone, progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(task: Task, backbone: str, progress: bool) -> tuple[SourceModel, dict]:
    r = RECIPE
    with torch.random.fork_rng():
        torch.manual_seed(rng.derive_seed(r["seed"], rng.INIT))
        model = build_source_model(backbone, task.num_classes)
    if task.in_channels != model.in_channels:
        raise SmileError(f"backbone {backbone!r} takes {model.in_channels}-channel images, the source task has {task.in_channels}")
    opt = build_sgd(model.parameters(), lr=r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"], nesterov=True)
    start = time.perf_counter()
    model.train()
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=r["steps"], desc=f"pre-training {backbone}", unit="step", file=sys.stderr, dynamic_ncols=True)
    try:
        for step in range(r["steps"]):
            for g in opt.param_groups:
                g["lr"] = 0.5 * r["lr"] * (1 + math.cos(math.pi * step / r["steps"]))
            x, y = task.train_batch(step, r["batch_size"])
            loss = F.cross_entropy(model(x)[1], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1)
    finally:  # an interrupted pre-training leaves its bar where it stopped, before the error line
        if bar is not None:
            bar.close()
    info = {"seconds": time.perf_counter() - start, "source_val_acc": accuracy(model, task, "val"), **r}
    return model, info


def load_source(config: Config, cache_dir: str | Path | None = None, log=print,
                progress: bool = False) -> tuple[SourceModel, str]:
    """The pre-trained source model for ``config.weights`` and a description of where it came from."""
    w = config.weights
    if w == "source":
        spec = DATASETS.get(config.dataset)
        if spec.source is None:
            raise SmileError(
                f"weights=source: dataset {config.dataset!r} has no source task; use weights=imagenet or a weight file"
            )
        path = source_weights_path(config, cache_root(cache_dir))
        if not path.is_file():
            log(f"pre-training {config.backbone} on the {config.dataset} source task (cached at {path})")
            model, info = pretrain_source(spec.source(config, cache_dir), config.backbone, progress=progress)
            save_weights(model, path, info)
            log(f"source model: {info['source_val_acc']:.1%} held-out source accuracy, {info['seconds']:.1f} s")
        return load_source_model(config.backbone, path), str(path)
    if is_weight_tag(w) and BACKBONES.get(config.backbone).pretrained is not None:
        return load_pretrained(config.backbone, w)
    if w in ("imagenet", "DEFAULT"):
        path = imagenet_weights_path(config.backbone)
        if not path.is_file():
            raise SmileError(
                f"weights={w}: {path} not found (nothing is downloaded; put the published file there)"
            )
        return load_source_model(config.backbone, path), str(path)
    if is_weight_tag(w) and not Path(w).exists():
        raise SmileError(f"weights={w}: backbone {config.backbone!r} has no weights of that tag "
                         "(its published weights are weights=imagenet, if any) and no file of that name exists")
    if w == "none":
        # seeded: the global generator's state would otherwise make two runs of one config differ
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.derive_seed(config.seed, rng.INIT, 1))
            return build_source_model(config.backbone, BACKBONES.get(config.backbone).source_classes), "none"
    return load_source_model(config.backbone, w), str(Path(w).resolve())


def save_weights(model: SourceModel, path: Path, info: dict) -> None:
    """Write the weights and a JSON sidecar atomically (concurrent trials may race here)."""
    write_json(info, path.with_suffix(".json"))
    atomic_write(path, lambda tmp: torch.save(model.weights_state_dict(), tmp))
