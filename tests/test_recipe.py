"""The training recipe (:mod:`smile_ray.recipe`): determinism, checkpoints and resume."""
import json
import os
import shutil
from datetime import datetime, timedelta, timezone

import pytest
import torch

from conftest import FEW_IL_PAIRS
from smile_ray.config import make_config
from smile_ray.errors import SmileError
from smile_ray.checkpoint import CheckpointWriter, LoopState, host_copy, read_checkpoint, run_state
from smile_ray.recipe import setup, train, train_step, uses_bf16, uses_channels_last

RUN = {"steps": 30, "eval_every": 10, "samples_per_class": 3}
SHORT = {**RUN, **FEW_IL_PAIRS}


class Interrupt(Exception):
    pass


def weights(path):
    return torch.load(path, weights_only=True)


def test_same_seed_same_metrics_and_weights(tmp_path, cache_dir):
    cfg = make_config({**SHORT, "method": "smile"})
    a = train(cfg, tmp_path / "a", cache_dir=cache_dir)
    b = train(cfg, tmp_path / "b", cache_dir=cache_dir)
    for key in ("val_acc", "test_acc", "test_ece", "history"):
        assert a[key] == b[key]
    wa, wb = weights(tmp_path / "a" / "model.pt"), weights(tmp_path / "b" / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(cfg.replace(seed=7), tmp_path / "c", cache_dir=cache_dir)
    assert c["history"] != a["history"]


def test_resume_from_a_mid_run_checkpoint_matches_an_uninterrupted_run(tmp_path, cache_dir):
    cfg = make_config({**SHORT, "method": "smile", "ema_every": 3})
    whole = train(cfg, tmp_path / "whole", cache_dir=cache_dir)

    def stop_at_10(metrics, checkpoint_dir):
        if metrics["step"] == 10:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "split", cache_dir=cache_dir, on_eval=stop_at_10)
    assert torch.load(tmp_path / "split" / "checkpoint" / "state.pt", weights_only=True)["step"] == 10
    assert not (tmp_path / "split" / "metrics.json").exists()
    seen = []
    resumed = train(cfg, tmp_path / "split", cache_dir=cache_dir, on_eval=lambda m, d: seen.append(m["step"]))
    assert seen == [20, 30]  # steps 1-10 were not run again
    wa, wb = weights(tmp_path / "whole" / "model.pt"), weights(tmp_path / "split" / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ta = torch.load(tmp_path / "whole" / "checkpoint" / "state.pt", weights_only=True)["method"]["teacher"]
    tb = torch.load(tmp_path / "split" / "checkpoint" / "state.pt", weights_only=True)["method"]["teacher"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert resumed["history"] == whole["history"] and resumed["test_acc"] == whole["test_acc"]


def test_checkpoints_apart_from_evaluations_resume_bit_identical_from_a_step_between_them(tmp_path, cache_dir):
    cfg = make_config({**SHORT, "method": "smile", "ema_every": 3, "checkpoint_every": 7})
    whole = train(cfg, tmp_path / "whole", cache_dir=cache_dir)
    handed = []

    def stop_at_20(record, checkpoint_dir):
        handed.append((record["step"], record.get("checkpoint_step"), read_checkpoint(checkpoint_dir / "state.pt")["step"]))
        if record["step"] == 20:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "split", cache_dir=cache_dir, on_eval=stop_at_20)
    assert handed == [(10, 7, 7), (20, 14, 14)]  # checkpoints at 7, 14 (and 21, 28, 30), evaluations at 10, 20, 30
    saved = read_checkpoint(tmp_path / "split" / "checkpoint" / "state.pt")
    assert saved["step"] == 14 and saved["train_loss_steps"] == 4  # between evaluations: steps 11-14's losses
    assert [p.name for p in (tmp_path / "split" / "checkpoint").iterdir()] == ["state.pt"]
    resumed = train(cfg, tmp_path / "split", cache_dir=cache_dir)
    assert resumed["resumed_from"] == [14]
    wa, wb = weights(tmp_path / "whole" / "model.pt"), weights(tmp_path / "split" / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the curve too: step 20's train_loss averages steps 11-20 across the interruption
    assert resumed["history"] == whole["history"] and resumed["test_acc"] == whole["test_acc"]
    # and where the checkpoints fall does not change what is trained
    default = train(cfg.replace(checkpoint_every=0), tmp_path / "default", cache_dir=cache_dir)
    wd = weights(tmp_path / "default" / "model.pt")
    assert all(torch.equal(wa[k], wd[k]) for k in wa) and default["history"] == whole["history"]


def test_hooks_get_every_evaluation_with_the_newest_earlier_checkpoint_and_the_final_metrics(tmp_path, cache_dir):
    cfg = make_config({**SHORT, "method": "l2"})
    got, ended = [], []

    def on_eval(record, checkpoint_dir):  # the directory holds the complete checkpoint the record names
        step = read_checkpoint(checkpoint_dir / "state.pt")["step"] if checkpoint_dir else None
        files = sorted(p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir else None
        got.append((record["step"], record.get("checkpoint_step"), step, files))
        assert {"train_loss", "val_acc", "val_ece", "lr"} <= set(record)

    m = train(cfg, None, cache_dir=cache_dir, checkpoint_dir=tmp_path / "ck", on_eval=on_eval, on_end=ended.append)
    # written in the background: an evaluation gets the checkpoint of an earlier step (the
    # first none), never the one just started; the last waits for the final one
    assert got == [(10, None, None, None), (20, 10, 10, ["state.pt"]), (30, 30, 30, ["state.pt"])]
    assert ended == [m] and "test_acc" in m and "done" not in m
    assert not (tmp_path / "metrics.json").exists()  # no output_dir: only the checkpoint is written
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["state.pt"]  # the handed-on copies are gone
    assert read_checkpoint(tmp_path / "ck" / "state.pt")["step"] == 30


def test_a_run_with_no_directory_writes_nothing(tmp_path, cache_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []
    train(make_config({**SHORT, "steps": 10}), None, cache_dir=cache_dir, on_eval=lambda r, d: seen.append(d))
    assert seen == [None] and list(tmp_path.iterdir()) == []


def test_learning_rate_drops_where_the_reference_drops():
    from smile_ray.recipe import learning_rate

    assert make_config({"steps": 9000}).resolved_lr_decay_step == 6666  # int(2 * (9000 + 1000) / 3)
    cfg = make_config({"steps": 300})
    assert cfg.resolved_lr_decay_step == 222
    assert learning_rate(cfg, 221) == pytest.approx(0.01) and learning_rate(cfg, 222) == pytest.approx(0.001)
    assert make_config({"steps": 300, "lr_decay_step": 100}).resolved_lr_decay_step == 100
    assert learning_rate(make_config({"steps": 300, "lr_decay_step": 300}), 299) == pytest.approx(0.01)


def test_the_public_api_can_be_called_again(tmp_path, cache_dir):
    import smile_ray

    cfg = smile_ray.make_config({**SHORT, "steps": 10, "method": "l2"})
    a = smile_ray.train(cfg, tmp_path / "a", cache_dir=cache_dir)
    b = smile_ray.train(cfg, tmp_path / "b", cache_dir=cache_dir)
    assert callable(smile_ray.train) and a["history"] == b["history"]


def test_metrics_json_is_complete(tmp_path, cache_dir):
    cfg = make_config({**RUN, "method": "mixup"})  # the interpolation losses at their default
    before = datetime.now(timezone.utc)
    train(cfg, tmp_path, cache_dir=cache_dir)
    after = datetime.now(timezone.utc)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["method"] == "mixup" and m["config"] == cfg.to_dict() and m["steps"] == 30
    # when the run started and finished: UTC, in order, around the call, and at least the loop apart
    started, finished = datetime.fromisoformat(m["started_at"]), datetime.fromisoformat(m["finished_at"])
    assert started.utcoffset() == finished.utcoffset() == timedelta(0)
    assert before - timedelta(milliseconds=1) <= started <= finished <= after
    assert (finished - started).total_seconds() >= m["seconds"] - 0.002
    assert 0 <= m["val_acc"] <= 1 and 0 <= m["test_acc"] <= 1 and 0 <= m["test_ece"] <= 1
    assert [h["step"] for h in m["history"]] == [10, 20, 30] and m["seconds"] > 0
    # the paper's interpolation losses and the test split's reliability bins
    assert all(m[k] > 0 for k in ("label_il_train", "label_il_test", "feature_il_train", "feature_il_test"))
    assert m["interpolation"]["pairs"] == 256 and m["interpolation"]["lambdas"] == [0.25, 0.5, 0.75]
    rel = m["reliability"]
    assert rel["bins"] == 15 and sum(rel["count"]) == m["split_sizes"]["test"]
    n = sum(rel["count"])
    ece = sum(k / n * abs(a - c) for k, a, c in zip(rel["count"], rel["accuracy"], rel["confidence"]) if k)
    assert ece == pytest.approx(m["test_ece"], abs=1e-5)


def test_il_pairs_sets_the_interpolation_losses_pairs_and_zero_skips_them(tmp_path, cache_dir):
    few = train(make_config({**SHORT, "steps": 10, "method": "l2", "il_pairs": 8}), tmp_path / "a", cache_dir=cache_dir)
    assert few["interpolation"]["pairs"] == 8 and few["label_il_test"] > 0
    none = train(make_config({**SHORT, "steps": 10, "method": "l2", "il_pairs": 0}), tmp_path / "b", cache_dir=cache_dir)
    assert "interpolation" not in none and not any(k in none for k in ("label_il_train", "feature_il_test"))
    assert none["history"] == few["history"]  # a measurement after training, nothing else


def test_threads_are_set_and_recorded(tmp_path, cache_dir):
    before = torch.get_num_threads()
    try:
        m = train(make_config({**SHORT, "steps": 10, "method": "l2", "threads": 1}), tmp_path, cache_dir=cache_dir)
        assert m["threads"] == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_threads_zero_follow_the_cpus_this_process_may_use(tmp_path, cache_dir, monkeypatch):
    """threads: 0 is the process's CPU share (affinity, Ray's reservation), set by the run,
    not whatever count torch happened to hold (here 2: the run took 2 threads on 1 CPU)."""
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        m = train(make_config({**SHORT, "steps": 2, "eval_every": 2, "method": "l2"}), tmp_path, cache_dir=cache_dir)
        assert m["threads"] == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_a_background_checkpoint_holds_its_steps_state_while_training_goes_on(tmp_path, cache_dir):
    run = setup(make_config({**SHORT, "method": "smile", "ema_every": 1}), cache_dir, log=lambda m: None)
    train_step(run, 0, *run.task.train_batch(0, 48))
    loop = LoopState(step=1, history=[{"step": 1}], seconds=2.0, loss_sum=torch.zeros(()))
    before = host_copy(run_state(run, loop))
    writer = CheckpointWriter(background=True)
    writer.save(run_state(run, loop), tmp_path / "state.pt")
    train_step(run, 1, *run.task.train_batch(1, 48))  # weights, momentum and teacher move on at once
    writer.close()
    saved = read_checkpoint(tmp_path / "state.pt")
    for part in ("model", "method", "optimizer", "torch_rng", "history", "step", "config"):
        assert same(saved[part], before[part]), part
    now = run.model.state_dict()
    assert not all(torch.equal(now[k], saved["model"][k]) for k in now)  # so the copy was needed


def test_runs_with_and_without_hooks_write_the_same_checkpoint(tmp_path, cache_dir):
    # both in the background: without hooks straight to state.pt, with them through the
    # handed-on step directories
    cfg = make_config({**SHORT, "method": "smile"})
    train(cfg, tmp_path / "background", cache_dir=cache_dir)
    train(cfg, tmp_path / "at_once", cache_dir=cache_dir, on_eval=lambda r, d: None)
    a = read_checkpoint(tmp_path / "background" / "checkpoint" / "state.pt")
    b = read_checkpoint(tmp_path / "at_once" / "checkpoint" / "state.pt")
    assert a["step"] == b["step"] == 30
    # (torch_rng is the process's global generator, which the runs' keyed draws never use)
    for part in ("model", "method", "optimizer", "history"):
        assert same(a[part], b[part]), part
    assert not list((tmp_path / "background" / "checkpoint").glob(".*.tmp"))
    assert [p.name for p in (tmp_path / "at_once" / "checkpoint").iterdir()] == ["state.pt"]


def test_bf16_and_channels_last_are_on_for_cuda_only_under_auto():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = make_config()
    assert uses_channels_last(auto, cuda)  # uses_bf16(auto, cuda) asks the GPU: see the next test
    assert not uses_bf16(auto, cpu) and not uses_channels_last(auto, cpu)
    forced = make_config({"precision": "bf16", "channels_last": True})
    assert uses_bf16(forced, cpu) and uses_channels_last(forced, cpu)
    off = make_config({"precision": "fp32", "channels_last": False})
    assert not uses_bf16(off, cuda) and not uses_channels_last(off, cuda)


def test_auto_precision_is_bf16_only_on_gpus_that_compute_in_it_natively():
    from smile_ray.recipe import bf16_autocast

    assert bf16_autocast("auto", "cuda", (8, 0)) and bf16_autocast("auto", "cuda", (9, 0))  # A100, H100
    assert not bf16_autocast("auto", "cuda", (7, 5)) and not bf16_autocast("auto", "cuda", (7, 0))  # T4, V100
    assert not bf16_autocast("auto", "cpu") and not bf16_autocast("auto", "cuda", None)
    assert bf16_autocast("bf16", "cpu") and bf16_autocast("bf16", "cuda", (7, 0))  # asked for: honoured
    assert not bf16_autocast("fp32", "cuda", (9, 0))


def test_process_cpus_follow_the_reservation_ray_sets(monkeypatch):
    import os

    from smile_ray.cpus import process_cpus

    affinity = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert process_cpus() == affinity
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a one-CPU Ray worker on a node of many
    assert process_cpus() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(affinity + 8))  # a cap, never more than the affinity allows
    assert process_cpus() == affinity
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")  # nested levels: not a reservation
    assert process_cpus() == affinity
    assert process_cpus(threads=1) == 1


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_run_matches_the_eager_one_in_one_process_and_under_ddp(tmp_path, cache_dir, monkeypatch):
    import torch._inductor.config as inductor_config
    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from torch.nn.parallel import DistributedDataParallel

    from smile_ray.methods import unwrap

    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets in a one-CPU worker
    cfg = make_config({**SHORT, "method": "smile", "steps": 4, "eval_every": 2, "ema_every": 1})
    eager = train(cfg, tmp_path / "eager", cache_dir=cache_dir)
    torch._dynamo.reset()  # count this run's graphs alone: no cache entries from an earlier test's compiles
    counters.clear()
    compiled = train(cfg.replace(compile=True), tmp_path / "compiled", cache_dir=cache_dir)
    # the student's training step and SMILE's teacher, one graph each: evaluation and the
    # interpolation losses run the eager student, so they compile nothing more
    assert counters["stats"]["unique_graphs"] == 2
    assert inductor_config.compile_threads == 1  # the worker's CPU share, not the node's cores
    for a, b in zip(eager["history"], compiled["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert compiled["val_acc"] == pytest.approx(eager["val_acc"], abs=0.01)
    # the student inside the compiled wrapper is the eager one: its names are the eager
    # model's, so either run resumes the other
    we, wc = weights(tmp_path / "eager" / "model.pt"), weights(tmp_path / "compiled" / "model.pt")
    assert we.keys() == wc.keys()

    # DDP first, then compile (gloo, one process): the wrapper is compiled, the student inside stays eager
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        run = setup(cfg.replace(compile=True), cache_dir, prepare_model=DistributedDataParallel, log=lambda m: None)
        assert isinstance(run.model, DistributedDataParallel) and run.model._compiled_call_impl is not None
        assert unwrap(run.model)._compiled_call_impl is None
        torch._dynamo.reset()
        counters.clear()
        ddp = train(cfg.replace(compile=True), tmp_path / "ddp", cache_dir=cache_dir,
                    prepare_model=DistributedDataParallel)
        assert counters["stats"]["unique_graphs"] == 2
    finally:
        dist.destroy_process_group()
    for a, b in zip(eager["history"], ddp["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert weights(tmp_path / "ddp" / "model.pt").keys() == we.keys()


def test_a_failing_compile_is_one_line_naming_the_key(tmp_path, cache_dir, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/g++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)  # compile for real, not from an earlier run's cache
    cfg = make_config({**SHORT, "method": "l2", "steps": 2, "eval_every": 1, "compile": True})
    with pytest.raises(SmileError) as e:
        train(cfg, tmp_path / "run", cache_dir=cache_dir)
    msg = str(e.value)
    assert msg.startswith("compile=true: torch.compile failed (") and "compile=false" in msg and "\n" not in msg
    assert not (tmp_path / "run" / "metrics.json").exists()
