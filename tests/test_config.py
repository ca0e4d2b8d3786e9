"""The one config: defaults, types, ranges, files and overrides."""
import json

import pytest

from smile_ray.config import (ALL, KEYS, METHOD_KEYS, REFERENCE_PLAIN_TAIL_FRACTION, make_config, parse_overrides,
                              resolve_config)
from smile_ray.errors import SmileError


def test_defaults_are_the_reference_values():
    c = make_config()
    assert (c.mixup_alpha, c.ema_decay, c.ema_every) == (0.2, 0.999, 10)
    assert (c.feature_weight, c.source_label_weight, c.head_l2_weight) == (0.01, 0.1, 1e-4)
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size, c.seed) == (0.01, 0.9, 1e-4, 48, 2022)
    assert c.plain_tail_fraction == REFERENCE_PLAIN_TAIL_FRACTION
    assert c.lr_decay_step == -1 and c.resolved_lr_decay_step == 222 and c.plain_tail_start == 300 - 33
    # checkpoints every evaluation unless checkpoint_every says otherwise
    assert c.checkpoint_every == 0 and c.checkpoint_interval == c.eval_every == 100
    assert make_config({"checkpoint_every": 30}).checkpoint_interval == 30


def test_overrides_are_typed_from_yaml_spelling():
    values = parse_overrides(["mixup_alpha=0.4", "feature_mixup=false", "head_l2_weight=1e-3", "steps=20"])
    c = make_config(values)
    assert c.mixup_alpha == 0.4 and c.feature_mixup is False and c.head_l2_weight == 1e-3 and c.steps == 20


def test_gpu_speed_keys_default_to_auto_and_take_booleans_in_any_spelling():
    c = make_config()
    assert (c.precision, c.channels_last, c.compile) == ("auto", "auto", False)
    for value, want in ((True, "true"), (False, "false"), ("on", "true"), ("0", "false"), ("AUTO", "auto")):
        assert make_config({"channels_last": value}).channels_last == want
    assert make_config(parse_overrides(["channels_last=false", "compile=true"])).channels_last == "false"


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"alpha": 0.3}, "unknown config key 'alpha'"),
        ({"mixup_alpa": 0.3}, "did you mean 'mixup_alpha'"),
        ({"mixup_alpha": 0}, "mixup_alpha=0.0 is out of range"),
        ({"mixup_alpha": -1}, "mixup_alpha"),
        ({"ema_decay": 1.0}, "ema_decay=1.0 is out of range"),
        ({"ema_decay": -0.1}, "ema_decay"),
        ({"feature_weight": -0.01}, "feature_weight=-0.01 is out of range"),
        ({"source_label_weight": -1}, "source_label_weight"),
        ({"head_l2_weight": -1}, "head_l2_weight"),
        ({"steps": "many"}, "steps='many' is not a valid int"),
        ({"steps": 2.5}, "steps=2.5 is not a valid int"),
        ({"lr": True}, "lr=True is not a valid float"),
        ({"feature_mixup": "maybe"}, "feature_mixup='maybe' is not a valid bool"),
        ({"method": "maml"}, "unknown method 'maml' (choose from: l2, mixup, smile, l2sp, bss,"),
        ({"dataset": "imagenet21k"}, "unknown dataset 'imagenet21k'"),
        ({"backbone": "vgg"}, "unknown backbone 'vgg'"),
        ({"precision": "fp16"}, "precision='fp16' is out of range"),
        ({"device": "tpu"}, "device='tpu'"),
        ({"channels_last": "sometimes"}, "channels_last='sometimes' is not auto, true or false"),
        ({"channels_last": 0.5}, "channels_last=0.5 is not auto, true or false"),
        ({"compile": "fast"}, "compile='fast' is not a valid bool"),
        ({"checkpoint_every": -1}, "checkpoint_every=-1 is out of range (0 (every eval_every steps)"),
    ],
)
def test_bad_values_name_the_key(values, fragment):
    with pytest.raises(SmileError) as e:
        make_config(values)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "key, bad, rule",
    [  # each kind of declared rule, with the text the error gives (unchanged from the hand-written checks)
        ("samples_per_class", 0, "must be >= 1"),
        ("class_fraction", 0, "must be in (0, 1]"),
        ("val_fraction", 1, "must be in (0, 1)"),
        ("momentum", 1, "must be in [0, 1)"),
        ("stochnorm_prob", 1.5, "must be in [0, 1]"),
        ("lr", 0, "must be > 0"),
        ("sample_rate", 1.5, "0 (off) or a fraction in (0, 1]"),
        ("lr_decay_step", -2, "-1 (reference) or a step >= 0"),
        ("decode", "gpu", "auto, cpu or device"),
        ("head_init", "he", "torch or xavier"),
        ("delta_variant", "both", "attention or feature_map"),
        ("device", "cuda:x", "auto, cpu, cuda or cuda:N"),
        ("weights", "", "source, imagenet, a weight tag (DEFAULT, IMAGENET1K_V1, ...), none or a file path"),
    ],
)
def test_a_key_declares_its_range(key, bad, rule):
    assert KEYS[key].metadata["rule"].text == rule
    with pytest.raises(SmileError) as e:
        make_config({key: bad})
    assert str(e.value).startswith(f"config: {key}=") and str(e.value).endswith(f"is out of range ({rule})")


