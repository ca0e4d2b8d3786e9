"""DELTA: deep learning transfer using feature map with attention (Li, Xiong, Wang, Huan,
Chen and Dou, ICLR 2019).

The student (train mode) and a frozen copy of the pre-trained network (eval mode, no
gradients) see the same batch; forward hooks take the feature maps ``FM_j`` of the last
convolution of each backbone stage (ResNet-50: ``layer1.2.conv3``, ``layer2.3.conv3``,
``layer3.5.conv3``, ``layer4.2.conv3``, before BatchNorm and the residual add; see
:func:`~smile_ray.methods.base.last_convs`). Then

    L = CE(g(f(x)), y) + delta_weight * Omega + head_l2_weight * L_head

with ``Omega`` :func:`~smile_ray.losses.delta_penalty`: summed over the batch, in the
``feature_map`` variant ``sum_j 0.5 * ||FM_j(w, x) - FM_j(w0, x)||_F^2``, in the
``attention`` variant (the default: it is DELTA as published, and TLlib's default) each
channel's distance weighted by ``C_j * a_{j,c} / (H_j * W_j)``.

The channel weights ``a_j`` are a one-off preparation (cached, and costed in
``metrics.json`` under ``method_info.preparation.delta_channel_attention``): a copy of
the pre-trained body with a new head is fine-tuned on the training set (10 epochs of
batch 32 with the run's SGD settings, plain CE), then, in eval mode, over one pass of at
most 10 batches of 32, each channel's importance ``Delta_{j,c}`` is the mean rise of the
CE loss when that channel's filter is zeroed, and
``a_j = softmax((Delta_j - mean(Delta_j)) / std(Delta_j) / 5)``. Zeroing a filter makes
the channel's output its bias (or 0); the measurement does exactly that to the layer's
output, for many channels in one batched forward from the stage's input (the stages
before it run once), which computes what one forward per channel would.

Deviations: the head term is the shared head L2 (``head_l2_weight``, 1e-4; the public
code 0.01) and SGD keeps the shared weight decay (the public code switches it off); the
attention network trains at a constant lr (TLlib decays it exponentially) on our
augmented batches. Data parallel: ``Omega`` is a sum over the batch, summed over the
ranks with gradients (:func:`~smile_ray.losses.all_reduce_sum`), so every rank holds the
single-process value and DDP's averaging gives the single-process gradient.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smile_ray import rng
from smile_ray.losses import all_reduce_sum, delta_penalty
from smile_ray.methods.base import Method, evaluating, last_convs, unwrap
from smile_ray.models import TransferNet, _adapt_channels
from smile_ray.optim import build_sgd

#: the published attention recipe: epochs and batch size of the attention network's
#: fine-tuning, measurement batches (at most one pass), the softmax's temperature
ATTENTION_EPOCHS, ATTENTION_BATCH, ATTENTION_BATCHES, ATTENTION_TEMPERATURE = 10, 32, 10, 5.0
#: how many images one batched measurement forward may hold
MEASURE_IMAGES = 512


@contextmanager
def recording(modules: list[nn.Module]):
    """Inside, the outputs of ``modules`` of each forward are appended to the yielded list."""
    out: list[Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, o: out.append(o)) for m in modules]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def channel_attention(net: TransferNet, layers: list[str], batches: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """DELTA's channel weights for ``layers`` of ``net.body`` (eval mode; an
    ``nn.Sequential`` runs from the stage on, other bodies whole), from the mean rise of
    the CE loss over ``batches`` when each channel's filter is zeroed: ``a_j = softmax((Delta_j - mean) / std / 5)``."""
    body = net.body
    top = [name for name, _ in body.named_children()]
    rises = []
    with torch.no_grad(), evaluating(net):
        for layer in layers:
            conv = body.get_submodule(layer)
            if isinstance(body, nn.Sequential):  # what comes before the top-level child holding the layer runs once
                start = top.index(layer.split(".")[0])
                before, after = body[:start], body[start:]
            else:  # a body that is not a sequence (timm's) runs whole for each measurement
                before, after = nn.Identity(), body
            rise = torch.zeros(conv.out_channels, device=conv.weight.device)
            for x, y in batches:
                h = before(_adapt_channels(x, net.in_channels))
                base = F.cross_entropy(head(net, after(h)), y)
                per = max(1, MEASURE_IMAGES // len(y))
                for first in range(0, conv.out_channels, per):
                    chans = torch.arange(first, min(first + per, conv.out_channels), device=h.device)
                    n = len(chans)

                    def knock_out(_module, _inputs, o, chans=chans, n=n):
                        # copy i of the batch gets channel chans[i] as a zeroed filter makes it
                        o = o.unflatten(0, (n, -1)).clone()
                        fill = conv.bias[chans].view(n, 1, 1, 1) if conv.bias is not None else 0.0
                        o[torch.arange(n, device=o.device), :, chans] = fill
                        return o.flatten(0, 1)

                    handle = conv.register_forward_hook(knock_out)
                    try:
                        logits = head(net, after(h.repeat(n, *([1] * (h.dim() - 1)))))
                    finally:
                        handle.remove()
                    ce = F.cross_entropy(logits, y.repeat(n), reduction="none").view(n, -1).mean(1)
                    rise[chans] += ce - base
            rises.append(rise / len(batches))
    weights = []
    for d in rises:
        z = (d - d.mean()) / d.std(unbiased=False).clamp_min(1e-12)
        weights.append(torch.softmax(z / ATTENTION_TEMPERATURE, dim=0))
    return weights


def head(net: TransferNet, fmap: Tensor) -> Tensor:
    """The target classifier's logits of a body output (TransferNet's pooling)."""
    return net.classifier(torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1))


