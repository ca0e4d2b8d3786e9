"""A set of trials under Ray Tune, tracked in MLflow (a parent run and a child per
trial), resumable: the Tune experiment of a study
(:class:`~smile_ray.orchestration.study.StudyRun` opens and closes the study around it).

The caller validates everything and opens the MLflow parent first; :func:`run_trials`
then runs (or, with ``resume``, restores) the Tune experiment ``<root>/tune`` and leaves
the parent and every child in a final state whatever happens: FINISHED is the caller's
to set once its outputs are written, KILLED on an interrupt, FAILED on an error.

``root`` is the study's storage (:mod:`smile_ray.orchestration.storage`): its output
folder on one machine, ``<--storage>/<output name>`` on a cluster; the runs' metrics
come home to the output folder once the trials have ended.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray import tune

from smile_ray.errors import SmileError
from smile_ray.interrupts import resend_lost_interrupts
from smile_ray.orchestration import storage
from smile_ray.orchestration.progress import TrialTable
from smile_ray.orchestration.tracking import StudyLogger
from smile_ray.orchestration.trainable import TrialSetup, trainable

EXPERIMENT_DIR = "tune"
NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"
#: Tune's own Ctrl-C handler is off (:func:`interrupts_to_tune`): ours notes the interrupt
#: and hands it to Tune's graceful stop, which Tune keeps on SIGUSR1
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"
#: a finished trial's process runs the next trial that asks for the same resources, so
#: only the first trial of each concurrent slot pays the fresh process and its imports
#: (torch, torch._dynamo, the core: 3-5 s here; ``benchmarks/tune_overhead.py``)
REUSE_ACTORS = True


def can_resume(root: str | Path, experiment_dir: str = EXPERIMENT_DIR) -> bool:
    try:
        return tune.Tuner.can_restore(storage.join(str(root), experiment_dir))
    except OSError as e:  # storage out of reach
        raise SmileError(f"--resume: cannot read the study's storage {root}: {str(e).splitlines()[0]}") from None


@contextmanager
def interrupts_to_tune():
    """While Tune fits: the first Ctrl-C is noted and handed to Tune's graceful stop (it
    saves the experiment and returns), a second one stops at once. Yields a list that
    holds the signal number once an interrupt came.

    Why not Tune's own handler: after Tune's graceful stop the trials that were running
    come back TERMINATED, like finished ones, so when no trial was left waiting (Ctrl-C
    in the last batch) the returned results look like a finished study. Whether the user
    interrupted is a fact we note ourselves. Tune stops gracefully on SIGUSR1 too, with
    the same handler; ours calls that handler.

    A Ctrl-C that lands inside a weakref callback or a finaliser, where Python cannot
    raise it, is sent to the main thread again
    (:func:`~smile_ray.interrupts.resend_lost_interrupts`)."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got  # signals reach only the main thread; Tune installs nothing here either
        return

    def on_interrupt(signum, frame):
        if got:
            raise KeyboardInterrupt
        got.append(signum)
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if not callable(tune_stop):  # Tune's loop has not started (or has ended): stop at once
            raise KeyboardInterrupt
        tune_stop(signum, frame)

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
    saved_env = os.environ.get(TUNE_SIGINT_ENV)
    os.environ[TUNE_SIGINT_ENV] = "1"
    signal.signal(signal.SIGINT, on_interrupt)
    try:
        with resend_lost_interrupts():
            yield got
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if saved_env is None:
            os.environ.pop(TUNE_SIGINT_ENV, None)
        else:
            os.environ[TUNE_SIGINT_ENV] = saved_env


def run_trials(
    out: Path,
    setup: TrialSetup,
    param_space: dict[str, Any],
    logger: StudyLogger,
    *,
    tune_config: tune.TuneConfig | None = None,
    resume: bool = False,
    experiment_dir: str = EXPERIMENT_DIR,
    expected: int,
    table: TrialTable | None = None,
    root: str | None = None,
):
    """Fit (or restore and finish) the experiment ``out/experiment_dir``; returns Tune's ResultGrid once every
    one of its ``expected`` trials has ended. An interrupted fit, at any moment (the last
    trials running included), marks the open child runs and the parent KILLED and raises
    KeyboardInterrupt; Tune has saved the experiment, so ``--resume`` continues it.
    Ray Tune's own console table is off; ``table`` prints a row per ended trial instead."""
    client, parent_id = logger.client, logger.parent_run_id
    root = root or str(out)
    experiment = storage.join(root, experiment_dir)
    fn = trainable(setup.at(experiment))
    # Tune's newer console output prints its experiment box and paths on stdout even at
    # verbose=0; the older engine at verbose=0 prints nothing, leaving stdout to the
    # results and stderr to ``table``. Set for the fit only: the caller's environment is
    # left as it was.
    saved_output = os.environ.get(NEW_OUTPUT_ENV)
    os.environ[NEW_OUTPUT_ENV] = "0"
    tune_config = dataclasses.replace(tune_config or tune.TuneConfig(), reuse_actors=REUSE_ACTORS)
    try:
        if resume:
            tuner = tune.Tuner.restore(experiment, fn, resume_errored=True, param_space=param_space)
        else:
            tuner = tune.Tuner(
                fn,
                param_space=param_space,
                tune_config=tune_config,
                run_config=tune.RunConfig(
                    name=experiment_dir, storage_path=root, callbacks=[logger] + ([table] if table else []), verbose=0,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    failure_config=tune.FailureConfig(max_failures=1),
                ),
            )
        with interrupts_to_tune() as interrupted:
            results = tuner.fit()
    except KeyboardInterrupt:
        logger.close_open_runs("KILLED")
        client.set_terminated(parent_id, status="KILLED")
        raise
    except BaseException:
        logger.close_open_runs("FAILED")
        client.set_terminated(parent_id, status="FAILED")
        raise
    finally:
        if saved_output is None:
            os.environ.pop(NEW_OUTPUT_ENV, None)
        else:
            os.environ[NEW_OUTPUT_ENV] = saved_output
    if interrupted or results.num_terminated + results.num_errors < len(results) or len(results) < expected:
        # Tune stopped on Ctrl-C, saved the experiment and returned: that is an interrupt.
        logger.close_open_runs("KILLED")
        client.set_terminated(parent_id, status="KILLED")
        raise KeyboardInterrupt
    storage.bring_home(experiment, out / experiment_dir)
    return results
