"""RIFLE: backpropagating deeper with re-initialised fully-connected layers (Li, Xiong,
Wang, Huan, Chen and Dou, ICML 2020).

Plain fine-tuning (CE + ``head_l2_weight * L_head``) whose target classifier is
re-initialised ``rifle_reinits`` (R) times at evenly spaced steps: with T = ``steps``,
after steps ``round(k * T / (R + 1))``, k = 1..R, so training falls into R + 1 periods
of about ``T / (R + 1)`` steps, and the last period (the final stretch) is never
interrupted: the head the run returns is a trained one. A re-initialisation is
``nn.Linear``'s default initialisation, drawn from a generator keyed by (seed, step), so
every data-parallel rank and a resumed run draw the same head; the head's optimiser
state (SGD momentum) is reset too, by zeroing its momentum buffers in place: the next
step then computes ``buf = momentum * 0 + g = g``, exactly the update of a parameter
without a buffer, and the buffer keeps its place (and layout) in the optimiser's state.
Popping the buffers instead (which this code once did) gives the same update in
``smile_ray.optim.SGD`` and torch's single-tensor SGD, but torch's fused SGD (the one a
CUDA run uses) then receives a list of buffers holding None and raises TypeError at the
first step after the first re-initialisation.

Deviations: the original code does not reset the head's optimiser state; the Paddle
version counts epochs and skips the last 5, we count steps and keep the final period
free. Data parallel: the loss is the plain one; the re-initialisation is identical on
every rank.
"""
from __future__ import annotations

import torch
from torch import nn

from smile_ray import rng
from smile_ray.methods.base import Method, unwrap


def reinit_steps(steps: int, reinits: int) -> list[int]:
    """Steps before which the head is fresh: ``round(k * steps / (reinits + 1))``, k = 1..R,
    those inside ``[1, steps)`` (a very short run has fewer distinct ones)."""
    return sorted({round(k * steps / (reinits + 1)) for k in range(1, reinits + 1)} & set(range(1, steps)))


class Rifle(Method):
    def __init__(self, config, rank=0, world_size=1):
        super().__init__(config, rank, world_size)
        self.schedule = reinit_steps(config.steps, config.rifle_reinits)
        self._info["reinit_steps"] = self.schedule

    def loss(self, model, x, y, step):
        return self.plain_loss(model, x, y)

    @torch.no_grad()
    def after_step(self, model, step, optimizer=None):
        if step + 1 not in self.schedule:
            return
        head = unwrap(model).classifier
        # Drawn on the CPU from a keyed generator (a CUDA head's own init would use the
        # device's generator), then copied in.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.derive_seed(self.config.seed, rng.INIT, step + 1))
            fresh = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        for p, q in zip(head.parameters(), fresh.parameters()):
            p.copy_(q)
            buf = optimizer.state.get(p, {}).get("momentum_buffer") if optimizer is not None else None
            if buf is not None:
                buf.zero_()