def test_method_keys_are_the_keys_declared_for_a_method():
    from smile_ray.registry import METHODS

    assert METHOD_KEYS == {k for k, f in KEYS.items() if f.metadata["methods"]}
    assert {"l2sp_weight", "ema_decay", "head_l2_weight", "plain_tail"} <= METHOD_KEYS
    assert not {"steps", "lr", "seed", "head_l2", "method"} & METHOD_KEYS
    for key in METHOD_KEYS:  # a misspelt method or switch would leave a key read by nobody
        owners, when = KEYS[key].metadata["methods"], KEYS[key].metadata["when"]
        assert owners == ALL or set(owners) <= set(METHODS.names()), key
        assert not when or KEYS[when].type in (bool, "bool"), key


def test_config_file_then_explicit_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: mixup\nmixup_alpha: 0.5\nsteps: 10\n")
    c = resolve_config(f, ["steps=12"], method="l2")
    assert (c.method, c.mixup_alpha, c.steps) == ("l2", 0.5, 12)


def test_result_files_are_configs(tmp_path):
    f = tmp_path / "metrics.json"
    f.write_text(json.dumps({"val_acc": 0.9, "config": {"method": "mixup", "seed": 3}}))
    c = resolve_config(f)
    assert (c.method, c.seed) == ("mixup", 3)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("method: [smile\n", "malformed YAML at line"),
        ("- a\n- b\n", "expected a mapping"),
        ("mixup_alpha: 0.2\nbogus: 1\n", "unknown config key 'bogus'"),
    ],
)
def test_bad_files_name_the_file(tmp_path, text, fragment):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(SmileError) as e:
        resolve_config(f)
    assert str(f) in str(e.value) and fragment in str(e.value)


def test_missing_file_and_bad_set_syntax(tmp_path):
    with pytest.raises(SmileError, match="no such file"):
        resolve_config(tmp_path / "nope.yaml")
    with pytest.raises(SmileError, match="expected key=value"):
        resolve_config(None, ["mixup_alpha"])


def test_a_shipped_preset_is_a_config_by_name(tmp_path, monkeypatch):
    from smile_ray.config import preset_names

    monkeypatch.chdir(tmp_path)
    assert "fashion_mnist" in preset_names()
    c = resolve_config("fashion_mnist", ["steps=7"])
    assert (c.dataset, c.backbone, c.weights, c.steps) == ("fashion_mnist", "efficientnet_lite0", "imagenet", 7)
    (tmp_path / "fashion_mnist").write_text("steps: 3\n")  # a file of that name wins
    assert resolve_config("fashion_mnist").steps == 3
    with pytest.raises(SmileError, match="nope: no such file"):
        resolve_config("nope")