class Delta(Method):
    def attach(self, model, source, task=None, cache_dir=None):
        super().attach(model, source, task, cache_dir)
        net = unwrap(model)
        self.layers = last_convs(net.body)
        self.teacher = copy.deepcopy(source).eval().requires_grad_(False)
        self._student_layers = [net.body.get_submodule(n) for n in self.layers]
        self._teacher_layers = [self.teacher.body.get_submodule(n) for n in self.layers]
        self._info["layers"] = self.layers
        self.weights = None
        if self.config.delta_variant == "attention":
            device = next(net.parameters()).device
            c = self.config
            settings = {"layers": self.layers, "lr": c.lr, "momentum": c.momentum, "weight_decay": c.weight_decay,
                        "seed": c.seed, "recipe": [ATTENTION_EPOCHS, ATTENTION_BATCH, ATTENTION_BATCHES]}
            found = self.prepare("delta_channel_attention", source, settings,
                                 lambda: self._attention(source, net.classifier.out_features, device), device)
            self.weights = [found[n] for n in self.layers]

    def _attention(self, source, num_classes, device) -> dict[str, Tensor]:
        c, task = self.config, self.need_task()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.derive_seed(c.seed, rng.INIT))
            net = TransferNet(source, num_classes, source_head=False).to(device).train()
        opt = build_sgd(net.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                        nesterov=c.momentum > 0)
        train_steps = math.ceil(ATTENTION_EPOCHS * len(task) / ATTENTION_BATCH)
        for step in range(train_steps):
            x, y = (t.to(device) for t in task.train_batch(step, ATTENTION_BATCH))
            loss = F.cross_entropy(net(x).logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        measured = min(ATTENTION_BATCHES, math.ceil(len(task) / ATTENTION_BATCH))
        batches = [tuple(t.to(device) for t in task.train_batch(train_steps + i, ATTENTION_BATCH))
                   for i in range(measured)]
        return dict(zip(self.layers, channel_attention(net, self.layers, batches)))

    def loss(self, model, x, y, step):
        c = self.config
        with recording(self._student_layers) as fmaps:
            out = model(x)
        with torch.no_grad(), recording(self._teacher_layers) as ref:
            self.teacher(x)
        parts = {"cls": F.cross_entropy(out.logits, y), "delta": delta_penalty(fmaps, ref, self.weights)}
        if self.world_size > 1:
            parts["delta"] = all_reduce_sum(parts["delta"])
        return self.add_head_l2(model, parts["cls"] + c.delta_weight * parts["delta"], parts), parts
