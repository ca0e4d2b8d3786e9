"""The optimiser every training loop uses: SGD, as ``torch.optim.SGD`` computes it.

On CUDA :func:`build_sgd` returns ``torch.optim.SGD(fused=True)`` (one kernel per
step). Elsewhere it returns :class:`SGD`, the same algorithm written out here, because
constructing or stepping any ``torch.optim`` optimiser imports ``torch._dynamo``
(torch 2.x wraps ``add_param_group``, ``zero_grad`` and ``step`` in dynamo guards), which
costs 1.1-1.4 s of every fresh CPU process (each CLI call, trial process, test) and is
never used there. :class:`SGD` is ``torch.optim.SGD``'s single-tensor path (the one it
takes on CPU) operation for operation, so its updates are bit-identical (tested against
``torch.optim.SGD``), and its ``state_dict`` is ``torch.optim.SGD``'s format, so a
checkpoint written by either loads into the other.

One optimiser everywhere? torch 2.14 has a CPU fused SGD (``build_sgd(fused=True)``; the
tests run every method with it). ``benchmarks/optimizer.py`` on the 2-core CPU, 2
threads, while other jobs loaded it (load average 8-9, hence the wide spreads), median
(min-max) of 7 blocks of 20 steps:

* per step, digits_cnn (11 tensors, 0.09 M): this SGD 14 ms (2.7-70), fused 4.4 ms
  (0.09-133); ResNet-18 (62 tensors, 11.7 M): this SGD 1,640 ms (890-2,080), fused
  405 ms (243-701). The fused kernel is as fast or faster (about 4x on ResNet-18).
* first construction + step in a fresh process, 3 processes each: fused 3.8 s (3.5-7.9)
  without torchvision, 0.025 s (0.018-0.040) after ``import torchvision``; this SGD
  0.057 s (0.033-0.068). ``import torchvision`` itself imports ``torch._dynamo`` (4.9 s,
  3.5-8.6 here), so a ResNet run has paid the import already; a digits_cnn run (the
  default, the tests, the CLI) imports no torchvision and would pay it.

Decision: the CPU default stays this class. Switching would add the ``torch._dynamo``
import to every digits process and would change the default CPU weights (the fused
kernel was bit-identical to this class in the tests' short runs, but that is not
promised); fused SGD stays CUDA's, with the CPU tests running it too. A CPU ResNet run
would gain the fused kernel's speed with ``build_sgd(fused=True)``: a possible later
choice, measured here.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import Tensor, nn

# torch.optim.SGD's param-group keys, with the values a plain CPU SGD has; a state dict
# carries them, so both classes read and write the same dictionaries.
_GROUP_DEFAULTS = {"dampening": 0, "maximize": False, "foreach": None, "differentiable": False, "fused": None}
_IMPLEMENTATION_KEYS = ("foreach", "differentiable", "fused")


class SGD:
    """SGD with (optionally Nesterov) momentum and L2 weight decay; one parameter group.

    Per parameter with a gradient, as ``torch.optim.SGD`` (dampening 0, not maximising):
    ``g = grad + wd * p``; ``buf = g`` on the first step, else ``buf = momentum * buf + g``;
    ``g = g + momentum * buf`` (Nesterov) or ``g = buf``; ``p -= lr * g``. Parameters
    without a gradient are skipped and get no momentum buffer. ``param_groups[0]["lr"]``
    may be set between steps (the recipe's schedule does). ``state[p]`` holds
    ``"momentum_buffer"``. To restart a parameter's momentum, zero its buffer in place
    (RIFLE does): the next step gives ``buf = momentum * 0 + g = g``, the first step's
    update, bit for bit, here and in ``torch.optim.SGD``. Popping the buffer instead would
    also do here, but torch's fused SGD then finds a None among its buffers and raises.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        self.param_groups: list[dict[str, Any]] = [{"params": params, "lr": lr, "momentum": momentum,
                                                    "weight_decay": weight_decay, "nesterov": nesterov,
                                                    **_GROUP_DEFAULTS}]
        self.state: defaultdict[Tensor, dict[str, Tensor]] = defaultdict(dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            nesterov, dampening = group["nesterov"], group["dampening"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if wd != 0:
                    grad = grad.add(p, alpha=wd)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = grad.detach().clone()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                    grad = grad.add(buf, alpha=momentum) if nesterov else buf
                p.add_(grad, alpha=-lr)

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.SGD.state_dict()``'s format: parameters by index; the tensors are
        the live buffers, not copies."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": {index[id(p)]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads this class's or ``torch.optim.SGD``'s state dict (buffers cast to each
        parameter's dtype and device, and the group's settings taken from the dict, as
        torch does); a dict for other parameters raises ValueError."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, saved)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
        by_index = {i: p for g, s in zip(self.param_groups, saved) for i, p in zip(s["params"], g["params"])}
        state: defaultdict[Tensor, dict[str, Tensor]] = defaultdict(dict)
        for i, values in state_dict["state"].items():
            p = by_index[i]
            state[p] = {k: v.to(dtype=p.dtype, device=p.device) if torch.is_tensor(v) else v for k, v in values.items()}
        self.state = state
        self.param_groups = [{**s, "params": g["params"]} for g, s in zip(self.param_groups, saved)]


def build_sgd(params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float,
              nesterov: bool, fused: bool | None = None) -> "SGD | torch.optim.Optimizer":
    """The run's SGD. ``fused``: None (production) chooses ``torch.optim.SGD(fused=True)``
    when the parameters are on CUDA and :class:`SGD` (no ``torch._dynamo`` import)
    elsewhere; True asks for torch's fused SGD on any device (torch 2.14 has a CPU fused
    kernel on the same Python path as CUDA's, which is how the CPU tests run CUDA's
    optimiser); False for :class:`SGD` on any device. The same updates either way, to
    rounding (CPU's :class:`SGD` is bit-identical to ``torch.optim.SGD``'s single-tensor
    path; the fused kernel rounds differently)."""
    params = list(params)
    if fused is None:
        fused = bool(params) and params[0].device.type == "cuda"
    if fused:
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                               fused=True)
    return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def load_optimizer_state(optimizer: "SGD | torch.optim.Optimizer", state_dict: dict[str, Any]) -> None:
    """``optimizer.load_state_dict``, then two repairs.

    * The optimiser keeps its own implementation flags (``fused``, ``foreach``): torch
      would take them from the dict, so a checkpoint written on CPU would turn the fused
      CUDA update off on resume.
    * Every momentum buffer takes its parameter's memory layout (strides): loading casts
      dtype and device but keeps the saved strides, so a checkpoint written on CPU
      (contiguous buffers) resumed on CUDA (channels_last parameters) would hand the fused
      kernel buffers laid out unlike their parameters: CUDA's kernel raises, and the CPU
      fused kernel silently updates wrongly (it walks parameter, gradient and buffer as
      one flat array each). A buffer whose strides already match is kept as it is, so a
      resume on the machine that wrote the checkpoint loads the same tensors as before.
    """
    flags = [{k: g.get(k) for k in _IMPLEMENTATION_KEYS} for g in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, own in zip(optimizer.param_groups, flags):
        group.update(own)
        for p in group["params"]:
            state = optimizer.state.get(p)
            buf = state.get("momentum_buffer") if state else None
            if torch.is_tensor(buf) and buf.stride() != p.stride():
                state["momentum_buffer"] = torch.empty_like(p).copy_(buf)
