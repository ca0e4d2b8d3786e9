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

The step's switches of all layers are drawn at once, before the forward
(:class:`Switches`): one ``torch.rand`` of ``sum_l C_l`` values on the CPU generator and
one host-to-device copy (from pinned memory on CUDA, so it does not wait), each layer
then taking the next ``C_l`` in forward order. torch's CPU uniform draws element by
element, so this is the same stream as one draw per layer: the switches, and the
weights of a run, are those of the first version (which copied each layer's switches
to the device separately: 53 pageable, synchronous copies per ResNet-50 step). A
compiled student sees a tensor and a slice per layer, no generator, so its graph does
not break at every layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smile_ray import rng
from smile_ray.errors import SmileError
from smile_ray.methods.base import Method, unwrap

#: the key of the switches' generator, beside :mod:`smile_ray.rng`'s stream ids
SWITCH_STREAM = 101


class Switches:
    """Switches drawn ahead for a set of layers that take them in turn: :meth:`draw`
    draws ``total`` of them (``rand < p`` on the CPU generator) and copies them to the
    device once; :meth:`take` hands out the next ``n``. A forward that takes more than
    were drawn (a second training forward in one step) gets the generator's next ones,
    as a draw per layer would."""

    def __init__(self, generator: torch.Generator, p: float, total: int = 0):
        self.generator, self.p, self.total = generator, p, total
        self.values: Tensor | None = None  # on the device
        self.cursor = 0

    def _draw(self, n: int, device: torch.device) -> Tensor:
        s = torch.rand(n, generator=self.generator) < self.p
        if device.type == "cuda":  # a copy from pageable memory would wait for the device
            s = s.pin_memory()
        return s.to(device, non_blocking=True)

    def draw(self, device: torch.device) -> None:
        """Draw this step's switches (call after seeding the generator)."""
        self.values, self.cursor = self._draw(self.total, device), 0

    def take(self, n: int, like: Tensor) -> Tensor:
        """The next ``n`` switches, in ``like``'s dtype."""
        if self.values is None or self.values.device != like.device:
            self.values, self.cursor = self._draw(n, like.device), 0
        elif self.cursor + n > len(self.values):
            rest = self.values[self.cursor:]
            self.values, self.cursor = torch.cat([rest, self._draw(max(n, self.total), like.device)]), 0
        s = self.values[self.cursor:self.cursor + n]
        self.cursor += n
        return s.to(like.dtype)


class StochNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training forward mixes batch and running statistics per channel.

    The switches come from ``switches`` (shared by the layers, drawn once per step) or,
    without it, from ``generator`` at each forward."""

    def __init__(self, *args, p: float = 0.5, generator: torch.Generator | None = None,
                 switches: Switches | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.p = p
        self.generator = generator
        self.switches = switches

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, p: float, generator: torch.Generator | None,
                       switches: Switches | None = None) -> "StochNorm2d":
        """A StochNorm2d with ``bn``'s parameters and buffers. timm's fused
        ``BatchNormAct2d`` (a BatchNorm2d that then applies its ``drop`` and ``act``
        modules) keeps them: they are applied after the stochastic normalisation, under
        the same names, so state-dict keys do not change."""
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats, p=p, generator=generator, switches=switches)
        for name in ("drop", "act"):
            if isinstance(getattr(bn, name, None), nn.Module):
                setattr(new, name, getattr(bn, name))
        new.load_state_dict(bn.state_dict())
        device = next(iter([*bn.parameters(), *bn.buffers()])).device
        return new.to(device).train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        z = self._normalise(x)
        for name in ("drop", "act"):  # timm's BatchNormAct2d (from_batchnorm)
            if name in self._modules:
                z = self._modules[name](z)
        return z

    def _normalise(self, x: Tensor) -> Tensor:
        if not self.training or self.running_mean is None:
            return super().forward(x)
        mean, var = self.running_mean.clone(), self.running_var.clone()  # before this forward's update
        running = F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)
        batch = super().forward(x)
        if self.switches is not None:
            s = self.switches.take(self.num_features, x)
        else:
            s = (torch.rand(self.num_features, generator=self.generator) < self.p).to(x.device, x.dtype,
                                                                                       non_blocking=True)
        s = s.view(1, -1, *([1] * (x.dim() - 2)))
        return s * batch + (1 - s) * running

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def replace_batchnorms(module: nn.Module, p: float, generator: torch.Generator | None,
                       switches: Switches | None = None) -> int:
    """Replace every BatchNorm2d below ``module`` by a StochNorm2d; returns how many."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, StochNorm2d):
            setattr(module, name, StochNorm2d.from_batchnorm(child, p, generator, switches))
            count += 1
        else:
            count += replace_batchnorms(child, p, generator, switches)
    return count


class StochNorm(Method):
    def attach(self, model, source, task=None, cache_dir=None):
        super().attach(model, source, task, cache_dir)
        self.generator = torch.Generator()
        self.switches = Switches(self.generator, self.config.stochnorm_prob)
        self._info["replaced_batchnorms"] = replace_batchnorms(unwrap(model).body, self.config.stochnorm_prob,
                                                               self.generator, self.switches)
        if not self._info["replaced_batchnorms"]:  # e.g. ConvNeXt: LayerNorms only
            raise SmileError(f"stochnorm replaces BatchNorm layers; backbone {self.config.backbone!r} has none")
        self.switches.total = sum(m.num_features for m in unwrap(model).modules() if isinstance(m, StochNorm2d))
        others = [type(m).__name__ for m in unwrap(model).modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, StochNorm2d)]
        if others:
            raise ValueError(f"stochnorm replaces BatchNorm2d only; the model also has {others[0]}")

    def loss(self, model, x, y, step):
        self.generator.manual_seed(rng.derive_seed(self.config.seed, SWITCH_STREAM, step))
        self.switches.draw(x.device)  # outside the (maybe compiled) student
        return self.plain_loss(model, x, y)
