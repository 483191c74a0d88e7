"""Classifier zoo: mlp (3x1200), lenet5, small-cnn, preact-resnet18, resnet18, wrn(depth, width).

Every factory takes `in_channels`, `num_classes`, `input_size` and optional `mean`/`std` (the
normalisation lives inside the model as buffers, so attacks work in [0, 1] pixel space).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.errors import DataError, InputError
from robustlab.registry import MODELS


class Normalize(nn.Module):
    """(x - mean) / std with per-channel buffers (saved in checkpoints, never trained)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """normalize -> body. `config` records how to rebuild the model from a checkpoint."""

    def __init__(self, body: nn.Module, in_channels: int, mean, std, config: dict[str, Any]) -> None:
        super().__init__()
        mean = [0.0] * in_channels if mean is None else list(mean)
        std = [1.0] * in_channels if std is None else list(std)
        if len(mean) != in_channels or len(std) != in_channels:
            raise InputError(f"mean/std need {in_channels} entries (one per channel), got {len(mean)}/{len(std)}")
        if any(s <= 0 for s in std):
            raise InputError(f"std entries must be > 0, got {std}")
        self.normalize = Normalize(mean, std)
        self.body = body
        self.config = config

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.normalize.mean.shape[1]:
            # the per-channel normalisation would broadcast 1-channel images to 3 channels without a word
            raise DataError(f"the {self.config.get('name', 'model')!r} model takes (N, {self.normalize.mean.shape[1]}, "
                            f"H, W) images, got shape {tuple(x.shape)}")
        return self.body(self.normalize(x))


def _conv_out(size: int, k: int, s: int = 1, p: int = 0) -> int:
    return (size + 2 * p - k) // s + 1


def _make(name: str, body: nn.Module, in_channels: int, mean, std, **config: Any) -> Classifier:
    return Classifier(body, in_channels, mean, std, {"name": name, "in_channels": in_channels, "mean": mean,
                                                      "std": std, **config})


def he_init_(module: nn.Module) -> None:
    """He ("MSRA") normal weights with fan-in scaling and zero biases, on every Linear and Conv2d: the critic
    paper's initialisation (critic.md 2.1). PyTorch's default is a uniform with a smaller variance."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_init(init: str) -> None:
    if init not in ("default", "he"):
        raise InputError(f"init must be 'default' (PyTorch's) or 'he', got {init!r}")


@MODELS.register("mlp")
def mlp(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, hidden: int = 1200, depth: int = 3,
        init: str = "default", mean=None, std=None) -> Classifier:
    """Fully connected ReLU network, `depth` hidden layers of `hidden` units (3x1200 as in the critic paper)."""
    _check_init(init)
    d = in_channels * input_size * input_size
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    layers.append(nn.Linear(d, num_classes))
    body = nn.Sequential(*layers)
    if init == "he":
        he_init_(body)
    return _make("mlp", body, in_channels, mean, std, num_classes=num_classes,
                 input_size=input_size, hidden=hidden, depth=depth, init=init)


@MODELS.register("lenet5")
def lenet5(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, channels: Sequence[int] = (6, 16),
           hidden: Sequence[int] = (120, 84), padding: int = 2, init: str = "default", mean=None,
           std=None) -> Classifier:
    """LeNet-5: conv(5x5)-pool-conv(5x5)-pool-FC...-FC (ReLU, max pooling). Default: the classic 6/16 filters,
    first conv padded by 2, FC 120-84; the critic paper's variant is channels [32, 64], hidden [512], padding 0."""
    _check_init(init)
    if len(channels) != 2 or any(int(c) < 1 for c in channels):
        raise InputError(f"lenet5 channels must be two positive filter counts, got {channels!r}")
    s = _conv_out(input_size, 5, p=padding) // 2
    s = _conv_out(s, 5) // 2
    if s < 1:
        raise InputError(f"lenet5 (first conv padding {padding}) needs a larger input than {input_size}x{input_size}")
    c1, c2 = int(channels[0]), int(channels[1])
    layers: list[nn.Module] = [nn.Conv2d(in_channels, c1, 5, padding=padding), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()]
    d = c2 * s * s
    for h in hidden:
        layers += [nn.Linear(d, int(h)), nn.ReLU()]
        d = int(h)
    layers.append(nn.Linear(d, num_classes))
    body = nn.Sequential(*layers)
    if init == "he":
        he_init_(body)
    return _make("lenet5", body, in_channels, mean, std, num_classes=num_classes, input_size=input_size,
                 channels=[c1, c2], hidden=[int(h) for h in hidden], padding=padding, init=init)


