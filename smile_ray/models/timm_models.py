"""timm's models as ``backbone=timm/<model name>`` (the optional extra
``pip install 'smile-ray[timm]'``), e.g. ``timm/resnet50.a1_in1k``, ``timm/efficientnet_b0``.

The network is built by timm (``timm.create_model(name, num_classes=...,
drop_rate=0)``); its classifier (``pretrained_cfg["classifier"]``, an ``nn.Linear``) is
the source classifier ``fc`` and the rest is the body, kept under ``net`` with timm's
own keys (``net.conv_stem.weight``, ...), so a timm state dict loads with one rename
(``net.`` before the body's keys, ``<classifier>.*`` -> ``fc.*``).

Feature map: ``forward_features`` (before pooling), when timm's head is global average
pooling then the classifier (ResNets, EfficientNets, ...: measured when the model is
built, on a random 64 px image in eval mode). Where timm's head does more between pooling
and the classifier (MobileNetV3's ``conv_head``, ConvNeXt's ``head.norm``, other
pooling), the body ends with ``forward_head(pre_logits=True)``, the pre-logit feature as
a ``(B, C, 1, 1)`` map (as for torchvision's ConvNeXt). Either way the eval-mode logits
are timm's (tested). Dropout before the classifier is off (``drop_rate=0``), as for the
torchvision families.

Stages: the modules of ``feature_info`` that hold a convolution (the stem's activation
``act1`` of a ResNet is not a stage), e.g. ResNet's ``layer1`` .. ``layer4`` and
EfficientNet's ``blocks.0``, ``.1``, ``.2``, ``.4``, ``.6`` (timm's feature extraction
points), so DELTA and RegSL see stages, not the 16 blocks as one. StochNorm replaces
timm's fused ``BatchNormAct2d`` keeping its activation
(:class:`~smile_ray.methods.stochnorm.StochNorm2d`).

Weights: ``weights=imagenet`` / ``DEFAULT`` are timm's pretrained weights of the name
(its tag, ``resnet50.a1_in1k``, or timm's default tag): read from the Hugging Face cache
(``huggingface_hub``'s, where timm downloads them) or, for weights published by URL,
torch's hub cache; downloaded there by timm when online, one line naming the file and
the folder when offline (``SMILE_RAY_OFFLINE=1``). timm applies its own checkpoint
filters when it loads them (``pretrained_cfg_overlay=dict(file=...)``). A local file:
``weights=<file>`` in timm's key layout (or the one this module writes). Input
normalisation: the pretrained config's ``mean`` / ``std``.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from smile_ray.errors import SmileError
from smile_ray.models import BackboneSpec, Pretrained, declare_stages

PREFIX = "timm/"
#: the files timm publishes a model's weights as on the Hugging Face hub, preferred first
HF_FILES = ("model.safetensors", "pytorch_model.bin")


def _timm():
    try:
        import timm
    except ImportError:
        raise SmileError("timm backbones need timm, which is not installed: pip install 'smile-ray[timm]'") from None
    return timm


class TimmBody(nn.Module):
    """A timm model without its classifier: image -> feature map (module docstring)."""

    def __init__(self, net: nn.Module, pooled: bool):
        super().__init__()
        self.net = net
        self.pooled = pooled

    def forward(self, x: Tensor) -> Tensor:
        f = self.net.forward_features(x)
        if not self.pooled:
            return f
        return self.net.forward_head(f, pre_logits=True).flatten(1)[:, :, None, None]


def _check(name: str) -> str:
    timm = _timm()
    arch = name[len(PREFIX):]
    if not timm.is_model(arch.split(".")[0]) or (
            "." in arch and arch not in timm.list_pretrained(arch.split(".")[0] + ".*")):
        close = difflib.get_close_matches(arch, timm.list_models(pretrained="." in arch), n=3)
        hint = f"; did you mean {' or '.join(PREFIX + c for c in close)}?" if close else ""
        raise SmileError(f"unknown backbone {name!r}: timm has no model {arch!r}{hint}")
    return arch


def _head_is_pooling(net: nn.Module) -> bool:
    """Whether timm's head is global average pooling then the classifier (measured)."""
    with torch.no_grad():
        was = net.training
        net.eval()
        try:
            f = net.forward_features(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
            pre = net.forward_head(f, pre_logits=True)
        finally:
            net.train(was)
    return f.dim() == 4 and pre.shape == (1, f.shape[1]) and torch.allclose(pre, f.mean((2, 3)), atol=1e-5)


def _split(net: nn.Module) -> tuple[nn.Module, nn.Linear, list[str]]:
    key = net.pretrained_cfg.get("classifier", "fc")
    fc = net.get_submodule(key) if isinstance(key, str) else None
    if not isinstance(fc, nn.Linear):
        raise SmileError(f"timm model {net.pretrained_cfg.get('architecture')}: its classifier {key!r} is "
                         f"{type(fc).__name__}, not a linear layer; smile-ray needs one")
    pooled = not _head_is_pooling(net)
    parent, _, child = key.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, nn.Identity())
    stages = []
    for info in net.feature_info:
        module = info["module"].replace("_", ".") if not _has(net, info["module"]) else info["module"]
        if _has(net, module) and any(isinstance(m, nn.Conv2d) for m in net.get_submodule(module).modules()):
            stages.append(f"net.{module}")
    return TimmBody(net, pooled), fc, stages


