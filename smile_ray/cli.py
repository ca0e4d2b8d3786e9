"""The ``smile-ray`` command line: parse, call one library function, print.

Every user error surfaces as a :class:`~smile_ray.errors.SmileError` (or a click usage
error) and is printed as one line on stderr with a non-zero exit; tracebacks are kept for
bugs.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click
import yaml

from smile_ray import api
from smile_ray.config import KEYS, Config, preset_names, resolve_config, shipped_names
from smile_ray.errors import SmileError
from smile_ray.interrupts import resend_lost_interrupts
from smile_ray.registry import DATASETS, METHODS


def _keys_help() -> str:
    width = max(map(len, KEYS))
    lines = ["\b", "Config keys (for --set KEY=VALUE and --config files; defaults in brackets):"]
    for name, f in KEYS.items():
        default = f.default
        shown = f"{default:.4g}" if isinstance(default, float) else str(default).lower() if isinstance(default, bool) else default
        lines.append(f"  {name:<{width}}  {f.metadata['help']} [{shown}]")
    return "\n".join(lines)


config_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
    help="YAML/JSON file of config keys (a metrics.json or best.json too), or a shipped preset: "
    + ", ".join(preset_names()) + ".",
)
def set_option(after: str):
    return click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help=f"Override one config key (repeatable); applied after {after}.",
    )


STORAGE_HELP = ("Where runs keep their files on a cluster of several nodes: s3://bucket/prefix, gs://..., or a "
                "folder mounted at the same path on every node. Needed there (refused without it); the study's "
                "tables stay in --output, each run's metrics.json comes home beside them, models and checkpoints "
                "stay in storage. [none: everything under --output, for one machine]")
ADDRESS_HELP = "Ray cluster to join ('auto', host:port or ray://host:port) [start a local Ray]."
cache_option = click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                            help="Where pre-trained source models are cached [$SMILE_RAY_CACHE or ~/.cache/smile-ray].")


def options(*decorators):
    """Several click options as one decorator (a group that commands share)."""
    def apply(f):
        for decorator in reversed(decorators):
            f = decorator(f)
        return f
    return apply


#: where a study or a Ray Train run runs: the cluster to join and the storage its nodes share
cluster_options = options(click.option("--address", help=ADDRESS_HELP),
                          click.option("--storage", metavar="URI", help=STORAGE_HELP))


def tracking_options(uri_help: str = "MLflow tracking URI, e.g. http://host:5000 [sqlite:///$PWD/mlflow.db].",
                     experiment_help: str = "MLflow experiment name [smile-ray-DATASET]."):
    """``--tracking-uri`` and ``--experiment``: where MLflow records the work."""
    return options(click.option("--tracking-uri", help=uri_help), click.option("--experiment", help=experiment_help))


def resume_options(kind: str, default: str):
    """``--output`` and ``--resume`` of a study command (``kind``: study, ablation, comparison)."""
    return options(
        click.option("--output", type=click.Path(file_okay=False, path_type=Path),
                     help=f"Output directory [{default}]."),
        click.option("--resume", is_flag=True, help=f"Continue the interrupted {kind} in --output with its saved "
                     "settings; finished runs are kept."))


def study_options(kind: str, default: str):
    """What every study command takes besides its own options: --output and --resume,
    the cluster, the tracking, the source-model cache, bare KEY=VALUE overrides,
    --quiet and --log-level. The command passes the first four groups on to the library
    untouched (its ``**study``: output, resume, address, storage, tracking_uri,
    experiment, cache_dir)."""
    return options(resume_options(kind, default), cluster_options, tracking_options(), cache_option,
                   assignments_argument, common_options)


#: ``--seeds`` of ablate and compare: one option, K or auto (compare refuses auto in one line)
seeds_option = click.option(
    "--seeds", metavar="K|auto",
    help="Seeds per cell, 0..K-1, shared by every arm or method [the file's seeds]; auto (ablate only): rounds of "
    "the file's seeds, adding seeds to the arms whose 95 % interval still contains zero, up to --max-seeds.")

LOG_LEVELS = ("debug", "info", "warning", "error")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (click's test runner and
    Ray swap it), not to the stream of the moment the handler was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _set_log_level(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--log-level``: the level of smile-ray's own log records (logger ``smile_ray``) and
    the one handler that prints them on stderr. The CLI owns its process, so this is where
    logging is configured; the library itself never configures logging."""
    logger = logging.getLogger("smile_ray")
    logger.setLevel(value.upper())
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    return value


