"""A run's checkpoint (smile_ray.checkpoint): what it holds of the loop, and a restore."""
import pytest
import torch

from smile_ray.checkpoint import CheckpointWriter, LoopState, read_checkpoint, restore_run, run_state
from smile_ray.config import make_config
from smile_ray.errors import SmileError
from smile_ray.recipe import setup, train_step

CONFIG = {"method": "smile", "steps": 6, "eval_every": 3, "samples_per_class": 3, "ema_every": 1}


def test_a_restored_run_stands_where_the_saved_loop_stood(tmp_path, cache_dir):
    run = setup(make_config(CONFIG), cache_dir, log=lambda m: None)
    loop = LoopState(history=[{"step": 0}], resumed_from=[1], loss_sum=torch.zeros(()))
    for step in range(3):
        loop.add_step(train_step(run, step, *run.task.train_batch(step, 48)))
    CheckpointWriter(background=False).save(run_state(run, loop, seconds=5.0), tmp_path / "state.pt")

    other = setup(make_config(CONFIG), cache_dir, log=lambda m: None)
    back = restore_run(other, tmp_path / "state.pt")
    assert (back.step, back.history, back.seconds, back.resumed_from) == (3, [{"step": 0}], 5.0, [1, 3])
    assert torch.equal(back.loss_sum, loop.loss_sum) and back.loss_steps == 3  # the partial train_loss
    now, restored = run.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(now[k], restored[k]) for k in now)
    assert all(torch.equal(a, b) for a, b in zip(run.method.rank_state(), other.method.rank_state()))


def test_another_config_or_an_earlier_versions_file_is_refused(tmp_path, cache_dir):
    run = setup(make_config(CONFIG), cache_dir, log=lambda m: None)
    CheckpointWriter(background=False).save(run_state(run, LoopState(loss_sum=torch.zeros(()))), tmp_path / "a.pt")
    other = setup(make_config({**CONFIG, "lr": 0.02}), cache_dir, log=lambda m: None)
    with pytest.raises(SmileError, match=r"was made with lr=0.01, not 0.02"):
        restore_run(other, tmp_path / "a.pt")
    state = read_checkpoint(tmp_path / "a.pt")
    del state["train_loss_sum"]  # the loop's partial sum: absent from the first versions' files
    torch.save(state, tmp_path / "b.pt")
    with pytest.raises(SmileError, match="is not a smile-ray checkpoint"):
        read_checkpoint(tmp_path / "b.pt")
