"""smile_ray.optim.SGD against torch.optim.SGD: the same bits, the same state dicts, and
no torch._dynamo import."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smile_ray.optim import SGD, build_sgd, load_optimizer_state

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
        self.unused = nn.Linear(2, 2)  # never in the graph: no gradient, so skipped and given no buffer
        self.head = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        return self.head(self.body(x))


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Net()


def batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)


def train(model, opt, steps, start=0, reset_at=None, reset=None):
    for step in range(start, start + steps):
        for group in opt.param_groups:
            group["lr"] = 0.05 if step < 4 else 0.005  # a schedule that changes the lr between steps
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == reset_at:  # RIFLE's re-initialisation restarts the head's momentum
            for p in model.head.parameters():
                reset(opt, p)


def zero_buffer(opt, p):
    """What RIFLE does: the buffer stays, zeroed in place."""
    opt.state[p]["momentum_buffer"].zero_()


def pop_buffer(opt, p):
    """What RIFLE once did (torch's fused SGD then raises at the next step)."""
    opt.state.pop(p, None)


def assert_same_weights(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.9, True, 1e-4), (0.9, False, 5e-4), (0.0, False, 1e-4), (0.5, True, 0.0)])
def test_updates_are_bit_identical_to_torch_sgd(momentum, nesterov, wd):
    ours, theirs = net(), net()
    kw = {"lr": 0.05, "momentum": momentum, "weight_decay": wd, "nesterov": nesterov}
    reset = zero_buffer if momentum else pop_buffer  # without momentum there is no buffer
    train(ours, SGD(ours.parameters(), **kw), 8, reset_at=5, reset=reset)
    train(theirs, torch.optim.SGD(theirs.parameters(), **kw), 8, reset_at=5, reset=reset)
    assert_same_weights(ours, theirs)
    assert not torch.equal(ours.head.weight, net().head.weight)  # it trained


def test_state_dicts_cross_between_the_two_and_training_continues_bit_identically():
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    reference = net()
    ref_opt = torch.optim.SGD(reference.parameters(), **kw)
    train(reference, ref_opt, 10)

    # four steps with ours, then torch's optimiser takes over from our state dict ...
    a = net()
    opt_a = SGD(a.parameters(), **kw)
    train(a, opt_a, 4)
    saved = opt_a.state_dict()
    assert set(saved["param_groups"][0]) == set(torch.optim.SGD(net().parameters(), **kw).state_dict()["param_groups"][0])
    assert "momentum_buffer" in saved["state"][0] and len(saved["state"]) == 6  # the unused layer has none
    torch_opt = torch.optim.SGD(a.parameters(), **kw)
    torch_opt.load_state_dict(saved)
    train(a, torch_opt, 3, start=4)
    # ... and back: ours resumes from torch's
    opt_a2 = SGD(a.parameters(), **kw)
    opt_a2.load_state_dict(torch_opt.state_dict())
    train(a, opt_a2, 3, start=7)
    assert_same_weights(a, reference)


def test_a_state_dict_for_other_parameters_is_refused():
    big = SGD(net().parameters(), lr=0.1, momentum=0.9)
    small = SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="doesn't match the size"):
        small.load_state_dict(big.state_dict())


def test_loading_keeps_the_optimisers_own_implementation_flags():
    model = nn.Linear(2, 2)
    cpu_written = SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()
    assert cpu_written["param_groups"][0]["fused"] is None
    fused_like = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    load_optimizer_state(fused_like, cpu_written)
    assert fused_like.param_groups[0]["foreach"] is True


