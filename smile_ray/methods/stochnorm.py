"""StochNorm: stochastic normalisation (Kou, You, Wang and Long, NeurIPS 2020).

Every BatchNorm of the student's backbone is replaced by a :class:`StochNorm2d`. In
training, for each channel a switch ``s ~ Bernoulli(stochnorm_prob)``, drawn afresh at
every forward (shape ``(1, C, 1, 1)``), picks between the two normalisations:

    z = s * BN_batch(x) + (1 - s) * BN_running(x)

``BN_batch`` normalises with the batch statistics (and updates the running ones, as BN
does), ``BN_running`` with the running statistics as they were before this forward; both
share the affine parameters. Evaluation is plain BN. The loss is plain fine-tuning
(CE + ``head_l2_weight * L_head``); p = 0.5.

The module has BatchNorm's parameters and buffers under the same names, so checkpoints
and ``model.pt`` load into a plain :class:`~smile_ray.models.TransferNet` and evaluate
identically. The switches are drawn from a generator keyed by (seed, step), shared by
every layer (in forward order) and every data-parallel rank: ranks agree on which
channels use which statistics (the batch statistics themselves are per rank, as for
plain DDP BatchNorm) and a resumed run draws what an uninterrupted one would. The public
code draws with NumPy's global generator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smile_ray import rng
from smile_ray.methods.base import Method, unwrap

#: the key of the switches' generator, beside :mod:`smile_ray.rng`'s stream ids
SWITCH_STREAM = 101


class StochNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training forward mixes batch and running statistics per channel."""

    def __init__(self, *args, p: float = 0.5, generator: torch.Generator | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.p = p
        self.generator = generator

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, p: float, generator: torch.Generator | None) -> "StochNorm2d":
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats, p=p, generator=generator)
        new.load_state_dict(bn.state_dict())
        device = next(iter([*bn.parameters(), *bn.buffers()])).device
        return new.to(device).train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.running_mean is None:
            return super().forward(x)
        mean, var = self.running_mean.clone(), self.running_var.clone()  # before this forward's update
        running = F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        batch = super().forward(x)
        s = (torch.rand(self.num_features, generator=self.generator) < self.p).to(x.device, x.dtype, non_blocking=True)
        s = s.view(1, -1, *([1] * (x.dim() - 2)))
        return s * batch + (1 - s) * running

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def replace_batchnorms(module: nn.Module, p: float, generator: torch.Generator | None) -> int:
    """Replace every BatchNorm2d below ``module`` by a StochNorm2d; returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, StochNorm2d):
            setattr(module, name, StochNorm2d.from_batchnorm(child, p, generator))
            count += 1
        else:
            count += replace_batchnorms(child, p, generator)
    return count


class StochNorm(Method):
    @classmethod
    def used_keys(cls, config):
        return super().used_keys(config) | {"stochnorm_prob"}

    def attach(self, model, source, task=None, cache_dir=None):
        super().attach(model, source, task, cache_dir)
        self.generator = torch.Generator()
        self._info["replaced_batchnorms"] = replace_batchnorms(unwrap(model).body, self.config.stochnorm_prob,
                                                               self.generator)
        others = [type(m).__name__ for m in unwrap(model).modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, StochNorm2d)]
        if others:
            raise ValueError(f"stochnorm replaces BatchNorm2d only; the model also has {others[0]}")

    def loss(self, model, x, y, step):
        self.generator.manual_seed(rng.derive_seed(self.config.seed, SWITCH_STREAM, step))
        return self.plain_loss(model, x, y)
