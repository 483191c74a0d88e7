"""Small shared helpers: progress (a bar on a terminal, a line now and then in logs), thread settings, seed mixing,
the machine's description, compiling a module."""
from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
import time
from typing import Iterator

import torch
from torch import nn


class _NullBar:
    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, **kwargs) -> None:
        return None


class _LogBar:
    """Progress for logs (no terminal): one line on stderr at least every `interval` seconds while the job runs
    (a heartbeat thread prints when nothing else did, so a long attack inside one batch is not silent) and one at
    the end, so a batch job's log shows that a long evaluation or epoch is moving."""

    def __init__(self, total: int | None, desc: str, interval: float) -> None:
        self.total, self.desc, self.interval = total, desc, interval
        self.n = 0
        self.postfix: dict[str, object] = {}
        self.start = self.last = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name=f"progress {desc}")
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(self.interval / 4, 0.05)):
            self._maybe_print()

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        eta = ""
        if self.total and self.n:
            eta = f", about {elapsed * (self.total - self.n) / self.n:.0f} s left"
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {done}{extra} ({elapsed:.0f} s{eta})"

    def _maybe_print(self) -> None:
        with self._lock:  # the heartbeat thread and the job's own updates
            now = time.monotonic()
            if now - self.last < self.interval:
                return
            self.last = now
        print(self._line(), file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._maybe_print()

    def set_postfix(self, **kwargs) -> None:
        """What runs now (an attack, how many points remain robust): shown with the next line."""
        self.postfix.update(kwargs)
        self._maybe_print()

    def close(self) -> None:
        self._stop.set()
        self._beat.join()
        if time.monotonic() - self.start >= self.interval:  # short jobs stay silent
            print(self._line(), file=sys.stderr, flush=True)


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool | None = None) -> Iterator:
    """Progress of a long job: a tqdm bar on an interactive terminal, a line every ROBUSTLAB_PROGRESS_SECONDS (30)
    seconds otherwise (logs of batch jobs), nothing with enabled=False (--quiet)."""
    if enabled is False:
        yield _NullBar()
        return
    if not sys.stderr.isatty():
        bar = _LogBar(total, desc, float(os.environ.get("ROBUSTLAB_PROGRESS_SECONDS", "30")))
        try:
            yield bar
        finally:
            bar.close()
        return
    from tqdm import tqdm

    tbar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    try:
        yield tbar
    finally:
        tbar.close()


def set_threads(n: int | None) -> None:
    """Pin torch's intra-op threads (2-core machines oversubscribe badly when anything else runs)."""
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
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {dev}"


def compile_module(model: nn.Module, **kwargs) -> nn.Module:
    """`torch.compile(model, **kwargs)` for robustlab's two users (attacks, the trainer): both take several gradients
    of one forward (FAB, DeepFool, C&W, MMA: retain_graph / create_graph), which AOTAutograd's donated buffers
    forbid, so they are switched off; the switch is process-wide (read at backward time) and only costs memory
    reuse."""
    import torch._functorch.config  # not imported by `import torch` until something compiles

    torch._functorch.config.donated_buffer = False
    return torch.compile(model, **kwargs)  # type: ignore[return-value]
