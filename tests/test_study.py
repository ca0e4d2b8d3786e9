"""The scaffold tune, ablate and compare share (smile_ray/orchestration/study.py): the
refusal of a used folder, the resume of nothing, and one way for a trial's parameters
to become its config, read alike by the trainable and the MLflow logger."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from smile_ray.config import make_config
from smile_ray.errors import SmileError
from smile_ray.orchestration import tracking
from smile_ray.orchestration.spaces import Resources
from smile_ray.orchestration.study import StudyRun
from smile_ray.orchestration.trainable import TrialSetup

KINDS = [("study", "study.json", ("tune",)), ("ablation", "ablation.json", ("ablation.json", "ablation.parquet")),
         ("comparison", "compare.json", ("compare.json", "results.parquet"))]


@pytest.mark.parametrize("kind, state, holds", KINDS)
def test_a_folder_holding_a_study_is_refused_and_resuming_nothing_is_one_line(tmp_path, kind, state, holds):
    out = tmp_path / "out"
    (out / holds[-1]).mkdir(parents=True)
    article = "an" if kind == "ablation" else "a"
    with pytest.raises(SmileError, match=f"already holds {article} {kind}; use --resume, or another --output"):
        StudyRun(out, kind=kind, state_name=state, holds=holds)
    with pytest.raises(SmileError, match=f"--resume: .* holds no {kind} to resume"):
        StudyRun(tmp_path / "empty", kind=kind, state_name=state, holds=holds, resume=True)
    assert not (tmp_path / "empty").exists()  # nothing is made before the inputs are checked


def test_a_resumed_study_takes_its_tracking_and_storage_from_its_state_file(tmp_path):
    out = tmp_path / "out"
    (out / "tune" / "x").mkdir(parents=True)
    (out / "tune" / "tuner.pkl").write_bytes(b"")  # what Tune's can_restore looks for
    (out / "study.json").write_text(json.dumps({"tracking_uri": "sqlite:///saved.db", "experiment": "saved",
                                                "storage": None, "storage_root": str(out)}))
    run = StudyRun(out, kind="study", state_name="study.json", holds=("tune",), resume=True,
                   tracking_uri="sqlite:///given.db", experiment="given")
    assert (run._uri, run._experiment, run._root) == ("sqlite:///saved.db", "saved", str(out))


def test_a_trials_config_and_tags_are_one_reading_for_the_trainable_and_mlflow(tmp_path):
    base = make_config({"steps": 5}).to_dict()
    tuning = TrialSetup(Resources(), base=base)
    assert tuning.config_for({"mixup_alpha": 0.3}) == {**base, "mixup_alpha": 0.3} and tuning.tags_for({}) == {}
    runs = [{"config": {**base, "seed": s}, "tags": {"arm": "full", "seed": s}} for s in range(2)]
    arms = TrialSetup(Resources(), runs=runs)
    assert arms.config_for({"run": 1}) == runs[1]["config"]
    assert arms.tags_for({"run": 1}) == {"arm": "full", "seed": "1"}
    assert arms.at("/x").experiment_path == "/x" and arms.experiment_path == ""  # frozen: a copy

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.connect(uri)
    exp = tracking.experiment_id(client, "setup", uri)
    parent = client.create_run(exp).info.run_id
    logger = tracking.StudyLogger(uri, exp, parent, "abl", arms)
    logger.on_trial_start(0, [], SimpleNamespace(trial_id="t1", config={"run": 1}))
    (child,) = logger.children()
    assert child.data.params["seed"] == "1" and child.data.params["steps"] == "5"
    assert child.data.tags["arm"] == "full" and child.data.tags["seed"] == "1"
    assert child.info.run_name == "abl-full-s1-t1"