def common_options(f):
    """``--quiet`` and ``--log-level``, on every command."""
    f = click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), default="warning",
                     show_default=True, expose_value=False, callback=_set_log_level,
                     help="Level of smile-ray's own log messages on stderr (Ray's and MLflow's keep theirs).")(f)
    return click.option("--quiet", is_flag=True,
                        help="No progress bar or live trial table: only the result lines and errors.")(f)


def assignments_argument(f):
    """Bare ``KEY=VALUE`` arguments beside ``--set KEY=VALUE`` (as Hydra and torchtune
    take them); applied after the ``--set`` ones."""
    return click.argument("assignments", nargs=-1, metavar="[KEY=VALUE]...")(f)


def all_overrides(overrides: tuple[str, ...], assignments: tuple[str, ...]) -> tuple[str, ...]:
    """``--set`` pairs, then the bare ``KEY=VALUE`` arguments; a bare argument without
    ``=`` is not an override and fails naming it."""
    for word in assignments:
        key, sep, _ = word.partition("=")
        if not sep or not key.strip():
            raise SmileError(f"unexpected argument {word!r}: config overrides are KEY=VALUE (or --set KEY=VALUE)")
    return tuple(overrides) + tuple(assignments)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="smile-ray")
def cli() -> None:
    """smile-ray: fine-tune pre-trained CNNs with SMILE (sample-to-feature mixup).

    Everything runs on the embedded digits benchmark by default (no download).
    """


@cli.command(epilog=_keys_help())
@click.option("--method", help=f"Fine-tuning method: {', '.join(METHODS.names())} [smile].")
@click.option("--dataset", help=f"Target dataset: {', '.join(DATASETS.names())} [digits, embedded].")
@config_option
@set_option("--config")
@click.option(
    "--output", type=click.Path(file_okay=False, path_type=Path),
    help="Run directory for metrics.json, model.pt and the checkpoint [runs/METHOD-DATASET-TIME]. "
    "A directory holding a checkpoint of the same config is resumed; one that another train is using is refused.",
)
@click.option("--overwrite", is_flag=True,
              help="Start afresh even if --output holds a checkpoint (replaced at the new run's first evaluation).")
@cache_option
@click.option(
    "--workers", type=click.IntRange(min=1),
    help="Run data-parallel on N Ray Train workers (DDP; gloo on CPU, nccl with --gpu). "
    "batch_size is the global batch. Without it the core runs in this process, which is the "
    "better choice on a single CPU machine: Ray Train adds about 12 s of fixed start-up "
    "(benchmarks/ray_overhead.py) and N CPU workers share the same cores.",
)
@click.option("--gpu", is_flag=True, help="One GPU per Ray Train worker.")
@cluster_options
@click.option(
    "--max-failures", type=click.IntRange(min=-1), default=1, show_default=True,
    help="Worker failures to recover from (restarting at the latest checkpoint); -1: no limit.",
)
@click.option("--cpus-per-worker", type=click.IntRange(min=1),
              help="CPUs (and torch threads) per Ray Train worker [CPU workers share the cluster's CPUs].")
@tracking_options("Record the run in MLflow: params, curves, test metrics, reliability diagram, the model "
                  "(e.g. sqlite:///mlflow.db or http://host:5000) [not recorded].",
                  "MLflow experiment name, with --tracking-uri [smile-ray-DATASET].")
@assignments_argument
@common_options
def train(method, dataset, config_file, overrides, output, overwrite, cache_dir, quiet, workers, gpu, address, storage,
          max_failures, cpus_per_worker, tracking_uri, experiment, assignments) -> None:
    """Fine-tune one model and write OUTPUT/metrics.json.

    metrics.json holds the method, the full config, validation and test accuracy, test
    ECE and NLL, the interpolation losses (Label-IL, Feature-IL on train and test images),
    the test split's reliability bins, steps, seconds, when it started and finished
    (started_at, finished_at: UTC) and the per-evaluation history;
    reliability.png its reliability diagram; model.pt the student's weights;
    checkpoint/state.pt the state to resume from.
    """
    run = api.train(config_file, output, method=method, dataset=dataset,
                    overrides=all_overrides(overrides, assignments), cache_dir=cache_dir, overwrite=overwrite,
                    progress=not quiet, workers=workers, gpu=gpu, address=address, storage=storage,
                    max_failures=max_failures, cpus_per_worker=cpus_per_worker, tracking_uri=tracking_uri,
                    experiment=experiment)
    config, metrics = run.config, run.metrics
    click.echo(
        f"{config.method} on {config.dataset}: val_acc {metrics['val_acc']:.4f}  test_acc {metrics['test_acc']:.4f}  "
        f"test_ece {metrics['test_ece']:.4f}  {metrics['steps']} steps in {metrics['seconds']:.1f} s"
    )
    click.echo(f"wrote {run.output / 'metrics.json'}, {run.reliability_png}")
    if run.mlflow_run_id:
        click.echo(f"MLflow: run {run.mlflow_run_id} (its model: runs:/{run.mlflow_run_id}/model)")


