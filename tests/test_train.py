"""The training recipe: determinism, checkpoints and resume."""
import json

import pytest
import torch

from smile_ray.config import make_config
from smile_ray.errors import SmileError
from smile_ray.train import expected_calibration_error, train

SHORT = {"steps": 30, "eval_every": 10, "samples_per_class": 3}


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
        train(cfg, tmp_path / "split", cache_dir=cache_dir, report=stop_at_10)
    assert torch.load(tmp_path / "split" / "checkpoint" / "state.pt", weights_only=True)["step"] == 10
    assert not (tmp_path / "split" / "metrics.json").exists()
    seen = []
    resumed = train(cfg, tmp_path / "split", cache_dir=cache_dir, report=lambda m, d: seen.append(m["step"]))
    assert seen == [20, 30]  # steps 1-10 were not run again
    wa, wb = weights(tmp_path / "whole" / "model.pt"), weights(tmp_path / "split" / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ta = torch.load(tmp_path / "whole" / "checkpoint" / "state.pt", weights_only=True)["method"]["teacher"]
    tb = torch.load(tmp_path / "split" / "checkpoint" / "state.pt", weights_only=True)["method"]["teacher"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert resumed["history"] == whole["history"] and resumed["test_acc"] == whole["test_acc"]


def test_report_gets_every_evaluation_and_a_final_record(tmp_path, cache_dir):
    cfg = make_config({**SHORT, "method": "l2"})
    got = []

    def report(metrics, checkpoint_dir):  # the checkpoint on disk is the reported step's
        got.append((metrics, torch.load(f"{checkpoint_dir}/state.pt", weights_only=True)["step"]))

    m = train(cfg, None, cache_dir=cache_dir, report=report)
    assert [g[0]["step"] for g in got] == [10, 20, 30] == [g[1] for g in got]
    assert got[-1][0]["done"] and got[-1][0]["test_acc"] == m["test_acc"]


def test_checkpoint_of_another_config_is_refused(tmp_path, cache_dir):
    cfg = make_config({**SHORT, "steps": 10})
    train(cfg, tmp_path, cache_dir=cache_dir)
    with pytest.raises(SmileError, match="was made with mixup_alpha=0.2, not 0.5"):
        train(cfg.replace(mixup_alpha=0.5), tmp_path, cache_dir=cache_dir)


def test_corrupt_checkpoint_is_refused(tmp_path, cache_dir):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.pt").write_bytes(b"\x00garbage")
    with pytest.raises(SmileError, match="unreadable or corrupt"):
        train(make_config(SHORT), tmp_path, cache_dir=cache_dir)


def test_metrics_json_is_complete(tmp_path, cache_dir):
    cfg = make_config({**SHORT, "method": "mixup"})
    train(cfg, tmp_path, cache_dir=cache_dir)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["method"] == "mixup" and m["config"] == cfg.to_dict() and m["steps"] == 30
    assert 0 <= m["val_acc"] <= 1 and 0 <= m["test_acc"] <= 1 and 0 <= m["test_ece"] <= 1
    assert [h["step"] for h in m["history"]] == [10, 20, 30] and m["seconds"] > 0


def test_expected_calibration_error_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right): bins at 0.9 and 0.6
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]]))
    labels = torch.tensor([0, 1, 1])
    expected = (2 / 3) * abs(0.5 - 0.9) + (1 / 3) * abs(1.0 - 0.6)
    assert expected_calibration_error(logits, labels) == pytest.approx(expected, rel=1e-5)
