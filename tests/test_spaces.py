"""The three study file formats (smile_ray/orchestration/spaces.py) parse their shared
sections with one parser: a bad section is the same one line in every file."""
from __future__ import annotations

import pytest
import yaml

from smile_ray.errors import SmileError
from smile_ray.orchestration.spaces import load_definitions, load_settings, load_study

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
