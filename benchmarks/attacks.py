"""Attack throughput: images/s and passes per image for robustlab's PGD (linf, l2, l1), APGD-CE and the
AutoAttack panel, each next to a plain hand-written PyTorch loop doing the same passes in the same process.

    python benchmarks/attacks.py                      # CPU, small CNN on mnist5k
    python benchmarks/attacks.py --device cuda --amp bf16 --channels-last --model preact-resnet18
    python benchmarks/attacks.py --autoattack --threads 2 --n 100   # AutoAttack vs pyautoattack (trains 2 models)
    python benchmarks/attacks.py --fast --threads 1 --out fast.json   # version=fast vs standard: misses, time
    python benchmarks/attacks.py --fast --misses --threads 1 --out fast.json   # which stage finds fast's misses

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
from pathlib import Path

import torch
import torch.nn.functional as F

from robustlab.attacks import APGD, PGD, AutoAttack
from robustlab.data import load_dataset
from robustlab.models import create_model


def machine_of(dev: torch.device) -> str:
    """The machine a benchmark's numbers come from: processor, torch threads, the device."""
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, " + (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU")


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


def adversarially_trained(name: str, x, y, *, epochs: int, cache: str, **kw):
    """PGD-AT (linf 0.3, 10 steps, eps ramped over 4 epochs, Adam 1e-3), cached in `cache` by name and epochs."""
    from robustlab.models import create_model

    torch.manual_seed(0)
    model = create_model(name, **kw)
    path = Path(cache) / f"{name}-{'-'.join(f'{k}{v}' for k, v in kw.items())}-pgdat{epochs}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    for ep in range(epochs):
        eps = min(0.3, 0.05 + 0.25 * ep / 4)
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 64):
            xb, yb = x[perm[i:i + 64]], y[perm[i:i + 64]]
            xb = PGD(model, eps=eps, steps=10, step_size=2.5 * eps / 10, seed=i)(xb, yb)
            model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def autoattack_table(args, dev) -> None:
    """AutoAttack standard, robustlab (fp32 and bf16) against pyautoattack, back to back on the same model, images
    and threads. Robust accuracy is judged by the fp32 model for every run."""
    import logging

    from pyautoattack import AutoAttack as Reference

    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    data = load_dataset("mnist5k")
    cifar_shaped = lambda t: F.pad(t, (2, 2, 2, 2)).repeat(1, 3, 1, 1)  # noqa: E731  (28x28x1 -> 32x32x3)
    cnn = adversarially_trained("small-cnn", data.x_train, data.y_train, epochs=12, cache=args.cache, width=16,
                                hidden=128)
    resnet = adversarially_trained("preact-resnet18", cifar_shaped(data.x_train), data.y_train, epochs=5,
                                   cache=args.cache, in_channels=3, input_size=32, width=8)
    cases = {"cnn-linf": ("small-cnn, mnist5k", cnn, "linf", 0.3, data.x_test),
             "cnn-l2": ("small-cnn, mnist5k", cnn, "l2", 2.0, data.x_test),
             "resnet-linf": ("preact-resnet18 (width 8), 32x32x3", resnet, "linf", 0.3, cifar_shaped(data.x_test))}
    machine = machine_of(dev)
    print(f"AutoAttack standard, {args.n} test images per model, back to back in one process; {machine}\n")
    print("| model | threat | robustlab precision | robustlab s | pyautoattack s | ratio (target <= 0.5) | "
          "robustlab robust acc | pyautoattack robust acc |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for key in args.cases.split(","):
        what, model, norm, eps, xs = cases[key]
        model = model.to(dev)
        x, y = xs[: args.n].to(dev), data.y_test[: args.n].to(dev)

        def robust(x_adv, model=model, y=y) -> float:
            with torch.no_grad():
                return (model(x_adv).argmax(1) == y).float().mean().item()

        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        if dev.type == "cuda":  # CUDA context, cuBLAS/cuDNN set-up before either implementation is timed
            xw = x.clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xw), y), xw)
            sync()
        runs = {}
        for label, precision in (("fp32", "fp32"), ("bf16", "bf16")):
            aa = AutoAttack(model, norm=norm, eps=eps, precision=precision)
            t = time.perf_counter()
            x_adv = aa(x, y)
            sync()
            runs[label] = (time.perf_counter() - t, robust(x_adv))
            print(f"<!-- {what}, {norm}, {label}: " + ", ".join(  # where the time went (stage: seconds, robust)
                f"{s['attack']} {s['seconds']:.1f} s ({s['robust_after']})" for s in aa.last_log) + " -->", flush=True)
        ref = Reference(model, norm="Linf" if norm == "linf" else "L2", eps=eps, version="standard", device=str(dev),
                        seed=0)
        ref.verbose = False
        ref.apgd_targeted.n_target_classes = ref.fab.n_target_classes = 9
        t = time.perf_counter()
        out = ref.run_standard_evaluation(x, y, batch_size=args.n)
        sync()
        t_ref = time.perf_counter() - t
        acc_ref = robust(out[0] if isinstance(out, tuple) else out)
        for label, (t_ours, acc) in runs.items():  # printed per model, so a run cut short keeps its rows
            rows.append((what, f"{norm} {eps:g}", label, t_ours, t_ref, acc, acc_ref))
            print(f"| {what} | {norm} {eps:g} | {label} | {t_ours:.1f} | {t_ref:.1f} | {t_ours / t_ref:.2f} | "
                  f"{100 * acc:.1f} | {100 * acc_ref:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "rows": [
                {"model": r[0], "threat": r[1], "precision": r[2], "robustlab_s": r[3], "reference_s": r[4],
                 "ratio": r[3] / r[4], "robustlab_robust_accuracy": r[5], "reference_robust_accuracy": r[6]}
                for r in rows]}, f, indent=2)


