"""Every seeded random draw in robustlab goes through here, so that no generator crosses devices.

PyTorch refuses a draw whose generator lives on another device than the tensor it fills (a CUDA generator
for a CPU tensor, e.g. per-image seeds drawn with the Trainer's step generator on a GPU run); on a CPU-only
machine the mistake is invisible until the first GPU run. These wrappers take torch's arguments and check
`generator.device` against the device drawn on first, naming both, so a test on CPU can prove that every draw
states its device. The rule: data-side randomness (augmentation, orders, seeds) uses CPU generators;
device-side randomness (attack starts, noise) uses a generator on the device of the tensor it perturbs.
`tests/unit/test_rng.py` fails on a seeded draw anywhere else in the package.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class GeneratorDeviceError(RuntimeError):
    """A draw's generator lives on another device than the tensor drawn (a bug, not a user error)."""


def same_device(generator_device: torch.device, device: torch.device) -> bool:
    """Whether a generator on generator_device may fill a tensor on device (cuda == cuda:current)."""
    if generator_device.type != device.type:
        return False
    if device.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (generator_device.index if generator_device.index is not None else current) == \
        (device.index if device.index is not None else current)


def check(generator: torch.Generator | None, device: Any = None) -> None:
    if generator is None:
        return
    target = torch.device(device) if device is not None else torch.get_default_device()
    if not same_device(generator.device, target):
        raise GeneratorDeviceError(f"a generator on {generator.device} cannot draw a tensor on {target}: draw "
                                   f"data-side randomness with a CPU generator and device-side randomness with a "
                                   f"generator on the tensor's device")


def rand(*size: Any, generator: torch.Generator | None, device: Any = None, dtype: torch.dtype | None = None) -> Tensor:
    check(generator, device)
    return torch.rand(*size, generator=generator, device=device, dtype=dtype)


def randn(*size: Any, generator: torch.Generator | None, device: Any = None, dtype: torch.dtype | None = None) -> Tensor:
    check(generator, device)
    return torch.randn(*size, generator=generator, device=device, dtype=dtype)


def randint(*args: Any, generator: torch.Generator | None, device: Any = None, dtype: torch.dtype | None = None) -> Tensor:
    """randint(high, size) or randint(low, high, size), as torch's."""
    check(generator, device)
    return torch.randint(*args, generator=generator, device=device, dtype=dtype or torch.int64)


def randperm(n: int, *, generator: torch.Generator | None, device: Any = None) -> Tensor:
    check(generator, device)
    return torch.randperm(n, generator=generator, device=device)


def device_generator(device: Any, seed: int) -> torch.Generator:
    """The generator of device-side randomness (attack starts, noise, on-device augmentation) on `device`: every
    draw from it names the device of the tensor it perturbs."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))
