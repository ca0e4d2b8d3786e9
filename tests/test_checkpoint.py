"""Files a run leaves (:mod:`smile_ray.checkpoint`): written atomically with the user's
umask, checkpoints read back or refused in one line (another config, a corrupt file,
one older than today's keys), and the lock that keeps two runs off one folder."""
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

from smile_ray.checkpoint import check_same_config, folder_lock, save_torch, write_json
from smile_ray.cli import main
from smile_ray.config import make_config
from smile_ray.errors import SmileError
from smile_ray.recipe import train

SHORT = {"steps": 30, "eval_every": 10, "samples_per_class": 3}


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


def test_a_checkpoint_older_than_the_new_keys_still_resumes(tmp_path):
    new = ("class_fraction", "train_images", "sample_rate", "val_fraction", "data_workers", "skip_bad_images")
    state = {"config": {k: v for k, v in make_config().to_dict().items() if k not in new}}
    check_same_config(state, make_config(), tmp_path / "state.pt")  # missing keys count as their defaults
    check_same_config(state, make_config({"data_workers": 3}), tmp_path / "state.pt")  # changes no batch
    # a checkpoint from before precision/channels_last took "auto" resumes under the new defaults
    legacy = {**state, "config": {**state["config"], "precision": "fp32", "channels_last": False}}
    check_same_config(legacy, make_config(), tmp_path / "state.pt")
    check_same_config(legacy, make_config({"precision": "fp32", "channels_last": False}), tmp_path / "state.pt")
    with pytest.raises(SmileError, match="precision='fp32', not 'bf16'"):
        check_same_config(legacy, make_config({"precision": "bf16"}), tmp_path / "state.pt")
    with pytest.raises(SmileError, match=r"was made with class_fraction=1.0, not 0.5"):
        check_same_config(state, make_config({"class_fraction": 0.5}), tmp_path / "state.pt")


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