def brendel_bethge_table(args, dev) -> None:
    """Brendel-Bethge, robustlab's against foolbox's (numba, one image at a time) on the PGD-AT small CNN of the
    AutoAttack table, from the same starts, with the same trust region (foolbox's lr divided by the batch size:
    its region grows with the batch), back to back on the same images and threads. foolbox's numba compilation is
    done by a one-step call before the timed one (reported apart)."""
    import foolbox as fb

    from robustlab.attacks import BrendelBethge

    data = load_dataset("mnist5k")
    model = adversarially_trained("small-cnn", data.x_train, data.y_train, epochs=12, cache=args.cache, width=16,
                                  hidden=128).to(dev)
    x, y = data.x_test[: args.n].to(dev), data.y_test[: args.n].to(dev)
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    x, y = x[keep], y[keep]
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=dev)
    machine = machine_of(dev)
    print(f"Brendel-Bethge, {x.shape[0]} correctly classified test images, {args.bb_steps} steps; {machine}\n")
    print("| norm | robustlab s | foolbox s (+ compile s) | ratio | median minimal norm, robustlab / foolbox | "
          "robust at eps, robustlab / foolbox |")
    print("|---|---|---|---|---|---|", flush=True)
    for norm, eps, reference, p in (("linf", 0.3, fb.attacks.LinfinityBrendelBethgeAttack, float("inf")),
                                    ("l2", 2.0, fb.attacks.L2BrendelBethgeAttack, 2.0)):
        ours = BrendelBethge(model, norm=norm, steps=args.bb_steps)
        start, found = ours._start(ours.make_counter(), x, y, model(x).argmax(1).detach(), torch.Generator(dev))
        assert found.all()
        t = time.perf_counter()
        out = ours.run(x, y)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        reference(steps=1)(fmodel, x[:2], y[:2], epsilons=None, starting_points=start[:2])  # numba compilation
        t_compile = time.perf_counter() - t
        t = time.perf_counter()
        raw, _, _ = reference(steps=args.bb_steps, lr=1e-3 / x.shape[0])(fmodel, x, y, epsilons=None,
                                                                          starting_points=start)
        t_ref = time.perf_counter() - t
        ref = (raw - x).flatten(1).norm(p=p, dim=1)
        print(f"| {norm} | {t_ours:.1f} | {t_ref:.1f} (+ {t_compile:.1f}) | {t_ours / t_ref:.2f} | "
              f"{out.norms.median():.4f} / {ref.median():.4f} | {100 * (out.norms > eps).float().mean():.1f} / "
              f"{100 * (ref > eps).float().mean():.1f} |", flush=True)


