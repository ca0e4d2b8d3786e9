"""What a CUDA run does differently, run on the CPU where torch allows it: torch's fused
SGD (``build_sgd``'s choice on CUDA) and channels_last parameters (``channels_last:
auto``'s choice on CUDA), for every method; a checkpoint written on the CPU (contiguous
momentum buffers) resumed into channels_last parameters and fused SGD; and the files a
run writes holding host tensors.

torch 2.14's CPU fused SGD is the kernel CUDA's fused SGD mirrors, on the same Python path
(``torch.optim.sgd._fused_sgd``), so the list handling that crashed RIFLE on a GPU and the
flat walk over parameter, gradient and buffer that needs one layout for all three are
exercised here. Each fused run is compared, to a tolerance, with the CPU optimiser's
(:class:`smile_ray.optim.SGD`) on the same channels_last parameters: the optimiser is
what differs. (Channels_last itself is not compared with the contiguous run here: on
this torch's CPU kernels an fp32 channels_last backward through the digits body was
measured about 2 % of the gradient's largest entry away from float64, against 1e-6 for
the contiguous one, so the two layouts drift apart within a few steps for reasons of
torch's CPU kernels, not of this code; CUDA's cuDNN path is another one.)
"""
from __future__ import annotations

import io
import shutil

import pytest
import torch

from conftest import FEW_IL_PAIRS
from smile_ray.config import make_config
from smile_ray.methods.base import unwrap
from smile_ray.optim import SGD, build_sgd
from smile_ray.checkpoint import CheckpointWriter, LoopState, host_copy, read_checkpoint, restore_run, run_state
from smile_ray.recipe import Run, setup, train_step
from smile_ray.registry import METHODS

STEPS = 6
# RIFLE re-initialises its head after steps 2, 3 and 4; RegSL reweights from step 1 and
# relabels from step 2; SMILE's teacher follows the student every step
SMALL = {"steps": STEPS, "eval_every": STEPS, "batch_size": 16, "samples_per_class": 3, "ema_every": 1,
         **FEW_IL_PAIRS}


@pytest.fixture(scope="module")
def cache(cache_dir, tmp_path_factory):
    """The pre-trained source, in a cache of this module's own (LwF's and Co-Tuning's
    preparations are written there once)."""
    path = tmp_path_factory.mktemp("cuda-path-cache")
    for f in cache_dir.glob("source-*"):
        shutil.copy(f, path / f.name)
    return path


def cuda_like(config, cache, fused: bool = True) -> Run:
    """The run as a CUDA device sets it up, on the CPU: channels_last parameters and, with
    ``fused``, torch's fused SGD (``build_sgd``'s choice for CUDA parameters)."""
    run = setup(config.replace(channels_last="true"), cache, log=lambda m: None)
    c = run.config
    run.optimizer = build_sgd(run.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                              nesterov=c.momentum > 0, fused=fused)
    return run


def steps(run: Run, start: int, stop: int) -> None:
    for step in range(start, stop):
        train_step(run, step, *run.to_device(*run.task.train_batch(step, run.config.batch_size)))


def weights(run: Run) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unwrap(run.model).state_dict().items()}


def assert_close_weights(expected: dict, got: dict, start: dict) -> None:
    assert expected.keys() == got.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # not vacuous: the weights moved
    assert max((expected[k] - start[k]).abs().max() for k in start if start[k].is_floating_point()) > 1e-3


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_with_fused_sgd_and_channels_last_follows_the_cpu_optimiser(cache, name):
    config = make_config({**SMALL, "method": name})
    ours, fused = cuda_like(config, cache, fused=False), cuda_like(config, cache)
    assert isinstance(ours.optimizer, SGD) and fused.optimizer.param_groups[0]["fused"] is True
    conv = next(p for p in fused.model.parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    start = weights(ours)
    steps(ours, 0, STEPS)
    steps(fused, 0, STEPS)
    assert_close_weights(weights(ours), weights(fused), start)


def test_a_cpu_checkpoint_resumes_into_channels_last_and_fused_sgd(cache, tmp_path):
    # written on the CPU (contiguous parameters and momentum buffers); resumed where the
    # parameters are channels_last, once with the CPU optimiser (the reference: its
    # element-wise update does not depend on the buffers' layout) and once with fused SGD
    # (whose kernel does). The checkpoint's config says channels_last=auto, which is
    # contiguous on the CPU and channels_last on CUDA, so the resumed runs are turned
    # channels_last after set-up, as setup's model.to(memory_format=...) does on CUDA.
    config = make_config({**SMALL, "method": "smile"})
    first = setup(config, cache, log=lambda m: None)
    start = weights(first)
    steps(first, 0, 3)
    CheckpointWriter(background=False).save(run_state(first, LoopState(step=3, loss_sum=torch.zeros(()))),
                                            tmp_path / "state.pt")
    state = read_checkpoint(tmp_path / "state.pt")
    assert all(b["momentum_buffer"].is_contiguous() for b in state["optimizer"]["state"].values())

    resumed = {}
    for fused in (False, True):
        run = setup(config, cache, log=lambda m: None)
        run.model.to(memory_format=torch.channels_last)
        c = run.config
        run.optimizer = build_sgd(run.model.parameters(), lr=c.lr, momentum=c.momentum,
                                  weight_decay=c.weight_decay, nesterov=True, fused=fused)
        # read afresh, as a resumed process does: a loaded optimiser may train the very
        # tensors of the dict it was given
        restore_run(run, tmp_path / "state.pt")
        for p in run.model.parameters():
            buf = run.optimizer.state[p].get("momentum_buffer")
            assert buf is None or buf.stride() == p.stride()
        steps(run, 3, STEPS)
        resumed[fused] = weights(run)
    assert_close_weights(resumed[False], resumed[True], start)


def saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_host_copies_write_a_cpu_runs_bytes_unchanged_and_keep_the_layout(cache):
    # on CUDA host_copy moves every tensor to the host (what lets model.pt and state.pt
    # load without map_location); on the CPU it must change nothing a file holds
    run = cuda_like(make_config(SMALL), cache)
    steps(run, 0, 2)
    model = unwrap(run.model).state_dict()
    at_once = host_copy(model, copy=False)
    assert type(at_once) is type(model) and at_once._metadata == model._metadata
    assert all(at_once[k].data_ptr() == model[k].data_ptr() for k in model)  # no memory doubled
    assert saved_bytes(at_once) == saved_bytes(model)
    kept = host_copy(model)  # the background writer's: new tensors, the same file
    assert all(kept[k].data_ptr() != model[k].data_ptr() for k in model if model[k].numel())
    assert all(kept[k].stride() == model[k].stride() for k in model)
    assert saved_bytes(kept) == saved_bytes(model)
