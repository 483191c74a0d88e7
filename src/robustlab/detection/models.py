"""SSD detectors in plain torch (spec cwat.md 1.1, 1.8): SSD300 with a VGG16-BN or ResNet-50 backbone,
and the CPU variants TinySSD-96 / TinySSD-128.

Every detector takes pixel-scale RGB images in [0, 255] and subtracts its per-channel mean itself (no
division by a std), so attacks and their budgets live on the 0-255 scale. `forward(x)` returns raw
`(loc (B, P, 4), conf (B, P, K + 1))`; the priors are a buffer in the same (source, row, column, anchor)
order as the head outputs. Post-processing is a separate function (`robustlab.detection.postprocess`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.detection.boxes import SSD300_COCO, SSD300_VOC, TINYSSD_96, make_priors
from robustlab.errors import InputError, MissingFileError
from robustlab.registry import MODELS

VOC_MEAN_RGB = (123.0, 117.0, 104.0)
TINYSSD_128 = dict(feature_maps=(16, 8, 4, 2, 1), steps=(8, 16, 32, 64, 128), min_sizes=(16, 32, 54, 76, 98),
                   max_sizes=(32, 54, 76, 98, 128), aspect_ratios=((2,), (2, 3), (2, 3), (2,), (2,)), image_size=128)


def anchors_per_location(aspect_ratios: Sequence[Sequence[int]]) -> list[int]:
    return [2 + 2 * len(a) for a in aspect_ratios]


class L2Norm(nn.Module):
    """Per-location L2 normalisation over channels times a learnable per-channel scale (SSD's conv4_3)."""

    def __init__(self, channels: int, scale: float = 20.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        return x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) * self.weight.view(1, -1, 1, 1)


class Detector(nn.Module):
    """mean subtraction -> backbone (a list of source feature maps) -> per-source loc/conf heads."""

    task = "detection"
    mean: Tensor
    priors: Tensor

    def __init__(self, backbone: nn.Module, source_channels: Sequence[int], num_classes: int, prior_cfg: dict,
                 mean: Sequence[float], config: dict[str, Any]) -> None:
        super().__init__()
        if num_classes < 1:
            raise InputError(f"num_classes (foreground classes) must be >= 1, got {num_classes}")
        if len(mean) != 3:
            raise InputError(f"mean needs 3 entries (RGB, pixel scale), got {list(mean)}")
        self.num_classes = num_classes
        self.image_size = int(prior_cfg["image_size"])
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1))
        self.register_buffer("priors", make_priors(**prior_cfg))
        self.backbone = backbone
        anchors = anchors_per_location(prior_cfg["aspect_ratios"])
        if len(anchors) != len(source_channels):
            raise InputError("one prior configuration per source feature map is needed")
        self.loc = nn.ModuleList(nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(source_channels, anchors))
        self.conf = nn.ModuleList(nn.Conv2d(c, a * (num_classes + 1), 3, padding=1)
                                  for c, a in zip(source_channels, anchors))
        for m in [*self.loc, *self.conf]:
            assert isinstance(m, nn.Conv2d) and m.bias is not None
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        self.config = config

    @property
    def class_names(self) -> list[str]:
        return list(self.config.get("class_names") or [str(i) for i in range(self.num_classes)])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputError(f"detector input must be (B, 3, H, W) RGB, got {tuple(x.shape)}")
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise InputError(f"{self.config['name']} takes {self.image_size}x{self.image_size} images, got "
                             f"{x.shape[-2]}x{x.shape[-1]} (resize them, e.g. with the dataset's image_size)")
        sources = self.backbone(x - self.mean)
        b = x.shape[0]
        loc = torch.cat([h(s).permute(0, 2, 3, 1).reshape(b, -1, 4) for h, s in zip(self.loc, sources)], 1)
        conf = torch.cat([h(s).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes + 1)
                          for h, s in zip(self.conf, sources)], 1)
        return loc, conf


DETECTOR_INTERFACE = ("the one-stage detector interface (docs/detection.md): task = 'detection', num_classes (K, "
                      "int), priors ((P, 4) tensor, centre-form boxes in [0, 1]), optional class_names (K names); "
                      "forward(x) on (B, 3, H, W) pixel-scale images in [0, 255] returns (loc (B, P, 4) SSD offsets, "
                      "conf (B, P, K + 1) logits, class 0 the background)")


def class_names_of(model: nn.Module) -> list[str]:
    """A detector's class names: its own, else '0'..'K-1'."""
    names = getattr(model, "class_names", None)
    k: Any = model.num_classes  # an int attribute (check_detector), not a submodule
    return list(names) if names else [str(i) for i in range(int(k))]


