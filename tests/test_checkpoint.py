"""Files a run leaves (:mod:`smile_ray.checkpoint`): written atomically with the user's
umask, checkpoints read back or refused in one line (another config, a corrupt file,
one of an earlier version), and the lock that keeps two runs off one folder."""
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

from conftest import FEW_IL_PAIRS
from smile_ray.checkpoint import (CheckpointWriter, LoopState, check_same_config, folder_lock, read_checkpoint,
                                  restore_run, run_state, save_torch, write_json)
from smile_ray.cli import main
from smile_ray.config import make_config
from smile_ray.errors import SmileError
from smile_ray.recipe import setup, train, train_step

CONFIG = {"method": "smile", "steps": 6, "eval_every": 3, "samples_per_class": 3, "ema_every": 1, **FEW_IL_PAIRS}
SHORT = {"steps": 30, "eval_every": 10, "samples_per_class": 3, **FEW_IL_PAIRS}


def run_cli(capfd, *argv):
    code = main(list(argv))
    return code, capfd.readouterr().err


def test_files_are_written_with_the_users_umask_not_owner_only(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    write_json({"a": 1}, tmp_path / "metrics.json")
    save_torch({"b": torch.zeros(1)}, tmp_path / "model.pt")
    for f in ("metrics.json", "model.pt"):  # readable by others as open() would make them (mkstemp: 0600)
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o666 & ~mask


def test_checkpoint_of_another_config_is_refused(tmp_path, cache_dir):
    cfg = make_config({**SHORT, "steps": 10})
    train(cfg, tmp_path, cache_dir=cache_dir)
    with pytest.raises(SmileError, match="was made with mixup_alpha=0.2, not 0.5; start afresh in another output "
                       "directory, or add --overwrite to replace this run"):
        train(cfg.replace(mixup_alpha=0.5), tmp_path, cache_dir=cache_dir)


def test_corrupt_checkpoint_is_refused(tmp_path, cache_dir):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"\x00garbage")
    with pytest.raises(SmileError, match="unreadable or corrupt"):
        train(make_config(SHORT), tmp_path, cache_dir=cache_dir)


def test_a_checkpoint_resumes_only_under_its_own_subset(tmp_path):
    state = {"config": make_config().to_dict()}
    check_same_config(state, make_config({"data_workers": 3}), tmp_path / "state.pt")  # changes no batch
    with pytest.raises(SmileError, match=r"was made with class_fraction=1.0, not 0.5"):
        check_same_config(state, make_config({"class_fraction": 0.5}), tmp_path / "state.pt")
    # a checkpoint of an earlier version, without a key, is refused (no defaults filled in)
    older = {"config": {k: v for k, v in state["config"].items() if k != "sample_rate"}}
    with pytest.raises(SmileError, match=r"was made with sample_rate=None, not 0.0"):
        check_same_config(older, make_config(), tmp_path / "state.pt")


def test_a_second_train_on_a_held_output_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, capfd, cache_dir):
    """Two trains on one --output both ran and the last writer won; now the second is
    refused while the first holds the folder, and a holder killed with SIGKILL (no
    clean-up at all) leaves the folder free."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom smile_ray.checkpoint import folder_lock\n"
         "with folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(300)\n", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, err = run_cli(capfd, "train", "--output", str(out), "--cache-dir", str(cache_dir), "--quiet")
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"error: --output {out} is in use by another run (pid {holder.pid} on "), err
        assert sorted(p.name for p in out.iterdir()) == [".smile-ray.lock"]  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with folder_lock(out):  # free again
        pass
    with folder_lock(tmp_path / "new"):  # a folder the lock made and nothing used is removed again
        assert (tmp_path / "new").is_dir()
    assert not (tmp_path / "new").exists()


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
