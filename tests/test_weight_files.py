"""ResNet weights from local files: torchvision's layout and the common checkpoint wrappers
(a ``state_dict`` or ``model`` entry, ``module.`` prefixes: e.g. Places365's ResNet-50)."""
from __future__ import annotations

import pytest
import torch
import torchvision

from smile_ray.config import make_config
from smile_ray.errors import SmileError
from smile_ray.models import load_source_model, read_weights
from smile_ray.pretrain import load_source


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=365).eval()


def prefixed(state, prefix="module."):
    return {prefix + k: v for k, v in state.items()}


WRAPPERS = {
    "flat": lambda sd: sd,
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 90},
    "model": lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
    "places365": lambda sd: {"epoch": 90, "arch": "resnet18", "state_dict": prefixed(sd), "best_prec1": 54.7},
    "ddp_flat": lambda sd: prefixed(sd),
    "nested": lambda sd: {"model": {"state_dict": prefixed(sd)}},
    "compiled": lambda sd: {"model_state_dict": prefixed(prefixed(sd, "_orig_mod."))},
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_wrapped_checkpoints_load_as_the_same_network(tmp_path, reference, wrapper):
    path = tmp_path / f"{wrapper}.pth.tar"
    # Places365's file predates torch's zip format: save it the legacy way
    torch.save(WRAPPERS[wrapper](reference.state_dict()), path, _use_new_zipfile_serialization=wrapper != "places365")
    assert set(read_weights(path)) == set(reference.state_dict())
    source = load_source_model("resnet18", path).eval()
    assert source.fc.out_features == 365  # read off the file
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(source(x)[1], reference(x))
    # and as weights=<file> in a config
    model, where = load_source(make_config({"backbone": "resnet18", "weights": str(path)}))
    assert where == str(path.resolve()) and model.fc.out_features == 365


def test_a_wrong_shape_names_the_file_and_the_first_bad_key(tmp_path, reference):
    state = dict(reference.state_dict())
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    state["layer3.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": prefixed(state)}, path)
    with pytest.raises(SmileError) as err:
        load_source_model("resnet18", path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "layer2.0.conv1.weight has shape (128, 64, 1, 1) in the file, (128, 64, 3, 3) in the model" in message
    resnet50 = torchvision.models.resnet50(weights=None).state_dict()
    torch.save(resnet50, path)
    with pytest.raises(SmileError, match=r"does not fit backbone 'resnet18': layer1.0.conv1.weight has shape"):
        load_source_model("resnet18", path)


def test_missing_keys_and_foreign_files(tmp_path, reference):
    state = dict(reference.state_dict())
    del state["layer4.1.bn2.running_var"]
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    with pytest.raises(SmileError, match=r"it lacks 1 keys \(e.g. layer4.1.bn2.running_var\)"):
        load_source_model("resnet18", path)
    torch.save({"epoch": 3, "arch": "resnet18"}, path)
    with pytest.raises(SmileError, match=r"does not hold a flat state dict of tensors \(nor one under state_dict, model"):
        load_source_model("resnet18", path)
