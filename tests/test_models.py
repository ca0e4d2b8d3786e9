"""Backbones: torchvision's families and timm's models in the SMILE wrapper, weights by
tag from the frameworks' caches (seeded here; nothing downloads) or from local files,
and every method on a non-ResNet torchvision family and on a timm model."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from conftest import FEW_IL_PAIRS
from smile_ray.config import make_config
from smile_ray.data import DatasetSpec, TensorTask
from smile_ray.errors import SmileError
from smile_ray.methods.base import last_convs
from smile_ray.methods.base import stages as base_stages
from smile_ray.models import TransferNet, imagenet_weights_path, input_norm, load_source_model
from smile_ray.pretrain import load_source
from smile_ray.recipe import train
from smile_ray.registry import DATASETS, METHODS, register_dataset


@pytest.mark.parametrize("arch, channels", [("resnet18", 512), ("resnet50", 2048)])
def test_torchvision_resnet_from_a_local_file(tmp_path, arch, channels):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None, num_classes=7).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(reference.state_dict(), path)  # exactly torchvision's layout

    source = load_source_model(arch, path).eval()
    x = torch.randn(2, 3, 64, 64)
    fmap, logits = source(x)
    assert fmap.shape == (2, channels, 2, 2)  # last stage, before pooling
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(x))  # same network, same weights

    student = TransferNet(source, num_classes=3, source_head=True).eval()
    out = student(x)
    assert out.logits.shape == (2, 3) and out.aux_logits.shape == (2, 7) and out.fmap.shape == fmap.shape
    torch.testing.assert_close(out.aux_logits, logits)  # source head starts as the source classifier
    grey = student(torch.randn(2, 1, 64, 64))  # 1-channel data goes through the RGB stem
    assert grey.logits.shape == (2, 3)


def test_imagenet_weights_come_from_the_hub_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = make_config({"backbone": "resnet18", "weights": "imagenet"})
    folder = tmp_path / "hub" / "checkpoints"
    with pytest.raises(SmileError, match=f"resnet18-f37072fd.pth is not in {folder} and SMILE_RAY_OFFLINE=1"):
        load_source(cfg)
    path = imagenet_weights_path("resnet18")
    assert path == folder / "resnet18-f37072fd.pth"  # resnet18's DEFAULT is IMAGENET1K_V1
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    source, where = load_source(cfg)
    assert where == str(path) and source.fc.out_features == 1000


def test_bad_weight_files(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(SmileError, match="not a readable PyTorch state dict"):
        load_source_model("resnet18", corrupt)
    with pytest.raises(SmileError, match="does not exist"):
        load_source_model("resnet18", tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    with pytest.raises(SmileError, match="does not fit backbone 'resnet50'"):
        load_source_model("resnet50", other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"fc.weight": object()}, pickled)  # arbitrary objects are refused, not executed
    with pytest.raises(SmileError, match="pickled.pt"):
        load_source_model("resnet18", pickled)


def test_head_init_xavier_is_paddles_default_and_torch_is_nn_linears(cache_dir):
    import math

    from smile_ray.models import build_source_model
    from smile_ray.recipe import setup

    source = build_source_model("resnet18", 7)
    torch.manual_seed(0)
    xavier = TransferNet(source, 200, source_head=False, head_init="xavier").classifier
    torch.manual_seed(0)
    default = TransferNet(source, 200, source_head=False).classifier
    bound = math.sqrt(6 / (512 + 200))  # Paddle's XavierUniform: fan_in + fan_out
    assert torch.count_nonzero(xavier.bias) == 0
    assert xavier.weight.abs().max() <= bound and xavier.weight.abs().max() > 0.95 * bound
    # U(-a, a) has variance a^2 / 3; 102,400 draws pin it to a few per cent
    assert xavier.weight.var().item() == pytest.approx(bound ** 2 / 3, rel=0.03)
    assert default.weight.abs().max() <= 1 / math.sqrt(512) and torch.count_nonzero(default.bias) > 0
    # the recipe builds the student's head as the key says, drawn from the run's seed
    runs = [setup(make_config({"head_init": h, "steps": 2}), cache_dir, log=lambda m: None) for h in ("xavier", "torch")]
    assert torch.count_nonzero(runs[0].model.classifier.bias) == 0
    assert torch.count_nonzero(runs[1].model.classifier.bias) > 0
    with pytest.raises(SmileError, match="head_init='zeros' is out of range .torch or xavier"):
        make_config({"head_init": "zeros"})


# ---------------------------------------------------------------- torchvision families


@pytest.mark.parametrize("name, stages", [
    ("efficientnet_b0", [f"features.{i}" for i in range(1, 8)]),
    ("mobilenet_v2", [f"features.{i}" for i in range(1, 18)]),
    ("mobilenet_v3_small", [f"features.{i}" for i in range(1, 12)]),
    ("convnext_tiny", ["features.1", "features.3", "features.5", "features.7"]),
    ("densenet121", [f"features.denseblock{i}" for i in range(1, 5)]),
    ("regnet_x_400mf", [f"trunk_output.block{i}" for i in range(1, 5)]),
    ("wide_resnet50_2", ["layer1", "layer2", "layer3", "layer4"]),
    ("vgg11_bn", ["features.0", "features.4", "features.11", "features.18", "features.25"]),
    ("alexnet", ["features.0", "features.3", "features.10"]),
    ("shufflenet_v2_x0_5", ["stage2", "stage3", "stage4"]),
    ("mnasnet0_5", [f"layers.{i}" for i in range(8, 14)]),
])
def test_a_torchvision_family_is_torchvision_with_its_stages(tmp_path, name, stages):
    """Built by torchvision, loaded from torchvision's own layout: eval logits equal
    torchvision's; the family declares the stages DELTA and RegSL use."""
    torch.manual_seed(0)
    reference = torchvision.models.get_model(name, num_classes=7).eval()
    state = reference.state_dict()
    if name == "densenet121":  # torchvision's published files spell these keys the old way
        state = {k.replace("denselayer1.norm1.", "denselayer1.norm.1."): v for k, v in state.items()}
        assert any(".norm.1." in k for k in state)
    torch.save(state, tmp_path / "w.pth")
    source = load_source_model(name, tmp_path / "w.pth").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap, logits = source(x)
        torch.testing.assert_close(logits, reference(x))
    assert fmap.dim() == 4 and fmap.shape[1] == source.fc.in_features
    assert [n for n, _ in base_stages(source.body)] == stages
    assert len(last_convs(source.body)) == len(stages)
    # what the platform writes reads back into the same network
    torch.save(source.weights_state_dict(), tmp_path / "again.pth")
    with torch.no_grad():
        torch.testing.assert_close(load_source_model(name, tmp_path / "again.pth").eval()(x)[1], logits)


