"""The study file formats (:mod:`smile_ray.orchestration.spaces`): a search space
(``tune --space``), ablation definitions (``ablate --definitions``) and comparison
settings (``compare --settings``), shipped ones found by name. A bad file is one line
naming the file, key or value at fault, exit 2, and nothing written; no Ray starts."""
import pytest
import yaml

from smile_ray.cli import main
from smile_ray.errors import SmileError
from smile_ray.orchestration.spaces import load_definitions, load_settings, load_study
from study_files import write_defs, write_settings, write_space


def run_cli(capfd, *argv):
    code = main(list(argv))
    return code, capfd.readouterr().err


# --- search spaces ------------------------------------------------------------------

@pytest.mark.parametrize(
    "changes, expect",
    [
        ({"space": {"mixup_alpha": {"normal": [0, 1]}}}, "unknown distribution 'normal'"),
        ({"space": {"mixup_alpha": {"uniform": [2.0, 0.5]}}}, "low 2.0 must be below high 0.5"),
        ({"space": {"mixup_alpha": {"loguniform": [0.0, 1.0]}}}, "loguniform: low 0.0 must be > 0"),
        ({"space": {"alpha": {"uniform": [0.1, 1.0]}}}, "'alpha' is not a config key"),
        ({"space": {"ema_decay": {"uniform": [0.5, 1.5]}}}, "ema_decay=1.5 is out of range"),
        ({"metric": "val_f1"}, "metric 'val_f1' is not reported by the trainer"),
        ({"metric": "test_acc"}, "validation metrics only"),
        ({"num_samples": 0}, "num_samples=0 must be an integer >= 1"),
        ({"search": "bayes"}, "search 'bayes'"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"space": {"mixup_alpha": {"grid": [0.1, 0.2]}}}, "grid values need search: grid or random"),
        ({"replicates": 0}, "replicates=0 must be an integer >= 1"),
        ({"replicates": 2, "resources": {"workers": 2}}, "replicates=2 with resources.workers=2"),
        ({"replicates": 2, "space": {"seed": {"randint": [0, 9]}}}, "space.seed with replicates=2"),
    ],
)
def test_bad_space_files_are_one_line_and_create_nothing(tmp_path, capfd, monkeypatch, changes, expect):
    monkeypatch.chdir(tmp_path)
    space = write_space(tmp_path / "space.yaml", **changes)
    code, err = run_cli(capfd, "tune", "--space", str(space), "--output", str(tmp_path / "s"))
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and expect in lines[0], err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "s").exists()


def test_shipped_spaces_and_ablations_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: no search_spaces/ here
    assert load_study("smile").base.method == "smile"
    assert load_study("search_spaces/l2.yaml").base.method == "l2"
    assert load_definitions("ablations/smile.yaml").components
    assert load_definitions("fashion_mnist").base.backbone == "efficientnet_lite0"
    with pytest.raises(SmileError, match="no such file"):
        load_study("search_spaces/nope.yaml")


@pytest.mark.parametrize("name", ["digits", "fashion_mnist", "fashion_mnist_5", "fashion_mnist_transfer",
                                  "fashion_mnist_figure1"])
def test_shipped_settings_validate_for_the_commands_their_headers_give(name):
    """Each shipped comparison file's header names its command; the file validates for
    those methods (the paper's cells: tests/test_paper_settings.py)."""
    import re

    from smile_ray.config import find_shipped
    from smile_ray.orchestration.spaces import load_settings

    header = find_shipped(name, "compare").read_text()
    commands = re.findall(rf"smile-ray compare --methods (\S+) --settings {name}\b", header)
    assert commands, header
    for methods in commands:
        settings = load_settings(name, methods.split(","))
        assert settings.seeds >= 2 and settings.columns
    if name == "fashion_mnist_figure1":  # the paper's Fig. 1: sizes x initialisations
        assert {(c["samples_per_class"], c["weights"]) for c in settings.columns.values()} == {
            (n, w) for n in (5, 20, 50) for w in ("imagenet", "none")}


# --- ablation definitions -----------------------------------------------------------

@pytest.mark.parametrize(
    "argv, changes, expect",
    [
        (["--drop", "source_label"], {"components": {"x": "off"}}, "components.x must be a mapping"),
        (["--drop", "source_label"], {"oops": 1}, "unknown key 'oops'"),
        (["--drop", "source_label", "--seeds", "auto", "--max-seeds", "3"], {"seeds": 5},
         "--max-seeds=3 must be at least the first round's seeds (5)"),
    ],
)
def test_bad_definitions_are_one_line(tmp_path, capfd, monkeypatch, argv, changes, expect):
    monkeypatch.chdir(tmp_path)
    defs = write_defs(tmp_path / "defs.yaml", **changes)
    code = main(["ablate", "--definitions", str(defs), "--output", str(tmp_path / "o"), *argv])
    lines = capfd.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and expect in lines[0], lines
    assert not (tmp_path / "o").exists() and not (tmp_path / "mlflow.db").exists()