# --fast: the models of the proof (issue 30). Each: (what, how it is built, threat, eps, CIFAR-shaped, test images).
# Trained by `robustlab train --config C --out-dir RUNS` (the seeds' CPU-scale configs) or, for the PGD-AT CNN and
# ResNet, by `adversarially_trained` (the AutoAttack table's models).
FAST_MODELS = {
    "cnn-linf": ("small-cnn PGD-AT (linf 0.3)", "pgdat:small-cnn", "linf", 0.3, False, 1000),
    "cnn-l2": ("small-cnn l2 PGD-AT (MNG-AC's adv-l2)", "configs/mng-ac/mnist5k-adv-l2.yaml", "l2", 2.0, False, 1000),
    "trades": ("small-cnn TRADES", "configs/trades-mnist5k.yaml", "linf", 0.3, False, 1000),
    "part": ("small-cnn PART", "configs/part/mnist5k-part.yaml", "linf", 0.3, False, 1000),
    "mng-ac": ("small-cnn MNG-AC", "configs/mng-ac/mnist5k-mng-ac.yaml", "linf", 0.3, False, 1000),
    "resnet-linf": ("preact-resnet18 (width 8) PGD-AT, 32x32x3", "pgdat:preact-resnet18", "linf", 0.3, True, 500),
}
FAST_CHUNK = 100  # images per unit of work: a kill loses at most one chunk of one model


def _fast_model(key: str, data, args):
    from robustlab.engine.checkpoint import load_model

    how = FAST_MODELS[key][1]
    cifar_shaped = lambda t: F.pad(t, (2, 2, 2, 2)).repeat(1, 3, 1, 1)  # noqa: E731  (28x28x1 -> 32x32x3)
    if how == "pgdat:small-cnn":
        return adversarially_trained("small-cnn", data.x_train, data.y_train, epochs=12, cache=args.cache, width=16,
                                     hidden=128)
    if how == "pgdat:preact-resnet18":
        return adversarially_trained("preact-resnet18", cifar_shaped(data.x_train), data.y_train, epochs=5,
                                     cache=args.cache, in_channels=3, input_size=32, width=8)
    import yaml

    name = yaml.safe_load(Path(how).read_text())["name"]
    run = Path(args.runs) / name
    if not (run / "last.safetensors").exists():  # trained here (resumed if a state is there)
        import subprocess
        import sys

        cmd = [sys.executable, "-m", "robustlab.cli.main", "train", "--config", how, "--out-dir", args.runs,
               "--threads", str(torch.get_num_threads())]
        if (run / "train_state.safetensors").exists():
            cmd.append("--resume")
        elif run.exists():
            cmd.append("--overwrite")
        subprocess.run(cmd, check=True)
    return load_model(run / "last.safetensors")[0].eval()


def fast_table(args, dev) -> None:
    """AutoAttack version=fast against standard (robustlab's and pyautoattack's), back to back per chunk of
    FAST_CHUNK images on the same model, images and threads; resumable (args.out holds every finished chunk).
    Per image: broken by each; a miss is an image a standard run broke and fast did not."""
    import logging

    from pyautoattack import AutoAttack as Reference

    from robustlab import evaluate
    from robustlab.engine.checkpoint import tensors_sha256
    from robustlab.outputs import atomic_write_text

    logging.getLogger("auto-attack").setLevel(logging.ERROR)
    data = load_dataset("mnist5k")
    out = Path(args.out)
    state = json.loads(out.read_text()) if out.exists() else {}
    machine = machine_of(dev)
    keys = args.cases.split(",")
    models: dict[str, torch.nn.Module] = {}
    # in rounds (chunk r of every model, then r + 1), so a run cut short has a part of every model
    for start in range(0, max(FAST_MODELS[k][5] for k in keys), FAST_CHUNK):
        for key in keys:
            what, _, norm, eps, cifar, n = FAST_MODELS[key]
            n = min(n, args.n) if args.n else n
            entry = state.setdefault(key, {"model": what, "threat": f"{norm} {eps:g}", "machine": machine,
                                           "chunks": {}})
            if start >= n or str(start) in entry["chunks"]:
                continue
            if key not in models:
                models[key] = _fast_model(key, data, args).to(dev)
                digest = tensors_sha256(dict(models[key].state_dict()))
                if entry.setdefault("model_sha256", digest) != digest:  # retrained elsewhere into other weights
                    print(f"{key}: the stored chunks are of other weights ({entry['model_sha256'][:12]}); "
                          "starting this model over", flush=True)
                    entry.update(model_sha256=digest, chunks={})
                    entry.pop("probe", None)
            model = models[key]
            xs = F.pad(data.x_test, (2, 2, 2, 2)).repeat(1, 3, 1, 1) if cifar else data.x_test
            if "probe" not in entry:  # the fast evaluation's integrity probe and escalation decision, once per model
                r = evaluate(model, xs[:FAST_CHUNK].to(dev), data.y_test[:FAST_CHUNK].to(dev),
                             [f"autoattack:norm={norm},eps={eps},version=fast"], progress=False)
                a = r["attacks"]["autoattack"]
                entry["probe"] = {"seconds": r["integrity"]["seconds"], "ran": a["ran"],
                                  "flags": a["escalated_because"]}
            end = min(start + FAST_CHUNK, n)
            x, y = xs[start:end].to(dev), data.y_test[start:end].to(dev)
            with torch.no_grad():
                correct = model(x).argmax(1) == y
            chunk = {}
            for label in ("fast", "standard", "reference"):
                t = time.perf_counter()
                if label == "reference":
                    ref = Reference(model, norm="Linf" if norm == "linf" else "L2", eps=eps, version="standard",
                                    device=str(dev), seed=0)
                    ref.verbose = False
                    ref.apgd_targeted.n_target_classes = ref.fab.n_target_classes = 9
                    x_adv = ref.run_standard_evaluation(x, y, batch_size=x.shape[0])
                    x_adv = x_adv[0] if isinstance(x_adv, tuple) else x_adv
                else:
                    aa = AutoAttack(model, norm=norm, eps=eps, version=label)
                    x_adv = aa(x, y)
                seconds = time.perf_counter() - t
                with torch.no_grad():
                    broken = correct & (model(x_adv).argmax(1) != y)
                chunk[label] = {"seconds": seconds, "broken": broken.nonzero().squeeze(1).add(start).tolist()}
                if label != "reference":
                    chunk[label]["stages"] = {s["attack"]: round(s["seconds"], 2) for s in aa.last_log}
            chunk["clean_correct"], chunk["n"] = int(correct.sum()), int(x.shape[0])
            entry["chunks"][str(start)] = chunk
            atomic_write_text(out, json.dumps(state, indent=1))
            print(f"{key} images {start}-{start + x.shape[0]}: " + ", ".join(
                f"{k} {v['seconds']:.1f} s, {len(v['broken'])} broken" for k, v in chunk.items() if isinstance(v, dict)),
                flush=True)
    print(fast_summary(state))