def seed_hub_cache(tmp_path, monkeypatch, name: str, tag: str) -> Path:
    """torchvision's ``name`` weights ``tag`` as torchvision would have cached them
    (a random state dict under the file name of the enum's url)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.get_model_weights(name)[tag]
    path = tmp_path / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    torch.save(torchvision.models.get_model(name).state_dict(), path)
    return path


def test_weights_by_torchvision_tag_from_the_hub_cache(tmp_path, monkeypatch):
    v2 = seed_hub_cache(tmp_path, monkeypatch, "resnet50", "IMAGENET1K_V2")
    assert v2.name == "resnet50-11ad3fa6.pth"
    for weights in ("imagenet", "DEFAULT", "IMAGENET1K_V2"):  # resnet50's DEFAULT is V2
        source, where = load_source(make_config({"backbone": "resnet50", "weights": weights}))
        assert where == str(v2) and source.fc.out_features == 1000
    with pytest.raises(SmileError, match="resnet50-0676ba61.pth is not in .* SMILE_RAY_OFFLINE=1"):
        load_source(make_config({"backbone": "resnet50", "weights": "IMAGENET1K_V1"}))

    path = seed_hub_cache(tmp_path, monkeypatch, "efficientnet_b0", "IMAGENET1K_V1")
    source, where = load_source(make_config({"backbone": "efficientnet_b0", "weights": "DEFAULT"}))
    reference = torchvision.models.efficientnet_b0()
    reference.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(source.eval()(x)[1], reference.eval()(x))
    # the input normalisation is the weights' own (their transforms' mean and std)
    meta = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.transforms()
    assert input_norm("efficientnet_b0", "imagenet") == (tuple(meta.mean), tuple(meta.std))
    assert input_norm("efficientnet_lite0", "imagenet") is None  # it normalises inside


@pytest.mark.parametrize("values, fragment", [
    ({"backbone": "resnet19"}, "torchvision has no classification model of that name; did you mean resnet18"),
    ({"backbone": "efficientnet_b4", "weights": "IMAGENET1K_V2"},
     "torchvision's efficientnet_b4 has no such weights .choose from: IMAGENET1K_V1, DEFAULT"),
    ({"backbone": "digits_cnn", "weights": "DEFAULT"}, "digits_cnn' has no ImageNet weights"),
    ({"backbone": "digits_cnn", "weights": "IMAGENET1K_V1"}, "digits_cnn' has no weights of that tag"),
    ({"backbone": "timm/resnet5O"}, "timm has no model 'resnet5O'; did you mean timm/resnet50"),
])
def test_bad_backbones_and_tags_get_one_line(values, fragment, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(SmileError, match=fragment) as e:
        load_source(make_config({"weights": "none", **values}))
    assert "\n" not in str(e.value)


def test_an_unknown_backbone_name_is_refused_with_close_names():
    with pytest.raises(SmileError, match="unknown backbone 'resnt50' .*did you mean resnet50"):
        make_config({"backbone": "resnt50"})


# ---------------------------------------------------------------- timm


timm = pytest.importorskip("timm")


def test_a_timm_model_from_a_local_file_is_timm(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("efficientnet_b0", num_classes=7).eval()
    torch.save(reference.state_dict(), tmp_path / "w.pth")  # timm's own layout
    source = load_source_model("timm/efficientnet_b0", tmp_path / "w.pth").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap, logits = source(x)
        torch.testing.assert_close(logits, reference(x))
    assert fmap.shape == (2, 1280, 2, 2)  # forward_features: before pooling
    assert [n for n, _ in base_stages(source.body)] == [f"net.blocks.{i}" for i in (0, 1, 2, 4, 6)]
    # a head with more than pooling (MobileNetV3's conv_head): the pre-logit feature
    reference = timm.create_model("mobilenetv3_small_050", num_classes=7).eval()
    torch.save(reference.state_dict(), tmp_path / "m.pth")
    source = load_source_model("timm/mobilenetv3_small_050", tmp_path / "m.pth").eval()
    with torch.no_grad():
        fmap, logits = source(x)
        torch.testing.assert_close(logits, reference(x))
    assert fmap.shape == (2, 1024, 1, 1)


def test_timm_weights_from_timms_cache(tmp_path, monkeypatch):
    """``weights=imagenet`` on a timm name reads timm's weights of that tag from the
    Hugging Face cache (seeded here as huggingface_hub lays it out)."""
    import huggingface_hub.constants
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = make_config({"backbone": "timm/resnet18.a1_in1k", "weights": "imagenet"})
    with pytest.raises(SmileError, match="model.safetensors is not in .*models--timm--resnet18.a1_in1k.* "
                                         "SMILE_RAY_OFFLINE=1"):
        load_source(cfg)
    repo = tmp_path / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    torch.manual_seed(2)
    reference = timm.create_model("resnet18").eval()
    save_file(reference.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    source, where = load_source(cfg)
    assert where.endswith("model.safetensors")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(source.eval()(x)[1], reference(x))
    assert input_norm("timm/resnet18.a1_in1k", "imagenet") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_a_timm_name_without_timm_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(SmileError, match=r"need timm, which is not installed: pip install 'smile-ray\[timm\]'"):
        load_source(make_config({"backbone": "timm/resnet18", "weights": "none"}))


def test_stochnorm_keeps_timms_fused_activation():
    from smile_ray.methods.stochnorm import StochNorm2d, replace_batchnorms

    net = timm.create_model("mobilenetv3_small_050").eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = net(x)
    count = replace_batchnorms(net, 0.5, torch.Generator().manual_seed(0))
    fused = [m for m in net.modules() if isinstance(m, StochNorm2d) and "act" in m._modules]
    assert count > 0 and any(not isinstance(m.act, nn.Identity) for m in fused)  # ReLU / Hardswish kept
    assert net.state_dict().keys() == before.keys()
    with torch.no_grad():  # eval: plain BatchNorm, then timm's activation
        torch.testing.assert_close(net.eval()(x), expected)


# ---------------------------------------------------------------- every method on them


def tiny_rgb_target(config, cache_dir=None):
    """Three classes of random 3-channel images, two per class and split: a task every
    method can run a few steps on in seconds."""
    g = torch.Generator().manual_seed(0)
    size = config.image_size

    def split(n):
        return torch.rand(n * 3, 3, size, size, generator=g), torch.arange(3).repeat(n)

    return TensorTask({"train": split(2), "val": split(2), "test": split(2)}, 3, config.seed)


@pytest.fixture(scope="module")
def tiny_rgb():
    if "tiny_rgb" not in DATASETS:
        register_dataset("tiny_rgb", DatasetSpec(target=tiny_rgb_target))
    return "tiny_rgb"


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "timm/mobilenetv3_small_050"])
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_runs_on_a_torchvision_family_and_a_timm_model(tiny_rgb, backbone, method, tmp_path):
    # DELTA's attention measurement on a torchvision body (an nn.Sequential) is covered on
    # digits (test_baselines); here the timm body (not a sequence) takes the new path
    variant = "attention" if backbone.startswith("timm/") else "feature_map"
    cfg = make_config({"method": method, "dataset": tiny_rgb, "backbone": backbone, "weights": "none",
                       "image_size": 16, "steps": 2, "eval_every": 2, "batch_size": 6, "delta_variant": variant,
                       **FEW_IL_PAIRS})
    train(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", log=lambda msg: None)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["steps"] == 2 and math.isfinite(m["test_nll"]) and 0 <= m["test_acc"] <= 1


def test_a_timm_name_caches_its_source_model_as_one_file(tmp_path):
    from smile_ray.pretrain import source_weights_path

    path = source_weights_path(make_config({"backbone": "timm/resnet18.a1_in1k"}), tmp_path)
    assert path.parent == tmp_path and "timm_resnet18.a1_in1k" in path.name


def test_stochnorm_refuses_a_backbone_without_batchnorm():
    from smile_ray.methods import build_method
    from smile_ray.models import build_source_model

    cfg = make_config({"method": "stochnorm", "backbone": "convnext_tiny", "weights": "none"})
    source = build_source_model("convnext_tiny", 10)
    with pytest.raises(SmileError, match="stochnorm replaces BatchNorm layers; backbone 'convnext_tiny' has none"):
        build_method(cfg).attach(TransferNet(source, 3, source_head=False), source)