def test_bad_base_and_definitions_files(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    defs = write_defs(tmp_path / "defs.yaml")
    not_config = tmp_path / "list.yaml"
    not_config.write_text("- 1\n- 2\n")
    malformed = tmp_path / "bad.yaml"
    malformed.write_text("components: {a: [\n")
    for argv, expect in [
        (["--definitions", str(defs), "--base", str(tmp_path / "best.json")], "best.json: no such file"),
        (["--definitions", str(defs), "--base", str(not_config)], "expected a mapping of config keys"),
        (["--definitions", str(malformed)], "malformed YAML"),
    ]:
        code = main(["ablate", *argv, "--drop", "source_label", "--output", str(tmp_path / "o")])
        lines = capfd.readouterr().err.strip().splitlines()
        assert code != 0 and len(lines) == 1 and expect in lines[0], (argv, lines)


def test_a_shared_base_may_hold_a_knob_only_some_arm_reads_and_one_component_may_be_dropped(tmp_path):
    """feature_weight is read by the full method though not by the arm without feature
    mixup: legitimate in the shared base. A file naming one component: dropping it leaves
    the method without that part, not an empty method."""
    from smile_ray.orchestration.ablate import build_arms

    defs = load_definitions(write_defs(tmp_path / "defs.yaml"), overrides={"feature_weight": 0.05})
    assert build_arms(defs, ["feature_mixup"], False)["-feature_mixup"] == {"feature_mixup": False}
    one = load_definitions(write_defs(tmp_path / "one.yaml", components={"source_label": {"source_label": False}}))
    assert build_arms(one, ["source_label"], False) == {"full": {}, "-source_label": {"source_label": False}}
    assert list(build_arms(one, [], True)) == ["full", "-source_label"]


def test_a_samples_per_class_override_replaces_the_grid_and_seed_is_refused(tmp_path):
    defs = write_defs(tmp_path / "defs.yaml", samples_per_class=[2, 5])
    assert load_definitions(defs).samples == (2, 5)
    assert load_definitions(defs, overrides={"samples_per_class": 4}).samples == (4,)
    with pytest.raises(Exception, match="--set seed"):
        load_definitions(defs, overrides={"seed": 3})


# --- comparison settings ------------------------------------------------------------

@pytest.mark.parametrize("changes, expect", [
    ({"columns": {"samples_per_class": []}}, "columns.samples_per_class: expected a non-empty"),
    ({"columns": [1, 2]}, "columns must be"),
    ({"base": {"method": "smile"}}, "base.method: a comparison takes its methods from --methods"),
    ({"columns": {"a": {"lr": -1}}}, "lr"),
    ({"tune_space": {"nope": {}}}, "unknown method 'nope'"),
    ({"colums": {}}, "unknown key 'colums'"),
])
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, capfd, monkeypatch, changes, expect):
    monkeypatch.chdir(tmp_path)
    settings = write_settings(tmp_path / "settings.yaml", **changes)
    code, err = run_cli(capfd, "compare", "--settings", str(settings), "--output", str(tmp_path / "out"),
                        "--methods", "l2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_malformed_settings_file_is_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("base: {steps: 20\ncolumns: [")
    code, err = run_cli(capfd, "compare", "--settings", str(tmp_path / "bad.yaml"), "--output", str(tmp_path / "out"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad.yaml" in err, err
    assert not (tmp_path / "out").exists()


def test_shipped_settings_load_by_name():
    for name in ("digits", "fashion_mnist"):
        s = load_settings(name, ["l2", "mixup", "smile"])
        assert s.seeds >= 5 and len(s.columns) == 2 and set(s.tune_space) >= {"l2", "mixup", "smile"}


# --- the sections every format shares: one parser, one message ----------------------

SPACE = {"base": {"steps": 20}, "space": {"mixup_alpha": {"uniform": [0.1, 1.0]}}}
DEFINITIONS = {"base": {"steps": 20}, "components": {"source_label": {"source_label": False}}}
SETTINGS = {"base": {"steps": 20}, "columns": {"samples_per_class": [3]}}
LOADERS = [(SPACE, lambda p: load_study(p)), (DEFINITIONS, lambda p: load_definitions(p)),
           (SETTINGS, lambda p: load_settings(p, ["l2", "smile"]))]


@pytest.mark.parametrize("section, value, expect", [
    ("resources", {"cpu": 1}, "resources: unknown key 'cpu' (expected: cpus, gpus, workers)"),
    ("resources", {"gpus": 2}, "resources.gpus=2 with workers=1"),
    ("max_concurrent", 0, "max_concurrent=0 must be an integer >= 1"),
    ("base", {"steps": -1}, "steps"),
])
def test_a_shared_section_is_refused_alike_in_every_format(tmp_path, section, value, expect):
    for i, (content, load) in enumerate(LOADERS):
        path = tmp_path / f"{i}.yaml"
        path.write_text(yaml.safe_dump({**content, section: value}))
        with pytest.raises(SmileError) as e:
            load(path)
        assert str(e.value).startswith(str(path)) and expect in str(e.value), str(e.value)


def test_one_spelling_of_the_tune_space_and_one_message_for_a_bad_key(tmp_path):
    bad = {"mixup_alfa": {"uniform": [0.1, 1.0]}}
    for i, (content, load) in enumerate(LOADERS):
        path = tmp_path / f"{i}.yaml"
        section = {"space": bad} if content is SPACE else {"tune_space": {"smile": bad} if content is SETTINGS else bad}
        path.write_text(yaml.safe_dump({**content, **section}))
        with pytest.raises(SmileError, match="'mixup_alfa' is not a config key"):
            load(path)
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({**SETTINGS, "tune_spaces": {}}))
    with pytest.raises(SmileError, match="unknown key 'tune_spaces'"):
        load_settings(path, ["l2"])
