"""Input checks shared by attacks, evaluation and training.

Errors are `InputError` (a ValueError) / `InputTypeError` (also a TypeError) naming the bad argument; never
`assert` (it vanishes under -O).
Each check costs at most one host-device sync and runs once per call, never inside attack loops.
"""
from __future__ import annotations

import ast
import math
import re
from typing import Any

import torch
from torch import Tensor

from robustlab.errors import AttackSpecError, DeviceError, InputError, InputTypeError, OptionError, RobustlabError

# -- key=value: the one parser of attack specs, config overrides, --robustbench-info and LABEL=PATH ----------------
_FRACTION = re.compile(r"^\s*(-?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def parse_value(text: str) -> Any:
    """A value as written on a command line: a Python literal (never evaluated as code), 'a/b' as a fraction
    (8/255), true/false/none in any case, else the text itself."""
    m = _FRACTION.match(text)
    if m:
        den = float(m.group(2))
        if den == 0:
            raise AttackSpecError(f"division by zero in {text!r}")
        return float(m.group(1)) / den
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text.strip()


def parse_assignment(item: str, where: str, error: type[RobustlabError] = InputError,
                     literal: bool = True) -> tuple[str, Any]:
    """'key=value' -> (key, value): the value parsed as a literal (`parse_value`), or the stripped text with
    literal=False; a missing '=', an empty key or an empty value is an `error` naming the item and `where`."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise error(f"bad option {item!r} in {where}; expected key=value")
    if not value.strip():
        raise error(f"option {key!r} has no value in {where}; expected {key}=VALUE")
    return key, (parse_value(value) if literal else value.strip())


def check_images(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputTypeError(f"{name} must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if x.dim() != 4:
        raise InputError(f"{name} must have shape (N, C, H, W), got rank {x.dim()} shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError(f"{name} is an empty batch")
    stats = torch.stack([torch.isfinite(x).all().to(x.dtype), x.min(), x.max()]).tolist()
    if stats[0] < 1:
        raise InputError(f"{name} contains NaN or inf values")
    if stats[1] < 0 or stats[2] > 1:
        raise InputError(
            f"{name} must lie in [0, 1] (normalisation belongs inside the model); got min {stats[1]:.4g}, "
            f"max {stats[2]:.4g}"
        )


def check_labels(y: Tensor, n: int, name: str = "y", num_classes: int | None = None) -> None:
    if not isinstance(y, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise InputTypeError(f"{name} must be an integer tensor of class indices, got dtype {y.dtype}")
    if y.dim() != 1:
        raise InputError(f"{name} must have shape (N,), got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise InputError(f"{name} has {y.shape[0]} labels but the batch has {n} images")
    lo, hi = torch.stack([y.min(), y.max()]).tolist()
    if lo < 0:
        raise InputError(f"{name} has a negative label ({lo})")
    if num_classes is not None and hi >= num_classes:
        raise InputError(f"{name} has label {hi} but the model outputs {num_classes} classes (valid: 0..{num_classes - 1})")


def check_eps(eps: float | Tensor, name: str = "eps") -> None:
    if isinstance(eps, Tensor):
        if not torch.isfinite(eps).all() or (eps < 0).any():
            raise InputError(f"{name} must be finite and >= 0, got a tensor with min {eps.min().item():.4g}")
        return
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise InputTypeError(f"{name} must be a number or a tensor, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise InputError(f"{name} must be finite and >= 0, got {eps}")


def check_positive_int(value: int, name: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")


def check_positive(value: float, name: str, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputTypeError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")


def available_devices() -> list[str]:
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str | torch.device) -> torch.device:
    """A torch.device that exists on this machine; DeviceError naming the available ones otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"unknown device {device!r} ({e}); available on this machine: "
                          f"{', '.join(available_devices())}") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
            raise DeviceError(f"device {str(device)!r} requested but CUDA is not available ({build}); available on "
                              f"this machine: {', '.join(available_devices())}")
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device {str(device)!r} does not exist: this machine has {n} CUDA device(s); available: "
                              f"{', '.join(available_devices())}")
    elif dev.type == "mps" and "mps" not in available_devices():
        raise DeviceError(f"device 'mps' is not available here; available: {', '.join(available_devices())}")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {str(device)!r} is not supported; available: {', '.join(available_devices())}")
    return dev


def reject_inapplicable(given: dict[str, tuple[object, object]], why: str) -> None:
    """OptionError for options set away from their default where they do not apply (they would be ignored).
    given: {name: (value, default)}; why: when they apply, e.g. "applies to the l1 norm only"."""
    set_ = [f"{k}={v!r}" for k, (v, d) in given.items() if v != d]
    if set_:
        raise OptionError(f"{', '.join(set_)} would be ignored: {why}")


def check_logits(out: object, n: int) -> Tensor:
    """The model's output must be a logits tensor (N, K); a tuple, a dict or probabilities-of-one-class are not."""
    if not isinstance(out, Tensor):
        what = type(out).__name__ + (f" of {len(out)}" if isinstance(out, (tuple, list)) else "")
        raise InputTypeError(f"the model must return a logits tensor of shape (N, K), got a {what}; wrap it so that "
                             "forward returns the logits only (e.g. lambda x: model(x)[0])")
    if out.dim() != 2 or out.shape[0] != n:
        raise InputError(f"the model must return logits of shape (N, K) = ({n}, K), got shape {tuple(out.shape)}")
    return out


def check_fits_model(model: torch.nn.Module, x: Tensor, name: str = "x") -> None:
    """Images of a robustlab model's expected channels and size (its config says); dtype of its weights."""
    config = getattr(model, "config", None)  # robustlab models record how they were built
    if isinstance(config, dict):
        c, size = config.get("in_channels"), config.get("input_size")
        want = (c, size, size)
        if c is not None and size is not None and tuple(x.shape[1:]) != want:
            raise InputError(f"{name} has images of shape {tuple(x.shape[1:])} but the {config.get('name', 'model')!r} "
                             f"model takes {want}: use data of the model's shape")
    p = next(model.parameters(), None)
    if p is not None and p.is_floating_point() and x.dtype != p.dtype:
        raise InputTypeError(f"{name} is {x.dtype} but the model's weights are {p.dtype}; convert the images "
                             f"(x.to({p.dtype}))")