def test_build_sgd_takes_ours_off_cuda():
    opt = build_sgd(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    assert isinstance(opt, SGD)


def test_build_sgd_gives_torchs_fused_sgd_on_the_cpu_when_asked():
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    fused = build_sgd(nn.Linear(2, 2).parameters(), **kw, fused=True)
    assert isinstance(fused, torch.optim.SGD) and fused.param_groups[0]["fused"] is True
    assert isinstance(build_sgd(nn.Linear(2, 2).parameters(), **kw, fused=False), SGD)


def test_zeroing_a_buffer_restarts_momentum_exactly_as_popping_it():
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    zeroed, popped = net(), net()
    train(zeroed, SGD(zeroed.parameters(), **kw), 8, reset_at=2, reset=zero_buffer)
    train(popped, SGD(popped.parameters(), **kw), 8, reset_at=2, reset=pop_buffer)
    assert_same_weights(zeroed, popped)


def test_torchs_fused_sgd_takes_zeroed_buffers_and_refuses_popped_ones():
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    ours, fused = net(), net()
    train(ours, SGD(ours.parameters(), **kw), 8, reset_at=2, reset=zero_buffer)
    train(fused, torch.optim.SGD(fused.parameters(), **kw, fused=True), 8, reset_at=2, reset=zero_buffer)
    for a, b in zip(ours.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="NoneType"):  # why RIFLE zeroes rather than pops
        popped = net()
        train(popped, torch.optim.SGD(popped.parameters(), **kw, fused=True), 8, reset_at=2, reset=pop_buffer)


def channels_last_copy(model: nn.Module) -> nn.Module:
    twin = net()
    twin.load_state_dict(model.state_dict())
    return twin.to(memory_format=torch.channels_last)


@pytest.mark.parametrize("make", [lambda ps, kw: SGD(ps, **kw), lambda ps, kw: torch.optim.SGD(ps, **kw),
                                  lambda ps, kw: torch.optim.SGD(ps, **kw, fused=True)],
                         ids=["ours", "torch", "torch_fused"])
def test_loaded_momentum_buffers_take_their_parameters_layout(make):
    # a checkpoint written on the CPU (contiguous parameters and buffers) resumed where
    # the parameters are channels_last (CUDA by default)
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    written = net()
    opt = SGD(written.parameters(), **kw)
    train(written, opt, 3)
    resumed = channels_last_copy(written)
    conv = resumed.body[0].weight
    assert conv.stride() != written.body[0].weight.stride()  # the layouts do differ
    resumed_opt = make(resumed.parameters(), kw)
    load_optimizer_state(resumed_opt, opt.state_dict())
    for p in resumed.parameters():
        if p in resumed_opt.state:
            assert resumed_opt.state[p]["momentum_buffer"].stride() == p.stride()
    torch.testing.assert_close(resumed_opt.state[conv]["momentum_buffer"], opt.state[written.body[0].weight]["momentum_buffer"],
                               rtol=0, atol=0)


def test_fused_sgd_resumed_into_channels_last_continues_the_run():
    # torch's fused kernel walks parameter, gradient and buffer as flat arrays: a buffer
    # laid out unlike its parameter (what loading alone gives) was measured off by about
    # 1e-2 after one step; with the layouts repaired it follows the contiguous run
    kw = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    reference = net()
    ref_opt = SGD(reference.parameters(), **kw)
    train(reference, ref_opt, 3)
    resumed = channels_last_copy(reference)
    fused = torch.optim.SGD(resumed.parameters(), **kw, fused=True)
    load_optimizer_state(fused, copy.deepcopy(ref_opt.state_dict()))  # as from a file: not the live buffers
    train(reference, ref_opt, 2, start=3)
    train(resumed, fused, 2, start=3)
    for a, b in zip(reference.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_buffer_already_in_its_parameters_layout_is_loaded_as_it_is():
    # a resume on the machine that wrote the checkpoint loads the very tensors torch loads
    model = net()
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, opt, 2)
    saved = opt.state_dict()
    load_optimizer_state(opt, saved)
    for i, p in enumerate(model.parameters()):
        if p in opt.state:
            assert opt.state[p]["momentum_buffer"].data_ptr() == saved["state"][i]["momentum_buffer"].data_ptr()


def test_a_training_process_on_cpu_never_imports_torch_dynamo(cache_dir):
    # torch.optim's optimisers import torch._dynamo (1.1-1.4 s); set-up, steps, a
    # checkpoint and an evaluation of a SMILE run must not
    code = f"""
import sys
from smile_ray.config import make_config
from smile_ray.checkpoint import LoopState, run_state
from smile_ray.recipe import setup, train_step, evaluate
run = setup(make_config({{"method": "smile", "steps": 3, "ema_every": 1}}), {str(cache_dir)!r}, log=lambda m: None)
for step in range(3):
    train_step(run, step, *run.task.train_batch(step, 16))
run_state(run, LoopState(step=3))
evaluate(run, "val")
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                              "SMILE_RAY_CACHE": str(cache_dir)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"