def check_detector(model: nn.Module, what: str, x: Tensor | None = None) -> None:
    """A model robustlab can evaluate as a detector: the attributes of the one-stage interface and, given images
    x (pixel scale), one forward pass returning (loc, conf) of the shapes its priors and classes imply. One
    InputError naming what is missing or wrong."""
    if getattr(model, "task", None) != "detection":
        raise InputError(f"{what} does not implement the one-stage detector interface: missing task = 'detection' "
                         f"(a class attribute). {DETECTOR_INTERFACE}")
    problems = []
    k = getattr(model, "num_classes", None)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        problems.append(f"num_classes, an int >= 1 (has {k!r})")
    priors = getattr(model, "priors", None)
    if not isinstance(priors, Tensor) or priors.dim() != 2 or priors.shape[1] != 4:
        problems.append("priors, a (P, 4) tensor" + (f" (has shape {tuple(priors.shape)})"
                                                     if isinstance(priors, Tensor) else ""))
    names = getattr(model, "class_names", None)
    if names is not None and isinstance(k, int) and len(list(names)) != k:
        problems.append(f"class_names, {k} names (has {len(list(names))})")
    if problems:
        raise InputError(f"{what} does not implement the one-stage detector interface: missing or wrong "
                         f"{'; '.join(problems)}. {DETECTOR_INTERFACE}")
    if x is None:
        return
    assert isinstance(priors, Tensor) and isinstance(k, int)
    with torch.no_grad():
        out = model(x[:1])
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(o, Tensor) for o in out)):
        raise InputError(f"{what}: forward returns {type(out).__name__}, not (loc, conf). {DETECTOR_INTERFACE}")
    loc, conf = out
    p = priors.shape[0]
    if tuple(loc.shape) != (1, p, 4) or tuple(conf.shape) != (1, p, k + 1):
        raise InputError(f"{what}: forward returns loc {tuple(loc.shape)} and conf {tuple(conf.shape)} on one image; "
                         f"its {p} priors and {k} classes imply (1, {p}, 4) and (1, {p}, {k + 1})")


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1, bn: bool = True,
         dilation: int = 1) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return layers + [nn.ReLU(inplace=True)]


