"""One Ray Tune trial = one core run, in the trial's process or on Ray Train workers.

Both kinds report to Tune at every evaluation (metrics and checkpoint) and once more at
the end with the test metrics, so ASHA can stop either early and MLflow gets the same
curve for both. A trial's config is the study's base with the trial's parameters, or
run number ``params["run"]`` of a list of full configs (an ablation's runs).
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ray import tune

from smile_ray.config import make_config
from smile_ray.orchestration.ray_train import scalars, train_distributed
from smile_ray.orchestration.spaces import Resources
from smile_ray.recipe import train

TRIAL_DRIVER_CPU = 0.01  # a trial that launches a TorchTrainer holds (almost) no CPU itself
RUN_DIR = "run"  # a trial's run directory (metrics.json, model.pt) inside its trial directory


def trial_config(params: dict[str, Any], setup: dict[str, Any]) -> dict[str, Any]:
    if "run" in params:
        return setup["runs"][params["run"]]["config"]
    return {**setup["base"], **params}


def run_trial(params: dict[str, Any], setup: dict[str, Any]) -> None:
    """The Tune function trainable."""
    config = make_config(trial_config(params, setup))
    res: Resources = setup["resources"]
    out = Path(tune.get_context().get_trial_dir()) / RUN_DIR
    if res.workers > 1:
        train_distributed(config, out, workers=res.workers, use_gpu=res.gpus > 0,
                          cpus_per_worker=(res.cpus - TRIAL_DRIVER_CPU) / res.workers,
                          cache_dir=setup["cache_dir"], storage_path=str(out / "ray"), report_to_tune=True)
        return

    def on_eval(record: dict[str, Any], checkpoint_dir: Path | None) -> None:
        tune.report(record, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))

    def on_end(metrics: dict[str, Any]) -> None:
        tune.report({**scalars(metrics), "step": metrics["steps"]})

    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext(None) as resume_dir:
        train(config, out, cache_dir=setup["cache_dir"], resume_from=resume_dir, on_eval=on_eval, on_end=on_end,
              log=lambda msg: None)


def trainable(setup: dict[str, Any]):
    """:func:`run_trial` bound to ``setup`` with the resources its trials hold."""
    res: Resources = setup["resources"]
    fn = tune.with_parameters(run_trial, setup=setup)
    if res.workers > 1:
        # The trial only drives its TorchTrainer, whose workers hold the CPUs and GPUs.
        return tune.with_resources(fn, {"cpu": TRIAL_DRIVER_CPU})
    return tune.with_resources(fn, {"cpu": res.cpus, "gpu": res.gpus})
