"""The base of every fine-tuning method.

A method turns a batch into a loss and may keep state of its own (SMILE's mean
teacher). The training loop only calls :meth:`Method.loss` and
:meth:`Method.after_step`; it never asks which method it runs. What a method needs from
its surroundings (which config keys it ignores, whether DDP must look for parameters
without gradient) it declares here, so no other module branches on a method's name.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smile_ray import rng
from smile_ray.config import Config
from smile_ray.losses import head_l2, sample_lambda
from smile_ray.models import SourceModel, TransferNet


def unwrap(model: nn.Module) -> TransferNet:
    """The TransferNet inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


class Method:
    """Base class: plain fine-tuning pieces shared by every method."""

    #: whether the student gets a source-label head (initialised from the source classifier)
    uses_source_head = False

    #: config keys that only some methods read; a method ignores those it does not list
    #: in :meth:`used_keys`
    METHOD_KEYS = frozenset({
        "mixup_alpha", "ema_decay", "ema_every", "feature_weight", "source_label_weight", "plain_tail_fraction",
        "feature_mixup", "source_label", "mean_teacher", "label_mixup", "plain_tail", "head_l2_weight",
    })

    def __init__(self, config: Config, rank: int = 0, world_size: int = 1):
        self.config = config
        self.rank = rank
        self.world_size = world_size

    def attach(self, model: TransferNet, source: SourceModel) -> None:
        """Called once the student and the pre-trained source model are on the device."""

    def loss(self, model: nn.Module, x: Tensor, y: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss for batch ``(x, y)`` at ``step`` and its named parts."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after the optimiser step."""

    @classmethod
    def used_keys(cls, config: Config) -> set[str]:
        """The method-specific keys (of :attr:`METHOD_KEYS`) this method reads under
        ``config``. Plain fine-tuning reads only the head L2 weight."""
        return {"head_l2_weight"} if config.head_l2 else set()

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
        parts["head"] = head_l2(*unwrap(model).heads())
        return total + self.config.head_l2_weight * parts["head"]

    def plain_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Plain fine-tuning: CE on clean images plus the head L2."""
        parts = {"cls": F.cross_entropy(model(x).logits, y)}
        return self.add_head_l2(model, parts["cls"], parts), parts