@cli.command()
@click.option("--space", "space_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Search-space YAML, or a shipped one by name: " + ", ".join(shipped_names("search_spaces"))
              + ". With --resume, the saved one (giving it again is fine).")
@click.option("--num-samples", type=int, help="Number of trials [the file's num_samples].")
@set_option("the space file's base")
@study_options("study", "runs/tune-SPACE-TIME")
def tune(space_file, num_samples, overrides, assignments, quiet, **study) -> None:
    """Search hyper-parameters with Ray Tune + HyperOpt; track everything in MLflow.

    Tuning optimises the validation metric; test accuracy is recorded per trial but never
    used for selection. Writes OUTPUT/trials.parquet (a row per trial), OUTPUT/best.json
    (the best trial's full config and metrics: use it as `train --config`) and a PNG of the
    metric against each searched parameter.
    """
    result = api.tune(space_file, num_samples=num_samples, overrides=all_overrides(overrides, assignments),
                      progress=not quiet, **study)
    best, output = result.best, result.output
    s = best["study"]
    click.echo(f"best trial {best['trial_id']}: {best['metric']} {best[best['metric']]:.4f}  "
               f"test_acc {best['test_acc']:.4f}  ({s['trials']} trials, {s['wall_seconds']:.0f} s in all)")
    click.echo(f"wrote {output / 'trials.parquet'}, {output / 'best.json'}")
    echo_mlflow(output / "study.json")


@cli.command()
@click.option("--definitions", type=click.Path(dir_okay=False, path_type=Path), default=Path("ablations/smile.yaml"),
              show_default=True, help="Ablation definitions (base config, seeds, components and their overrides), "
              "or a shipped file by name: " + ", ".join(shipped_names("ablations")) + ".")
@click.option("--drop", "drops", multiple=True, metavar="COMPONENT[+COMPONENT]",
              help="One arm without this component (repeatable; a+b drops both in one arm).")
@click.option("--all", "all_components", is_flag=True, help="Leave-one-component-out over every defined component.")
@seeds_option
@click.option("--max-seeds", type=int, help="With --seeds auto: the most seeds any arm runs [20].")
@click.option("--base", "base_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Base config file (e.g. a tune study's best.json) instead of the definitions' base.")
@set_option("the base, to every run (samples_per_class replaces the file's grid)")
@click.option("--tune-budget", type=int, default=0, show_default=True,
              help="Tune each arm first with this many HyperOpt trials (on validation) over the parameters it still uses.")
@study_options("ablation", "runs/ablate-TIME")
def ablate(definitions, drops, all_components, seeds, max_seeds, base_file, overrides, tune_budget, assignments, quiet,
           **study) -> None:
    """Compare the full method with arms that drop components, over shared seeds.

    Writes OUTPUT/ablation.parquet (a row per arm x seed), OUTPUT/ablation.md (mean ± std
    test accuracy, paired difference to the full method with a bootstrap CI, probability
    of improvement, paired t-test p-value, minimum detectable effect) and
    OUTPUT/ablation.png; prints the table. With --seeds auto the table also says which
    arms resolved (interval excluding zero) and at how many seeds.
    """
    result = api.ablate(definitions, drop=drops, all_components=all_components, seeds=seeds, max_seeds=max_seeds,
                        base=base_file, overrides=all_overrides(overrides, assignments), tune_budget=tune_budget,
                        progress=not quiet, **study)
    table, output = result.table, result.output
    echo_table(table)
    click.echo(f"wrote {output / 'ablation.parquet'}, {output / 'ablation.md'}, {output / 'ablation.png'}")
    echo_mlflow(output / "ablation.json")


