"""Expected peak GPU memory of every shipped GPU config, estimated on paper (no GPU needed), and written into
each config as a comment (`--write`). Measure instead with `robustlab train --config C --smoke --device cuda`
(peak GPU memory at the smoke batch) or the `cuda` tests once a GPU is available.

    python benchmarks/memory.py            # the table
    python benchmarks/memory.py --write    # also (re)write the comment line in configs/

The estimate: weights + gradients + optimizer state (fp32: 4 + 4 bytes per parameter, + 4 for SGD momentum or
8 for Adam), plus the activations autograd keeps for the training graph(s) of one batch: the bytes of every tensor
saved for backward in one image's forward pass (measured on the CPU at full size, per image), times the batch, times
the forward graphs the method's loss keeps (2 for losses on clean and adversarial outputs: TRADES, MART, ...; 3 for
the three-norm losses), halved under bf16 autocast; plus 20% for the allocator and 0.5 GiB for the CUDA context.
Attack iterations free their graph each step and stay below the training graph. Expect +-30%.
"""
from __future__ import annotations

import argparse
import functools
import re
from pathlib import Path

import torch

from robustlab.engine.config import load_config
from robustlab.models import create_model

ROOT = Path(__file__).resolve().parents[1]
INPUT = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "svhn": (3, 32, 10), "tiny-imagenet": (3, 64, 200),
         "voc": (3, 300, 20), "coco": (3, 300, 80)}
GRAPHS = {"trades": 2, "trades-inf": 2, "mart": 2, "part-t": 2, "part-m": 2, "sat-ac": 2, "mng-ac": 2,
          "adv-avg": 3, "adv-max": 3, "critic": 2}
TAG = "# peak GPU memory"


@functools.lru_cache(maxsize=None)
def activation_bytes(model: str, kwargs: tuple, channels: int, size: int, classes: int) -> tuple[int, int]:
    """(bytes autograd saves for one image's forward + loss, parameter count) at full size, fp32."""
    net = create_model(model, **{"in_channels": channels, "num_classes": classes, "input_size": size, **dict(kwargs)})
    net.train()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    x = torch.rand(2, channels, size, size) * (255 if size == 300 else 1)  # 2: BatchNorm needs two in training
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
        loss = sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,)))
    del loss
    return saved // 2, sum(p.numel() for p in net.parameters())


def estimate(path: Path) -> dict:
    cfg = load_config(path)
    channels, size, classes = INPUT[cfg.dataset]
    kwargs = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.model_kwargs.items()))
    act, params = activation_bytes(cfg.model, kwargs, channels, size, classes)
    state = params * (4 + 4 + (8 if cfg.optimizer == "adam" else 4))
    graphs = GRAPHS.get(cfg.method, 1)
    acts = act * cfg.batch_size * graphs * (0.5 if cfg.amp in ("bf16", "fp16") else 1.0)
    gib = (state + acts) * 1.2 / 2 ** 30 + 0.5
    return {"config": str(path.relative_to(ROOT)), "gib": gib, "batch": cfg.batch_size, "amp": cfg.amp,
            "params_m": params / 1e6, "graphs": graphs}


def write_comment(path: Path, row: dict) -> None:
    line = (f"{TAG} (estimated on paper by benchmarks/memory.py, not yet measured): ~{row['gib']:.1f} GiB at batch "
            f"{row['batch']}, amp {row['amp']}")
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith(TAG)]
    at = next((i for i, ln in enumerate(lines) if not ln.startswith("#")), len(lines))  # after the header comments
    lines.insert(at, line)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write the estimate into each GPU config as a comment")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    configs = [p for p in sorted((ROOT / "configs").rglob("*.yaml")) if re.search(r"^device: cuda", p.read_text(), re.M)]
    print("| config | params (M) | batch | amp | graphs | peak GiB (est.) |\n|---|---|---|---|---|---|")
    for p in configs:
        row = estimate(p)
        print(f"| {row['config']} | {row['params_m']:.1f} | {row['batch']} | {row['amp']} | {row['graphs']} | "
              f"{row['gib']:.1f} |")
        if args.write:
            write_comment(p, row)


if __name__ == "__main__":
    main()
