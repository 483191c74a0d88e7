"""Small shared helpers: progress bars that stay quiet off a terminal, thread settings."""
from __future__ import annotations

import contextlib
import os
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
            raise ValueError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)