# -- TinySSD ---------------------------------------------------------------------------------------------
class _TinyBackbone(nn.Module):
    """The CPU backbone of cwat.md 1.8 (about 0.57 M parameters with K = 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_cbr(3, 16, stride=2), *_cbr(16, 16), nn.MaxPool2d(2),
                                  *_cbr(16, 32), nn.MaxPool2d(2), *_cbr(32, 64), *_cbr(64, 64))
        self.b4 = nn.Sequential(nn.MaxPool2d(2), *_cbr(64, 96))
        self.extras = nn.ModuleList([
            nn.Sequential(*_cbr(96, 64, k=1, padding=0), *_cbr(64, 96, stride=2)),
            nn.Sequential(*_cbr(96, 64, k=1, padding=0), *_cbr(64, 96, stride=2)),
            nn.Sequential(*_cbr(96, 64, k=1, padding=0), *_cbr(64, 96, k=2, padding=0)),
        ])

    def forward(self, x: Tensor) -> list[Tensor]:
        s1 = self.stem(x)
        out = [s1, self.b4(s1)]
        for e in self.extras:
            out.append(e(out[-1]))
        return out


def _detector_factory(f):
    """Tags a model factory as building a detector (the Trainer checks data, model and method agree)."""
    f.task = "detection"
    return f


def _check_size(name: str, input_size: int | None, expected: int) -> None:
    if input_size is not None and int(input_size) != expected:
        raise InputError(f"{name} is a fixed-size model for {expected}x{expected} images, got input_size={input_size}")


def _mean(mean) -> list[float]:
    return list(VOC_MEAN_RGB) if mean is None else [float(m) for m in mean]


def _tinyssd(name: str, size: int, priors: dict, num_classes: int, input_size: int | None, mean,
             class_names) -> Detector:
    _check_size(name, input_size, size)
    cfg = {"name": name, "num_classes": num_classes, "in_channels": 3, "input_size": size, "mean": _mean(mean),
           "class_names": class_names}
    return Detector(_TinyBackbone(), (64, 96, 96, 96, 96), num_classes, priors, _mean(mean), cfg)


@MODELS.register("tinyssd-96")
@_detector_factory
def tinyssd_96(num_classes: int = 10, in_channels: int = 3, input_size: int | None = 96, mean=None,
               class_names=None) -> Detector:
    """TinySSD-96: CPU SSD for 96x96 MNIST-Det (5 sources, 866 priors)."""
    return _tinyssd("tinyssd-96", 96, TINYSSD_96, num_classes, input_size, mean, class_names)


@MODELS.register("tinyssd-128")
@_detector_factory
def tinyssd_128(num_classes: int = 10, in_channels: int = 3, input_size: int | None = 128, mean=None,
                class_names=None) -> Detector:
    """TinySSD-128: the TinySSD layers on 128x128 inputs for denser coco-like scenes (1,524 priors)."""
    return _tinyssd("tinyssd-128", 128, TINYSSD_128, num_classes, input_size, mean, class_names)


# -- SSD300 with VGG16-BN ------------------------------------------------------------------------------
_VGG16: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512)


class _VGGBackbone(nn.Module):
    """VGG16-BN base in torchvision's `features.{i}` layout (so ImageNet weights load by key), pool5 3x3/1,
    dilated conv6 + conv7, and the SSD300 extras. Sources: L2Norm(conv4_3), conv7, conv8_2 .. conv11_2."""

    SOURCES = (512, 1024, 512, 256, 256, 256)

    def __init__(self, extras_bn: bool = True, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16:
            if isinstance(v, str):  # "M": max-pool, "C": max-pool with ceil mode
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=(v == "C")))
            else:
                c = _scaled(v, width)
                layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                cin = c
        self.features = nn.Sequential(*layers)  # conv4_3's ReLU is features.32, pool4 features.33
        self.split = 33
        self.l2norm = L2Norm(_scaled(512, width), 20.0)
        c512, c1024 = _scaled(512, width), _scaled(1024, width)
        self.fc = nn.Sequential(nn.MaxPool2d(3, 1, 1), *_cbr(c512, c1024, padding=6, dilation=6, bn=extras_bn),
                                *_cbr(c1024, c1024, k=1, padding=0, bn=extras_bn))
        spec = [(1024, 256, 512, 2, 1), (512, 128, 256, 2, 1), (256, 128, 256, 1, 0), (256, 128, 256, 1, 0)]
        self.extras = nn.ModuleList(
            nn.Sequential(*_cbr(_scaled(a, width), _scaled(b, width), k=1, padding=0, bn=extras_bn),
                          *_cbr(_scaled(b, width), _scaled(c, width), stride=s, padding=p, bn=extras_bn))
            for a, b, c, s, p in spec)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.features[: self.split](x)
        out = [self.l2norm(h)]
        h = self.fc(self.features[self.split:](h))
        out.append(h)
        for e in self.extras:
            h = e(h)
            out.append(h)
        return out


def _scaled(channels: int, width: float) -> int:
    """Channel count times the width multiplier (`--smoke` runs SSD300 thin on a CPU; 1.0 is the paper's)."""
    return max(4, int(round(channels * width)))


def _check_width(name: str, width: float) -> None:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 1:
        raise InputError(f"{name} width must be a multiplier in (0, 1] (1 = the paper's channels), got {width!r}")


def _ssd300_priors(priors: str) -> dict:
    if priors not in ("voc", "coco"):
        raise InputError(f"priors must be 'voc' or 'coco', got {priors!r}")
    return SSD300_VOC if priors == "voc" else SSD300_COCO


@MODELS.register("ssd300-vgg16")
@_detector_factory
def ssd300_vgg16(num_classes: int = 20, in_channels: int = 3, input_size: int | None = 300, mean=None,
                 class_names=None, priors: str = "voc", extras_bn: bool = True, width: float = 1.0) -> Detector:
    """SSD300 (Liu et al. 2016) with a VGG16-BN backbone, the CWAT seed's test bed (8,732 priors); `width`
    scales every channel count (1.0: the paper's network)."""
    _check_size("ssd300-vgg16", input_size, 300)
    _check_width("ssd300-vgg16", width)
    cfg = {"name": "ssd300-vgg16", "num_classes": num_classes, "in_channels": 3, "input_size": 300,
           "mean": _mean(mean), "class_names": class_names, "priors": priors, "extras_bn": extras_bn}
    if width != 1:
        cfg["width"] = width
    return Detector(_VGGBackbone(extras_bn, width), tuple(_scaled(c, width) for c in _VGGBackbone.SOURCES),
                    num_classes, _ssd300_priors(priors), _mean(mean), cfg)


# -- SSD300 with ResNet-50 -------------------------------------------------------------------------------
class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _ResNet50Backbone(nn.Module):
    """ResNet-50 in torchvision's key layout (conv1, bn1, layer1..4). Sources for a 300x300 input: layer2 (38x38),
    layer3 (19x19), layer4 (10x10), then three SSD extras (5x5, 3x3, 1x1), the SSD300 prior grid."""

    SOURCES = (512, 1024, 2048, 512, 256, 256)

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        stem = _scaled(64, width)
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        cin = stem
        for i, (planes, n, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1):
            blocks = []
            for j in range(n):
                blocks.append(_Bottleneck(cin, _scaled(planes, width), stride if j == 0 else 1))
                cin = _scaled(planes, width) * 4
            setattr(self, f"layer{i}", nn.Sequential(*blocks))  # torchvision's key names: layer1..layer4
        def w(c: int) -> int:
            return _scaled(c, width)

        spec = [(cin, w(256), w(512), 2, 1), (w(512), w(128), w(256), 1, 0), (w(256), w(128), w(256), 1, 0)]
        self.extras = nn.ModuleList(
            nn.Sequential(*_cbr(a, b, k=1, padding=0), *_cbr(b, c, stride=s, padding=p)) for a, b, c, s, p in spec)

    def forward(self, x: Tensor) -> list[Tensor]:
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        layer1, layer2, layer3, layer4 = (self.get_submodule(f"layer{i}") for i in range(1, 5))
        h = layer1(h)
        s1 = layer2(h)
        s2 = layer3(s1)
        s3 = layer4(s2)
        out = [s1, s2, s3]
        for e in self.extras:
            out.append(e(out[-1]))
        return out


@MODELS.register("ssd300-resnet50")
@_detector_factory
def ssd300_resnet50(num_classes: int = 20, in_channels: int = 3, input_size: int | None = 300, mean=None,
                    class_names=None, priors: str = "voc", width: float = 1.0) -> Detector:
    """SSD300 with a ResNet-50 backbone (the seed's Table 4; 8,732 priors); `width` scales every channel count."""
    _check_size("ssd300-resnet50", input_size, 300)
    _check_width("ssd300-resnet50", width)
    cfg = {"name": "ssd300-resnet50", "num_classes": num_classes, "in_channels": 3, "input_size": 300,
           "mean": _mean(mean), "class_names": class_names, "priors": priors}
    if width != 1:
        cfg["width"] = width
    sources = (_scaled(128, width) * 4, _scaled(256, width) * 4, _scaled(512, width) * 4,
               *(_scaled(c, width) for c in _ResNet50Backbone.SOURCES[3:]))
    return Detector(_ResNet50Backbone(width), sources, num_classes, _ssd300_priors(priors), _mean(mean), cfg)


# `robustlab train --smoke` runs SSD300 at 1/8 of its channels on a CPU (same layers, priors and input size)
ssd300_vgg16.smoke_kwargs = {"width": 0.125}  # type: ignore[attr-defined]
ssd300_resnet50.smoke_kwargs = {"width": 0.125}  # type: ignore[attr-defined]

IMAGENET_STD = (0.229, 0.224, 0.225)


def load_imagenet_backbone(model: Detector, path: str | Path) -> list[str]:
    """Initialise an SSD300 backbone from a torchvision-format ImageNet state dict (`vgg16_bn` keys
    `features.{i}.*`, `resnet50` keys `conv1.*`, `layer{i}.*`). The file is read with `weights_only=True`
    (or as safetensors); nothing in it is executed. The first conv's input channel c is divided by 255*std_c,
    because torchvision weights expect (x/255 - m)/s while robustlab feeds x - 255*m. Returns the loaded keys."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"backbone weights {path} do not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refused or file damaged: say which file
        raise InputError(f"cannot read backbone weights {path}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    name = model.config["name"]
    if name == "ssd300-vgg16":
        first, prefix = "features.0.weight", "features."
    elif name == "ssd300-resnet50":
        first, prefix = "conv1.weight", ""
    else:
        raise InputError(f"ImageNet backbone weights apply to ssd300-vgg16 / ssd300-resnet50, not {name}")
    own = model.backbone.state_dict()
    wanted = {k for k in own if not k.startswith(("extras.", "fc.", "l2norm."))}
    if prefix:
        wanted = {k for k in wanted if k.startswith(prefix)}
    missing = sorted(k for k in wanted if k not in state)
    if missing:
        raise InputError(f"{path} is not a torchvision {name.split('-')[1]} state dict: missing {missing[:3]}...")
    loaded = {}
    for k in sorted(wanted):
        v = state[k]
        if not isinstance(v, Tensor) or v.shape != own[k].shape:
            raise InputError(f"{path}: {k} has shape {getattr(v, 'shape', None)}, expected {tuple(own[k].shape)}")
        if k == first:
            v = v / (255.0 * torch.tensor(IMAGENET_STD, dtype=v.dtype)).view(1, 3, 1, 1)
        loaded[k] = v
    model.backbone.load_state_dict(loaded, strict=False)
    return sorted(loaded)