@cli.command()
@click.option("--methods", "methods_text", default="l2,mixup,smile", show_default=True,
              help="Comma-separated methods to compare: " + ", ".join(METHODS.names()) + ".")
@click.option("--settings", "settings_file", type=click.Path(dir_okay=False, path_type=Path), default=Path("digits"),
              show_default=True, help="Comparison settings (base config, columns, seeds, per-method tune spaces), "
              "or a shipped file by name: " + ", ".join(shipped_names("compare")) + ".")
@seeds_option
@set_option("the settings' base, to every run (a key the columns set is refused: the columns decide it)")
@click.option("--tune-budget", type=int, default=0, show_default=True,
              help="First give each method this many HyperOpt trials per column (on validation) over its own knobs.")
@study_options("comparison", "runs/compare-TIME")
def compare(methods_text, settings_file, seeds, overrides, tune_budget, assignments, quiet, **study) -> None:
    """Compare fine-tuning methods over shared seeds: the paper's Table 2 from one command.

    Every (method, column, seed) is a Ray Tune trial. Writes OUTPUT/table.md (rows =
    methods, columns = settings, mean ± std test accuracy, best in bold, paired
    difference to l2 with its 95 % interval and minimum detectable effect; then the
    interpolation losses, the paper's Table 4, and, where the columns span data sizes,
    each method's difference to l2 against the size, the paper's Fig. 1, drawn as
    OUTPUT/difference.png), OUTPUT/results.parquet (a row per run),
    OUTPUT/table.png, and an MLflow parent run with a child per run; prints the table.
    A failed run is named on one line and left out; the rest are kept.
    """
    result = api.compare(methods_text, settings_file, seeds=seeds, overrides=all_overrides(overrides, assignments),
                         tune_budget=tune_budget, progress=not quiet,
                         on_failed=lambda line: click.echo(line, err=True), **study)
    table, output = result.table, result.output
    echo_table(table)
    click.echo(f"wrote {output / 'results.parquet'}, {output / 'table.md'}, {output / 'table.png'}")
    echo_mlflow(output / "compare.json")


@cli.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.md"),
              show_default=True, help="The Markdown report; its images go to <stem>_files/ beside it.")
@common_options
def report(dirs, output, quiet) -> None:
    """One Markdown report, with plots, of output directories of train, tune, ablate or compare.

    DIR is a run (metrics.json), a study (trials.parquet, best.json), an ablation
    (ablation.parquet) or a comparison (results.parquet, compare.json). The report
    holds the tables (recomputed, with MDE and IQM), training curves, reliability diagrams,
    interpolation losses and, where the data size varies, accuracy against it.
    """
    path = api.report(dirs, output)
    click.echo(f"wrote {path} (images in {path.parent / (path.stem + '_files')})")


@cli.command("config")
@config_option
@set_option("--config")
@assignments_argument
@common_options
def show_config(config_file, overrides, assignments, quiet) -> None:
    """Print the resolved config as YAML (a starting point for --config files)."""
    config: Config = resolve_config(config_file, all_overrides(overrides, assignments))
    click.echo(yaml.safe_dump(config.to_dict(), sort_keys=False), nl=False)


def echo_table(markdown: str) -> None:
    """Print a study's Markdown table as a terminal shows it."""
    # imported here: the tables import the statistics (scipy, torch), which every other
    # command line (--help, a refused input) would otherwise wait for
    from smile_ray.reports.tables import for_terminal

    click.echo(for_terminal(markdown), nl=False)


def echo_mlflow(state_file: Path) -> None:
    link = json.loads(state_file.read_text()).get("mlflow_ui")
    if link:
        click.echo(f"MLflow: {link}")


def argv_has(argv: list[str] | None, word: str) -> bool:
    return word in (argv if argv is not None else sys.argv[1:])


def main(argv: list[str] | None = None) -> int:
    try:
        with resend_lost_interrupts():  # a Ctrl-C that lands in a weakref callback still stops the command
            rv = cli.main(args=argv, prog_name="smile-ray", standalone_mode=False)
    except SmileError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code
    except (click.Abort, KeyboardInterrupt):
        if any(argv_has(argv, study) for study in ("tune", "ablate", "compare")):
            resume = "add --resume (with the same --output) to continue"
        else:
            resume = "rerun the same command (same --output) to resume from the last checkpoint"
        click.echo(f"error: interrupted; {resume}", err=True)
        return 130
    return rv if isinstance(rv, int) else 0


def entry() -> None:
    sys.exit(main())