@MODELS.register("small-cnn")
def small_cnn(in_channels: int = 1, num_classes: int = 10, input_size: int = 28, width: int = 32,
              hidden: int = 200, mean=None, std=None) -> Classifier:
    """TRADES' SmallCNN for MNIST (conv w,w,2w,2w with pooling, fc hidden x2); `width` scales it down for CPU."""
    w = width
    s = _conv_out(_conv_out(input_size, 3), 3) // 2
    s = _conv_out(_conv_out(s, 3), 3) // 2
    if s < 1:
        raise InputError(f"small-cnn needs input_size >= 16, got {input_size}")
    body = nn.Sequential(
        nn.Conv2d(in_channels, w, 3), nn.ReLU(), nn.Conv2d(w, w, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * w * s * s, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes))
    return _make("small-cnn", body, in_channels, mean, std, num_classes=num_classes, input_size=input_size,
                 width=width, hidden=hidden)


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _ResNet(nn.Module):
    def __init__(self, block, preact: bool, in_channels: int, num_classes: int, width: int = 64,
                 blocks: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.preact = preact
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.stem_bn = nn.Identity() if preact else nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(block(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.final_bn = nn.BatchNorm2d(cin) if preact else nn.Identity()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.stem(x)
        out = F.relu(self.stem_bn(out)) if not self.preact else out
        out = self.layers(out)
        out = F.relu(self.final_bn(out)) if self.preact else out
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@MODELS.register("preact-resnet18")
def preact_resnet18(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: int = 64,
                    mean=None, std=None) -> Classifier:
    """PreAct-ResNet-18 (He et al. 2016), CIFAR stem; `width` scales the channels (64 = standard)."""
    body = _ResNet(_PreActBlock, True, in_channels, num_classes, width)
    return _make("preact-resnet18", body, in_channels, mean, std, num_classes=num_classes, input_size=input_size,
                 width=width)


@MODELS.register("resnet18")
def resnet18(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, width: int = 64,
             mean=None, std=None) -> Classifier:
    """ResNet-18 with the CIFAR 3x3 stem; `width` scales the channels (64 = standard)."""
    body = _ResNet(_BasicBlock, False, in_channels, num_classes, width)
    return _make("resnet18", body, in_channels, mean, std, num_classes=num_classes, input_size=input_size,
                 width=width)


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout or stride != 1 else None

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        sc = self.shortcut(o) if self.shortcut is not None else x
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        if self.dropout > 0:
            o = F.dropout(o, p=self.dropout, training=self.training)
        return self.conv2(o) + sc


class _WRN(nn.Module):
    def __init__(self, depth: int, width: int, in_channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise InputError(f"WideResNet depth must be 6n+4 (16, 22, 28, 34, ...), got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        layers, cin = [], ch[0]
        for i in range(3):
            for j in range(n):
                layers.append(_WideBlock(cin, ch[i + 1], (1 if i == 0 else 2) if j == 0 else 1, dropout))
                cin = ch[i + 1]
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))


@MODELS.register("wrn")
def wrn(in_channels: int = 3, num_classes: int = 10, input_size: int = 32, depth: int = 28, width: int = 10,
        dropout: float = 0.0, mean=None, std=None) -> Classifier:
    """WideResNet-depth-width (Zagoruyko & Komodakis 2016), e.g. depth=34, width=10."""
    body = _WRN(depth, width, in_channels, num_classes, dropout)
    return _make("wrn", body, in_channels, mean, std, num_classes=num_classes, input_size=input_size, depth=depth,
                 width=width, dropout=dropout)


# `robustlab train --smoke` thins these models to run in seconds on a CPU (same layers, fewer channels)
mlp.smoke_kwargs = {"hidden": 64}  # type: ignore[attr-defined]
small_cnn.smoke_kwargs = {"width": 8, "hidden": 32}  # type: ignore[attr-defined]
preact_resnet18.smoke_kwargs = {"width": 8}  # type: ignore[attr-defined]
resnet18.smoke_kwargs = {"width": 8}  # type: ignore[attr-defined]
wrn.smoke_kwargs = {"width": 1}  # type: ignore[attr-defined]


def create_model(name: str, **kwargs: Any) -> Classifier:
    """Build a registered model; unknown names list the valid ones, unknown options raise TypeError."""
    return MODELS.create(name, **kwargs)


def model_config(model: nn.Module) -> dict[str, Any]:
    """How a robustlab model was built (name, in_channels, num_classes, input_size, ...); {} for other models."""
    config = getattr(model, "config", None)
    return config if isinstance(config, dict) else {}
