"""Attack throughput: images/s and passes per image for robustlab's PGD (linf, l2, l1), APGD-CE and the
AutoAttack panel, each next to a plain hand-written PyTorch loop doing the same passes in the same process.

    python benchmarks/attacks.py                      # CPU, small CNN on mnist5k
    python benchmarks/attacks.py --device cuda --amp bf16 --channels-last --model preact-resnet18

The ratio column is robustlab's images/s divided by the plain loop's (>= 0.95 is the target for PGD).
Timings are medians of --repeats runs after a warm-up. Results print as a Markdown table and go to
--json if given.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from robustlab.attacks import APGD, PGD, AutoAttack
from robustlab.data import load_dataset
from robustlab.models import create_model


def plain_pgd(model, x, y, eps, alpha, steps, norm):
    """Hand-written PGD: the loop a user would write, with the same passes as robustlab's."""
    x_adv = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1) if norm == "linf" else x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            if norm == "linf":
                x_adv = x_adv + alpha * g.sign()
                x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
            elif norm == "l2":
                x_adv = x_adv + alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                d = x_adv - x
                d = d * (eps / d.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(-1, 1, 1, 1)
                x_adv = (x + d).clamp(0, 1)
            else:  # l1: SLIDE step (top 1% coordinates) + sort-based projection
                a = g.flatten(1).abs()
                t = torch.quantile(a, 0.99, dim=1, keepdim=True)
                e = torch.where(a >= t, g.flatten(1).sign(), torch.zeros_like(a))
                e = e / e.abs().sum(1, keepdim=True).clamp_min(1)
                d = (x_adv - x).flatten(1) + alpha * e
                u = d.abs()
                mu, _ = u.sort(1, descending=True)
                cs = mu.cumsum(1)
                j = torch.arange(1, u.shape[1] + 1, device=x.device)
                rho = (mu - (cs - eps) / j > 0).sum(1).clamp_min(1)
                theta = (cs.gather(1, (rho - 1)[:, None]).squeeze(1) - eps) / rho
                proj = (u - theta[:, None]).clamp_min(0) * d.sign()
                d = torch.where((u.sum(1) > eps)[:, None], proj, d)
                x_adv = (x + d.view_as(x)).clamp(0, 1)
        x_adv = x_adv.detach()
    return x_adv


def plain_passes(model, x, y, n_fwd_bwd):
    """A loop doing only n forward+backward passes: the floor any gradient attack with that budget pays."""
    x_adv = x.clone()
    for _ in range(n_fwd_bwd):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = (x_adv.detach() + 1e-3 * g.sign()).clamp(0, 1)
    return x_adv


def timeit(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="small-cnn")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--autoattack", action="store_true", help="also time the full AutoAttack panel (slow)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    data = load_dataset("mnist5k")
    kw = {"width": args.width} if args.model in ("small-cnn", "preact-resnet18", "resnet18") else {}
    model = create_model(args.model, in_channels=1, input_size=28, **kw).to(dev)
    # One epoch of standard training: attacks on an untrained model stop early on misclassified points.
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for i in range(0, data.x_train.shape[0], 128):
        xb, yb = data.x_train[i:i + 128].to(dev), data.y_train[i:i + 128].to(dev)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = data.x_test[: args.batch_size].to(dev)
    y = data.y_test[: args.batch_size].to(dev)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)
           if args.amp != "none" else nullcontext())
    n, T = x.shape[0], args.steps
    rows = []
    cases = [("pgd-linf", "linf", 0.3, 0.01), ("pgd-l2", "l2", 2.0, 0.25), ("pgd-l1", "l1", 10.0, 1.0)]
    with amp:
        for name, norm, eps, alpha in cases:
            atk = PGD(model, norm=norm, eps=eps, steps=T, step_size=alpha, random_start=norm == "linf")
            t_ours = timeit(lambda atk=atk: atk(x, y), args.repeats, sync)
            t_ref = timeit(lambda e=eps, a=alpha, p=norm: plain_pgd(model, x, y, e, a, T, p), args.repeats, sync)
            rows.append((name, 2 * T, n / t_ours, n / t_ref, "hand-written PGD loop"))
        apgd = APGD(model, eps=0.3, steps=T)
        out = apgd.run(x, y, with_success=False)
        per = (out.forward + out.backward) / n
        t_ours = timeit(lambda: apgd(x, y), args.repeats, sync)
        t_ref = timeit(lambda: plain_passes(model, x, y, round(out.backward / n)), args.repeats, sync)
        rows.append(("apgd-ce", per, n / t_ours, n / t_ref, "same number of fwd+bwd passes"))
        if args.autoattack:
            aa = AutoAttack(model, eps=0.3)
            out = aa.run(x, y, with_success=False)
            t_ours = timeit(lambda: aa(x, y), 1, sync)
            try:
                import logging

                import pyautoattack  # noqa: F401

                logging.getLogger("auto-attack").setLevel(logging.ERROR)
                ref = AutoAttack(model, eps=0.3, impl="reference")
                t_ref = timeit(lambda: ref(x, y), 1, sync)
                rows.append(("autoattack", (out.forward + out.backward) / n, n / t_ours, n / t_ref, "pyautoattack"))
            except ImportError:
                rows.append(("autoattack", (out.forward + out.backward) / n, n / t_ours, float("nan"), "(no reference)"))
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " + (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU")
    print(f"model {args.model} (width {args.width}), batch {n}, {T} steps, amp {args.amp}, "
          f"channels_last {args.channels_last}; {machine}\n")
    print("| attack | passes/img | robustlab img/s | plain img/s | ratio | plain reference |")
    print("|---|---|---|---|---|---|")
    for name, per, ours, ref, what in rows:
        print(f"| {name} | {per:.1f} | {ours:.1f} | {ref:.1f} | {ours / ref:.3f} | {what} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "rows": [
                {"attack": r[0], "passes_per_image": r[1], "robustlab_img_s": r[2], "plain_img_s": r[3],
                 "ratio": r[2] / r[3], "reference": r[4]} for r in rows]}, f, indent=2)


if __name__ == "__main__":
    main()
