"""`robustlab train` and `robustlab run` (the main job)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from robustlab.cli.common import command_line
from robustlab.errors import ConfigError


def cmd_train(args: argparse.Namespace) -> int:
    from robustlab.engine.config import load_config
    from robustlab.engine.tasks import task_named
    from robustlab.engine.trainer import Trainer
    from robustlab.utils import set_threads

    set_threads(args.threads)
    overrides = list(args.overrides)
    if args.out_dir:
        overrides.append(f"out_dir={args.out_dir}")
    if args.device:
        overrides.append(f"device={args.device}")
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    if args.smoke and (args.resume or args.overwrite):
        raise ConfigError("--smoke trains in a temporary folder of its own (and resumes there): drop "
                          + " and ".join(f for f, on in (("--resume", args.resume), ("--overwrite", args.overwrite)) if on))
    cfg = load_config(args.config, overrides, defaults=dict(task_named(args.task).recipe))
    if args.smoke:
        return _smoke(cfg)
    trainer = Trainer(cfg)
    try:
        result = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        state = trainer.run_dir / "train_state.safetensors"
        resumable = state.exists() and (trainer.saved_at is not None or args.resume)
        where = (f"the last checkpoint is {state} ({trainer.saved_at or 'as resumed'})" if resumable
                 else "no checkpoint was written yet, so there is nothing to resume from")
        again = command_line() + ("" if args.resume else " --resume")
        print(f"robustlab train: interrupted; {where}" + (f"; continue with: {again}" if resumable else ""),
              file=sys.stderr)
        return 130
    finally:
        trainer.close()
    if trainer.ddp.main:
        best = result["best"]
        kept = (f"best.safetensors = epoch {best['epoch']}, {best['metric_description']} {best['score']:.3f} on the "
                f"{best['split']}" if best["select_best"] else f"best.safetensors = the last epoch ({best['epoch']})")
        print(f"trained {cfg.method} ({cfg.model}) on {cfg.dataset}: {kept}; checkpoints in {result['run_dir']}")
    return 0


def _smoke(cfg) -> int:
    import tempfile

    from robustlab.engine.smoke import run_smoke

    with tempfile.TemporaryDirectory(prefix="robustlab-smoke-") as folder:
        info = run_smoke(cfg, Path(folder))
    last = info["history"][-1]
    scores = ", ".join(f"{k} {v:.3g}" for k, v in last.items()
                       if k.startswith(("train_", "eval_")) and isinstance(v, float))
    memory = f"peak host memory {info['peak_host_mib']:.0f} MiB"
    if "peak_gpu_mib" in info:
        memory += f", peak GPU memory {info['peak_gpu_mib']:.0f} MiB"
    smoke = info["config"]
    print(f"smoke {cfg.name}: {cfg.method} ({cfg.model}) on a {cfg.dataset} stand-in, 2 epochs of 1 step with a resume "
          f"between, batch {smoke.batch_size}, on {smoke.device}: {scores}; {info['seconds']:.1f} s, {memory}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The main job (robustlab.pipelines.main_job): train standard + PGD-AT on mnist5k, evaluate, report."""
    from robustlab.pipelines import MainJobOptions, main_job
    from robustlab.reports.run_report import comparison_table
    from robustlab.utils import set_threads

    opts = MainJobOptions(name=args.name, out_dir=args.out_dir, eps=args.eps, epochs=args.epochs,
                          train_steps=args.train_steps, eps_ramp=args.eps_ramp, width=args.width,
                          validation=args.validation, n_eval=args.n_eval, n_curve=args.n_curve, seed=args.seed)
    opts.check()  # before threads, data or training
    set_threads(args.threads)
    summary = main_job(opts, overwrite=args.overwrite, command=command_line(),
                       log=lambda m: print(m, flush=True))
    print()
    print(comparison_table(summary["results"]))
    flagged = [k for k, r in summary["results"].items() if not r.get("integrity", {}).get("ok", True)]
    if flagged:
        print(f"integrity warnings for {', '.join(flagged)}: see the report")
    f = summary["files"]
    print(f"\nwrote {f['results']}, {f['report_md']}, {f['report_html']} ({summary['seconds']:.0f} s)")
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
    pt.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint (refused if a "
                    "setting other than epochs, eval_every, progress, tensorboard or workers changed)")
    pt.add_argument("--overwrite", action="store_true", help="replace the run already in the run folder (by default "
                    "a folder that holds a run is never written over)")
    pt.add_argument("--out-dir", help="parent folder of the run folder (default: config out_dir)")
    pt.add_argument("--threads", type=int, help="torch CPU threads")
    pt.add_argument("--device", help="cpu, cuda or cuda:N (default: the config's device)")
    pt.add_argument("--workers", type=int, help="DataLoader worker processes for file-backed data (default: the "
                    "config's workers, else the machine's cores less one, at most 8; results do not depend on it)")
    pt.add_argument("--smoke", action="store_true",
                    help="run the config end to end in seconds on a stand-in of its data written in the dataset's "
                         "real file format: 2 optimizer steps with a checkpoint and a resume between, attack steps "
                         "capped at 2, one evaluation batch, thinner models; prints peak memory (nothing is kept)")
    pt.set_defaults(func=cmd_train)

    pr = sub.add_parser("run", help="the main job: train standard + PGD-AT on mnist5k, evaluate, write a report",
                        description="Train a standard and a PGD-AT model on the embedded mnist5k data, evaluate both "
                                    "with PGD-40 and AutoAttack, and write runs/<name>/ (checkpoints, results.json, "
                                    "report.md, report.html, PNG plots).")
    pr.add_argument("--name", default="mnist5k-pgd-at", help="run folder name under --out-dir (a folder that holds a "
                    "run is never written over: the run goes to NAME-2, ... unless --overwrite)")
    pr.add_argument("--out-dir", default="runs", help="folder that holds the run folder")
    pr.add_argument("--overwrite", action="store_true", help="replace the run folder if it holds a run")
    pr.add_argument("--validation", type=int, default=500,
                    help="training images held out to choose each model's best epoch (never the test images)")
    pr.add_argument("--eps", type=float, default=0.3, help="l_inf budget for training and evaluation")
    pr.add_argument("--epochs", type=int, default=8, help="training epochs of each model")
    pr.add_argument("--train-steps", type=int, default=7, help="PGD steps in training")
    pr.add_argument("--eps-ramp", type=float, default=2.0, help="epochs over which PGD-AT's eps grows from 0")
    pr.add_argument("--width", type=int, default=16, help="small-cnn width")
    pr.add_argument("--n-eval", type=int, default=200,
                    help="test images for the PGD-40/AutoAttack panel (AutoAttack dominates the run's time)")
    pr.add_argument("--n-curve", type=int, default=300, help="test images for the accuracy-vs-eps curve")
    pr.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and training")
    pr.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    pr.set_defaults(func=cmd_run)


__all__ = ["add_commands"]
