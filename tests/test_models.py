"""Backbones: torchvision ResNets in the SMILE wrapper, weights from local files only."""
import pytest
import torch
import torchvision

from smile_ray.config import make_config
from smile_ray.errors import SmileError
from smile_ray.models import TransferNet, imagenet_weights_path, load_source_model
from smile_ray.pretrain import load_source


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
