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


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state for a safetensors file: (tensors, meta). Each parameter's tensor state goes to
    tensors[f"{prefix}/{param index}/{key}"] (on the host, contiguous); meta (JSON-able) holds the rest: the param
    groups and the state values that are not tensors (None, numbers). The one serialiser of optimiser state: the
    Trainer's own optimiser and the methods' inner ones (the critic's, MNG-AC's generator's) use it."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}/{pid}/{k}"] = v.detach().cpu().contiguous()
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                           meta: dict | None, device: torch.device | str | None = None) -> None:
    """The inverse of `optimizer_tensors`: the state from tensors[f"{prefix}/..."] (moved to `device`) and meta;
    without meta, the optimiser keeps its own param groups."""
    state: dict[int, dict] = {int(pid): dict(st) for pid, st in (meta or {}).get("state", {}).items()}
    for key, v in tensors.items():
        if key.startswith(prefix + "/"):
            pid, _, name = key[len(prefix) + 1:].partition("/")
            state.setdefault(int(pid), {})[name] = v.to(device) if device is not None else v
    groups = (meta or {}).get("param_groups") or optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def json_tensor(obj: object) -> torch.Tensor:
    """A JSON-able object as a uint8 tensor (for safetensors files, which hold tensors only)."""
    import json

    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)


def from_json_tensor(t: torch.Tensor) -> object:
    import json

    return json.loads(bytes(t.tolist()).decode())


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