def fast_summary(state: dict) -> str:
    """The Markdown table of a --fast run (also `--fast --summary` on a finished or partial JSON)."""
    rows = ["| model | threat | images | fast robust % | robustlab standard % | reference standard % | misses vs "
            "robustlab / reference | fast s (+ probe s) | robustlab s | reference s | fast / reference (with the "
            "probe) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    misses, stages = [], []
    for key, e in state.items():
        chunks = list(e["chunks"].values())
        if not chunks:
            continue
        for label in ("fast", "standard"):  # where the time went, per stage
            total: dict[str, float] = {}
            for c in chunks:
                for stage, sec in c[label]["stages"].items():
                    total[stage] = total.get(stage, 0.0) + sec
            stages.append(f"{key} {label}: " + ", ".join(f"{k} {v:.1f} s" for k, v in total.items()))
        n = sum(c["n"] for c in chunks)
        correct = sum(c["clean_correct"] for c in chunks)
        broken = {k: {i for c in chunks for i in c[k]["broken"]} for k in ("fast", "standard", "reference")}
        secs = {k: sum(c[k]["seconds"] for c in chunks) for k in broken}
        miss = {k: sorted(broken[k] - broken["fast"]) for k in ("standard", "reference")}
        misses.append(f"- {key}: " + "; ".join(f"{'robustlab standard' if k == 'standard' else 'the reference'} broke "
                                             f"{', '.join(map(str, miss[k])) or 'none'}" for k in miss))
        probe = e["probe"]["seconds"]
        rob = {k: 100 * (correct - len(broken[k])) / max(n, 1) for k in broken}
        rows.append(f"| {e['model']} | {e['threat']} | {n} | {rob['fast']:.1f} | {rob['standard']:.1f} | "
                    f"{rob['reference']:.1f} | {len(miss['standard'])} / {len(miss['reference'])} | "
                    f"{secs['fast']:.1f} (+{probe:.1f}) | {secs['standard']:.1f} | {secs['reference']:.1f} | "
                    f"{secs['fast'] / secs['reference']:.3f} ({(secs['fast'] + probe) / secs['reference']:.3f}) |")
    return "\n".join(rows + ["", "misses (the test images, by index, that a standard run broke and fast did not):", "",
                             *misses, "", "where the time went:", *stages])


def fast_misses(args, dev) -> None:
    """Which one more stage would have found fast's misses: on each model's missed images (those either standard run
    broke and fast did not, from --out), each candidate stage alone, from the clean images."""
    from robustlab.attacks import create_attack

    data = load_dataset("mnist5k")
    state = json.loads(Path(args.out).read_text())
    print(f"machine: {machine_of(dev)}")
    chosen = args.stages.split(";") if args.stages else list(MISS_STAGES)
    unknown = [c for c in chosen if c not in MISS_STAGES]
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; valid: {'; '.join(MISS_STAGES)}")
    stages = {k: MISS_STAGES[k] for k in chosen}
    print("| model | missed | " + " | ".join(stages) + " |")
    print("|---|---|" + "---|" * len(stages))
    for key in args.cases.split(","):
        e = state[key]
        norm, eps = e["threat"].split()
        chunks = e["chunks"].values()
        broken = {k: {i for c in chunks for i in c[k]["broken"]} for k in ("fast", "standard", "reference")}
        missed = sorted((broken["standard"] | broken["reference"]) - broken["fast"])
        if not missed:
            continue
        model = _fast_model(key, data, args).to(dev)
        xs = F.pad(data.x_test, (2, 2, 2, 2)).repeat(1, 3, 1, 1) if FAST_MODELS[key][4] else data.x_test
        x, y = xs[missed].to(dev), data.y_test[missed].to(dev)
        cells = []
        for stage in stages.values():
            t = time.perf_counter()
            found = create_attack(f"{stage},norm={norm},eps={eps}", model).run(x, y).success
            cells.append(f"{int(found.sum())} ({time.perf_counter() - t:.0f} s)")
        print(f"| {key} | {len(missed)} | " + " | ".join(cells) + " |", flush=True)


# the candidate stages of --fast --misses: what standard has beyond fast, and a second look with what fast has
MISS_STAGES = {"APGD-T MALT, 9 targets": "apgd-t:targeting=malt,n_targets=9", "APGD-T rank, 9 targets": "apgd-t:seed=0",
               "APGD-CE, another seed": "apgd-ce:seed=1", "APGD-PM (PMA's loss)": "apgd-ce:loss=pm",
               "FAB-T": "fab:targeted=true",
               "Square 1,000 queries": "square:n_queries=1000", "Square 5,000 queries": "square:n_queries=5000"}


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
    p.add_argument("--autoattack", action="store_true",
                   help="instead: AutoAttack standard against pyautoattack on adversarially trained models (slow)")
    p.add_argument("--n", type=int, default=100, help="--autoattack: images per model")
    p.add_argument("--cases", default="cnn-linf,cnn-l2,resnet-linf", help="--autoattack: which of the three to run")
    p.add_argument("--cache", default="/tmp/robustlab-bench-models", help="--autoattack: trained models kept here")
    p.add_argument("--fast", action="store_true",
                   help="instead: AutoAttack version=fast against standard (robustlab's and pyautoattack's) on the "
                        "six models of FAST_MODELS, resumable through --out (slow: hours on a CPU)")
    p.add_argument("--brendel-bethge", action="store_true",
                   help="instead: Brendel-Bethge against foolbox's on the PGD-AT small CNN (--n images)")
    p.add_argument("--bb-steps", type=int, default=1000, help="--brendel-bethge: steps of both")
    p.add_argument("--out", default="fast-autoattack.json", help="--fast: results, kept per chunk of images")
    p.add_argument("--runs", default="/tmp/fastaa/runs", help="--fast: where `robustlab train` put the config runs")
    p.add_argument("--summary", action="store_true", help="--fast: only print the table of --out")
    p.add_argument("--stages", help="--misses: only these stages (names of MISS_STAGES, ';'-separated)")
    p.add_argument("--misses", action="store_true",
                   help="--fast: instead, each stage standard has beyond fast run alone on fast's misses in --out")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.autoattack:
        return autoattack_table(args, dev)
    if args.brendel_bethge:
        return brendel_bethge_table(args, dev)
    if args.fast:
        if args.summary:
            return print(fast_summary(json.loads(Path(args.out).read_text())))
        if args.cases == "cnn-linf,cnn-l2,resnet-linf":  # the --autoattack default: --fast runs all six
            args.cases = ",".join(FAST_MODELS)
        if args.misses:
            return fast_misses(args, dev)
        args.n = None if args.n == 100 else args.n
        return fast_table(args, dev)
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
    machine = machine_of(dev)
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
