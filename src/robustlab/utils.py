"""Small shared helpers: progress bars that stay quiet off a terminal, thread settings, seed mixing."""
from __future__ import annotations

import contextlib
import os
import platform
import sys
from typing import Iterator


class _NullBar:
    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, **kwargs) -> None:
        return None


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool | None = None) -> Iterator:
    """A tqdm bar on an interactive terminal, nothing otherwise (CI logs, pipes, notebooks off)."""
    if enabled is None:
        enabled = sys.stderr.isatty() and not os.environ.get("CI")
    if not enabled:
        yield _NullBar()
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def set_threads(n: int | None) -> None:
    """Pin torch's intra-op threads (2-core machines oversubscribe badly when anything else runs)."""
    import torch

    if n is not None:
        if n < 1:
            from robustlab.errors import InputError

            raise InputError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def mix_seed(*ints: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix-style), independent of Python's hash salt: the seed of
    (run seed, epoch, step, purpose) for every generator the training loop hands out."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h = (h ^ (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def machine_description() -> str:
    """The machine a number was measured on, for reports: CPU, torch threads, GPU."""
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {dev}"
