"""The base of every fine-tuning method.

A method turns a batch into a loss and may keep state of its own (SMILE's mean
teacher). The training loop only calls :meth:`Method.attach`, :meth:`Method.loss`,
:meth:`Method.after_step` and, at the end, :meth:`Method.info`; it never asks which
method it runs. What a method needs from its surroundings (which config keys it ignores,
whether DDP must look for parameters without gradient) it declares here, so no other
module branches on a method's name.

One-off preparations (a baseline's statistics of the pre-trained network on the
training images) go through :meth:`Method.prepare`: computed once per (source weights,
training subset, settings), cached in the cache directory beside the pre-trained source
model, and recorded, with their cost, in ``metrics.json`` under ``method_info``.
"""
from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smile_ray import rng
from smile_ray.config import METHOD_KEYS, Config, reads
from smile_ray.losses import head_l2, sample_lambda
from smile_ray.models import SourceModel, TransferNet
from smile_ray.paths import cache_root
from smile_ray.registry import METHODS

#: bump when a preparation's code changes what it produces: old cache entries are then unused
PREPARATION_VERSION = 1


def unwrap(model: nn.Module) -> TransferNet:
    """The TransferNet inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


class Method:
    """Base class: plain fine-tuning pieces shared by every method."""

    #: whether the student gets a source-label head (initialised from the source classifier)
    uses_source_head = False

    #: config keys that only some methods read (declared in :mod:`smile_ray.config` with the
    #: methods that read them); a method ignores those it does not list in :meth:`used_keys`
    METHOD_KEYS = METHOD_KEYS

    def __init__(self, config: Config, rank: int = 0, world_size: int = 1):
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.task = None
        self.cache_dir: Path | None = None
        self._info: dict[str, Any] = {}

    def attach(self, model: TransferNet, source: SourceModel, task: Any = None,
               cache_dir: str | Path | None = None) -> None:
        """Called once the student and the pre-trained source model are on the device, before
        the optimiser is built and before any data-parallel wrapping: the place to change the
        student's modules and to compute one-off preparations. ``task`` is the training task
        (a :class:`~smile_ray.data.TensorTask` or :class:`~smile_ray.data.images.ImageTask`:
        read it through their shared interface, ``train_labels()``, ``eval_batches("train")``,
        ``train_batch``, never ``splits``), ``cache_dir`` where preparations are cached
        (None: the default cache, as for the source model)."""
        self.task = task
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss for batch ``(x, y)`` at ``step`` and its named parts."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int, optimizer: Any = None) -> None:
        """Called after the optimiser step ``step`` (with the optimiser, whose state a method
        may reset)."""

    def compiled_modules(self) -> tuple[nn.Module, ...]:
        """The method's own networks that ``compile=true`` compiles beside the student (a
        teacher whose forward runs every step). Default: none."""
        return ()

    def info(self) -> dict[str, Any]:
        """What the run's ``metrics.json`` records about the method (``method_info``): the
        cost of its preparations, its schedule, its counts. JSON-serialisable."""
        return dict(self._info)

    @classmethod
    def used_keys(cls, config: Config) -> set[str]:
        """The method-specific keys (of :attr:`METHOD_KEYS`) this method reads under
        ``config``: those the config declares for the name(s) it is registered under
        (:func:`smile_ray.config.reads`). A method narrows them where a key's own switch
        does not say it all."""
        names = METHODS.names_of(cls)
        return {k for k in METHOD_KEYS if any(reads(name, k, config) for name in names)}

    @classmethod
    def unused_keys(cls, config: Config) -> set[str]:
        """Config keys this method ignores under ``config`` (nothing to tune there)."""
        return set(cls.METHOD_KEYS - cls.used_keys(config))

    @classmethod
    def may_skip_parameters(cls, config: Config) -> bool:
        """Whether some trainable parameter can go without a gradient in a step (DDP must
        then look for such parameters, which costs a graph traversal per step)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def rank_state(self) -> list[Tensor]:
        """Tensors of the method's own that every data-parallel rank must hold equal, beside
        the student's parameters (checked at the end of a run: ``ranks_consistent``).
        Default: none."""
        return []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ---- shared pieces

    def in_plain_tail(self, step: int) -> bool:
        return step >= self.config.plain_tail_start

    def draw_mix(self, x: Tensor, step: int) -> tuple[float, Tensor]:
        """The step's mixing weight (shared by all ranks) and permutation (per rank)."""
        c = self.config
        lam = sample_lambda(c.mixup_alpha, rng.numpy_rng(c.seed, rng.LAMBDA, step))
        perm = torch.randperm(len(x), generator=rng.torch_rng(c.seed, rng.PERMUTATION, step, self.rank))
        return lam, perm.to(x.device, non_blocking=True)

    def add_head_l2(self, model: nn.Module, total: Tensor, parts: dict[str, Tensor]) -> Tensor:
        if not self.config.head_l2:
            return total
        parts["head"] = head_l2(*unwrap(model).heads(trainable=True))
        return total + self.config.head_l2_weight * parts["head"]

    def plain_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Plain fine-tuning: CE on clean images plus the head L2."""
        parts = {"cls": F.cross_entropy(model(x).logits, y)}
        return self.add_head_l2(model, parts["cls"], parts), parts

    def need_task(self) -> Any:
        if self.task is None:
            raise ValueError(f"{type(self).__name__} needs the training task: attach(model, source, task=...)")
        return self.task

    def batch_indices(self, step: int, y: Tensor) -> Tensor:
        """Training-set indices of this rank's shard of the global batch at ``step`` (what
        ``task.train_batch`` hands this rank), on ``y``'s device."""
        idx = self.need_task().train_indices(step, self.config.batch_size)
        per = len(idx) // self.world_size
        idx = idx[self.rank * per:(self.rank + 1) * per]
        if len(idx) != len(y):
            raise ValueError(f"batch of {len(y)} at step {step} is not this rank's shard of the configured batch")
        return idx.to(y.device, non_blocking=True)

    def global_batch_indices(self, step: int, device: torch.device) -> Tensor:
        """Training-set indices of the whole global batch at ``step`` (all ranks' shards in
        rank order)."""
        return self.need_task().train_indices(step, self.config.batch_size).to(device, non_blocking=True)

    def prepare(self, name: str, source: SourceModel, settings: dict[str, Any],
                compute: Callable[[], dict[str, Tensor]], device: torch.device) -> dict[str, Tensor]:
        """A one-off preparation: ``compute()`` (a dict of tensors) once per (source weights,
        training subset, ``settings``), cached as ``prepared/<name>-<digest>.pt`` in the
        cache directory, and recorded in :meth:`info` with its cost in seconds.

        The key is a digest of the source model's weights and buffers, of the training
        images and labels, and of ``settings`` (whatever else the result depends on), so
        a cached file is never reused for other inputs. Data-parallel ranks each compute
        or load it; the write is atomic, so ranks racing to write it are harmless.
        """
        from smile_ray.checkpoint import save_torch, write_json

        digest = tensor_digest(*source.weights_state_dict().values(), *self.need_task().digest_tensors(),
                               extra={"name": name, "settings": settings, "v": PREPARATION_VERSION})
        path = cache_root(self.cache_dir) / "prepared" / f"{name}-{digest[:16]}.pt"
        start = time.perf_counter()
        result, computed_seconds = None, None
        if path.is_file():
            try:
                result = torch.load(path, map_location=device, weights_only=True)
                computed_seconds = json.loads(path.with_suffix(".json").read_text()).get("seconds")
            except Exception:  # a corrupt or half-copied entry is recomputed
                result = None
        cached = result is not None
        if not cached:
            result = compute()
            computed_seconds = time.perf_counter() - start
            write_json({"seconds": computed_seconds, "name": name, "settings": settings}, path.with_suffix(".json"))
            save_torch({k: v.detach().cpu() for k, v in result.items()}, path)
            result = {k: v.to(device) for k, v in result.items()}
        self._info.setdefault("preparation", {})[name] = {
            "seconds": time.perf_counter() - start,  # what it cost this run
            "computed_seconds": computed_seconds,  # what computing it cost
            "cached": cached,
            "file": str(path),
        }
        return result