def _has(net: nn.Module, name: str) -> bool:
    try:
        net.get_submodule(name)
        return True
    except AttributeError:
        return False


def _converter(classifier: str):
    prefix = classifier + "."

    def convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for key, value in state.items():
            if key.startswith(prefix):
                key = "fc." + key[len(prefix):]
            elif not key.startswith(("net.", "fc.")):
                key = "net." + key
            out[key] = value
        return out

    return convert


def _cached_file(cfg: dict) -> tuple[Path, str]:
    """Where timm's weights of ``cfg`` are (or would be) cached, and where they come from."""
    hf = cfg.get("hf_hub_id")
    if hf:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        for file in HF_FILES:
            found = try_to_load_from_cache(hf, file)
            if isinstance(found, str):
                return Path(found), f"https://huggingface.co/{hf}"
        folder = Path(HF_HUB_CACHE) / f"models--{hf.replace('/', '--')}"
        return folder / "snapshots" / "<revision>" / HF_FILES[0], f"https://huggingface.co/{hf}"
    url = cfg.get("url") or ""
    if not url:
        raise SmileError(f"weights: timm publishes no weights for {cfg.get('architecture')}")
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0]), url


def spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of ``timm/<model name>``."""
    arch = _check(name)
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(arch) or timm.models.get_pretrained_cfg(arch.split(".")[0])
    cfg = cfg.to_dict() if cfg is not None else {}
    convert = _converter(cfg.get("classifier", "fc"))

    def build(num_source_classes: int):
        net = timm.create_model(arch, pretrained=False, num_classes=num_source_classes, drop_rate=0.0)
        body, fc, stages = _split(net)
        return declare_stages(body, stages), fc

    def pretrained(tag: str) -> Pretrained:
        if tag != "DEFAULT":
            raise SmileError(f"weights={tag}: a timm backbone takes weights=imagenet or DEFAULT (timm's weights of "
                             f"{name}; name another of its tags in the backbone, timm/<model>.<tag>), none, or a file")
        if not cfg.get("hf_hub_id") and not cfg.get("url"):
            raise SmileError(f"weights={tag}: timm publishes no weights for {name}")
        file, source = _cached_file(cfg)

        def download() -> None:
            timm.create_model(arch, pretrained=True)  # timm downloads into its cache

        def read(path: Path) -> dict[str, Tensor]:
            found, _ = _cached_file(cfg)  # after a download, the file's real path
            net = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(found)))
            return convert(net.state_dict())

        mean, std = tuple(cfg.get("mean", ())), tuple(cfg.get("std", ()))
        return Pretrained(f"timm:{cfg.get('tag') or 'default'}", file, source, download,
                          (mean, std) if mean else None, read)

    norm = (tuple(cfg["mean"]), tuple(cfg["std"])) if cfg.get("mean") else None
    return BackboneSpec(build, in_channels=3, source_classes=int(cfg.get("num_classes") or 1000), convert=convert,
                        input_norm=norm, pretrained=pretrained)
