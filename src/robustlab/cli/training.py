"""`robustlab train` and `robustlab run` (the main job)."""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path


def cmd_train(args: argparse.Namespace) -> int:
    from robustlab.engine.config import load_config
    from robustlab.engine.trainer import Trainer
    from robustlab.utils import set_threads

    set_threads(args.threads)
    overrides = list(args.overrides)
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    defaults = {}
    if args.task == "detection":
        from robustlab.cli.detection import DETECTION_DEFAULTS

        defaults = DETECTION_DEFAULTS
    cfg = load_config(args.config, overrides, defaults=defaults)
    trainer = Trainer(cfg)
    result = trainer.fit(resume=args.resume)
    best = result["best"]
    metric = "mAP" if best["metric"] == "map" else "robust accuracy"
    if best["metric"] == "map" and cfg.eval_attack:
        metric = f"mAP under {cfg.eval_attack}"
    print(f"trained {cfg.method} ({cfg.model}) on {cfg.dataset}: best {metric} "
          f"{best['score']:.3f} at epoch {best['epoch']}; checkpoints in {result['run_dir']}")
    return 0


def _machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {dev}"


def cmd_run(args: argparse.Namespace) -> int:
    """Train standard and PGD-AT on mnist5k, evaluate both, write runs/<name>/ with a report."""

    from robustlab import evaluate
    from robustlab.data import load_dataset
    from robustlab.engine.config import TrainConfig
    from robustlab.engine.trainer import Trainer
    from robustlab.reports import plots
    from robustlab.reports.json import write_json
    from robustlab.reports.run_report import comparison_table, write_report
    from robustlab.utils import set_threads

    set_threads(args.threads)
    t0 = time.time()
    eps = args.eps
    run_dir = Path(args.out_dir) / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    data = load_dataset("mnist5k")
    common = dict(dataset="mnist5k", model="small-cnn", model_kwargs={"width": args.width, "hidden": 100},
                  epochs=args.epochs, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine",
                  eval_every=2, eval_samples=min(200, args.n_eval), eval_attack=f"pgd:eps={eps},steps=20,step_size={eps / 8}",
                  seed=args.seed, out_dir=str(run_dir), progress=None)
    methods = {"standard": ("standard", {}),
               "pgd-at": ("pgd-at", {"eps": eps, "steps": args.train_steps, "step_size": 2.5 * eps / args.train_steps,
                                     "eps_ramp_epochs": args.eps_ramp})}
    models, histories, events = {}, {}, []
    for label, (method, kw) in methods.items():
        cfg = TrainConfig(name=label, method=method, method_kwargs=kw, **common)
        print(f"[{time.time() - t0:5.0f}s] training {label} ({cfg.epochs} epochs)", flush=True)
        trainer = Trainer(cfg, data=data)
        res = trainer.fit()
        from robustlab.engine.checkpoint import load_model

        models[label] = load_model(run_dir / label / "best.safetensors")[0]
        histories[label] = res["history"]
        events += [f"{label}: {e}" for e in res["events"]]
    n = args.n_eval
    x, y = data.x_test[:n], data.y_test[:n]
    specs = [f"pgd:norm=linf,eps={eps},steps=40,step_size={eps / 10}", f"autoattack:norm=linf,eps={eps}"]
    results, curves = {}, {}
    eps_grid = [round(eps * f, 4) for f in (0.25, 0.5, 0.75, 1.0, 1.25)]
    for label, model in models.items():
        print(f"[{time.time() - t0:5.0f}s] evaluating {label}: {', '.join(specs)}", flush=True)
        results[label] = evaluate(model, x, y, specs, progress=None)
        curve = evaluate(model, x[: args.n_curve], y[: args.n_curve],
                         [f"pgd:eps={e},steps=20,step_size={e / 8}" for e in eps_grid], progress=False)
        curves[label] = (eps_grid, [a["robust_accuracy"] for a in curve["attacks"].values()])
    figures = {
        "Accuracy vs eps (PGD-20, linf)": plots.accuracy_vs_eps(curves, run_dir / "accuracy_vs_eps.png",
                                                                "mnist5k, PGD-20 l_inf", "eps (l_inf)").name,
        "Training curves": plots.training_curves(histories, run_dir / "training_curves.png").name,
        "Clean vs robust accuracy per class": plots.per_class_bars(results, run_dir / "per_class.png").name,
    }
    command = "robustlab run " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["run"] else "robustlab run"
    summary = {"name": args.name, "dataset": "mnist5k", "n_eval": int(x.shape[0]), "eps": eps, "attack_specs": specs,
               "results": results, "curves": {k: {"eps": v[0], "robust_accuracy": v[1]} for k, v in curves.items()},
               "histories": histories, "events": events, "machine": _machine(), "seconds": time.time() - t0,
               "command": command.strip()}
    write_json(run_dir / "results.json", summary)
    md, page = write_report(run_dir, summary, figures)
    print()
    print(comparison_table(results))
    print(f"\nwrote {run_dir / 'results.json'}, {md}, {page} ({time.time() - t0:.0f} s)")
    return 0


def add_commands(sub) -> None:
    pt = sub.add_parser("train", help="train a model with a registered method from a YAML config",
                        description="Train with a YAML config; key=value arguments override config keys "
                                    "(method_kwargs.eps=0.1 sets a sub-key).")
    pt.add_argument("--config", type=Path, help="YAML config (see configs/)")
    pt.add_argument("--task", choices=("classification", "detection"), default="classification",
                    help="detection starts from the clean TinySSD-96 recipe on MNIST-Det (dataset mnist-det, model "
                         "tinyssd-96, method det-std); the config and overrides replace any of its keys")
    pt.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. epochs=3")
    pt.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    pt.add_argument("--out-dir", help="parent folder of the run folder (default: config out_dir)")
    pt.add_argument("--threads", type=int, help="torch CPU threads")
    pt.set_defaults(func=cmd_train)

    pr = sub.add_parser("run", help="the main job: train standard + PGD-AT on mnist5k, evaluate, write a report",
                        description="Train a standard and a PGD-AT model on the embedded mnist5k data, evaluate both "
                                    "with PGD-40 and AutoAttack, and write runs/<name>/ (checkpoints, results.json, "
                                    "report.md, report.html, PNG plots).")
    pr.add_argument("--name", default="mnist5k-pgd-at", help="run folder name under --out-dir")
    pr.add_argument("--out-dir", default="runs")
    pr.add_argument("--eps", type=float, default=0.3, help="l_inf budget for training and evaluation")
    pr.add_argument("--epochs", type=int, default=8)
    pr.add_argument("--train-steps", type=int, default=7, help="PGD steps in training")
    pr.add_argument("--eps-ramp", type=float, default=2.0, help="epochs over which PGD-AT's eps grows from 0")
    pr.add_argument("--width", type=int, default=16, help="small-cnn width")
    pr.add_argument("--n-eval", type=int, default=200,
                    help="test images for the PGD-40/AutoAttack panel (AutoAttack dominates the run's time)")
    pr.add_argument("--n-curve", type=int, default=300, help="test images for the accuracy-vs-eps curve")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    pr.set_defaults(func=cmd_run)


__all__ = ["add_commands"]