def tensor_digest(*tensors: Tensor, extra: Any = None) -> str:
    """SHA-256 over tensors' dtypes, shapes and bytes (and a JSON-able ``extra``)."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextmanager
def evaluating(module: nn.Module):
    """Eval mode inside, the module's own mode restored after."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


@torch.no_grad()
def train_source_logits(source: SourceModel, task: Any, device: torch.device) -> Tensor:
    """The pre-trained source classifier's logits of the task's un-augmented training
    images, in training-set index order (eval mode, fp32). Streams the task's batches,
    so image datasets are never held in memory whole."""
    with evaluating(source):
        return torch.cat([source(x.to(device))[1].float() for x, _ in task.eval_batches("train")])


def stages(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's stages, for the baselines that treat stages differently (DELTA's
    layers, RegSL's radii): those its family declares (the body's ``stage_names``, e.g.
    ResNet's ``layer1`` .. ``layer4``, EfficientNet's ``features.1`` .. ``features.7``,
    timm's ``feature_info`` modules; :func:`smile_ray.models.declare_stages`); else the
    body's top-level children that are containers holding a convolution (so a stem
    is not a stage, as in the public codes); a flat body (``digits_cnn``) has one stage
    per top-level convolution."""
    declared = getattr(body, "stage_names", None)
    if declared:
        return [(n, body.get_submodule(n)) for n in declared]
    containers = [(n, m) for n, m in body.named_children()
                  if not isinstance(m, nn.Conv2d) and any(isinstance(c, nn.Conv2d) for c in m.modules())]
    if containers:
        return containers
    return [(n, m) for n, m in body.named_children() if isinstance(m, nn.Conv2d)]


def last_convs(body: nn.Module) -> list[str]:
    """The qualified name of the last convolution (in module order) of each stage:
    ResNet-50 gives DELTA's ``layer1.2.conv3``, ``layer2.3.conv3``, ``layer3.5.conv3``,
    ``layer4.2.conv3`` (before BatchNorm and the residual add)."""
    out = []
    for name, stage in stages(body):
        if isinstance(stage, nn.Conv2d):
            out.append(name)
        else:
            inner = [n for n, m in stage.named_modules() if isinstance(m, nn.Conv2d)]
            out.append(f"{name}.{inner[-1]}")
    return out
