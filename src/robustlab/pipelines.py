"""The main job as a library function: `robustlab run` is a thin wrapper around `main_job`.

Train a standard and a PGD-AT small CNN on the embedded mnist5k data, keep each model's best epoch on a validation
split carved from the training images, evaluate both on the test split under PGD-40 and AutoAttack (with the
integrity checks) and an accuracy-vs-eps curve, and write a run folder with checkpoints, results.json, report.md,
report.html and PNG plots. Every option is checked, and the run folder claimed, before any training starts.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from robustlab.errors import InputError
from robustlab.outputs import check_writable
from robustlab.utils import machine_description

MNIST5K_TEST = 1000


@dataclass(frozen=True)
class MainJobOptions:
    """The main job's settings (the `robustlab run` flags)."""

    name: str = "mnist5k-pgd-at"
    out_dir: str = "runs"
    eps: float = 0.3  # l_inf budget for training and evaluation
    epochs: int = 8
    train_steps: int = 7  # PGD steps in training
    eps_ramp: float = 2.0  # epochs over which PGD-AT's eps grows from 0
    width: int = 16  # small-cnn width
    validation: int = 500  # training images held out for checkpoint selection (mnist5k: 3,500 / 500 / 1,000)
    n_eval: int = 200  # test images for the PGD-40 / AutoAttack panel
    n_curve: int = 300  # test images for the accuracy-vs-eps curve
    seed: int = 0

    def check(self) -> None:
        """Every option, before any work: InputError naming the option and the valid range."""
        def need(ok: bool, flag: str, value: Any, valid: str) -> None:
            if not ok:
                raise InputError(f"--{flag} must be {valid}, got {value!r}")

        for flag, v in (("epochs", self.epochs), ("train-steps", self.train_steps), ("width", self.width),
                        ("n-eval", self.n_eval), ("n-curve", self.n_curve), ("validation", self.validation)):
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, flag, v, "an integer >= 1")
        need(self.n_eval <= MNIST5K_TEST, "n-eval", self.n_eval, f"at most {MNIST5K_TEST} (the mnist5k test split)")
        need(self.n_curve <= MNIST5K_TEST, "n-curve", self.n_curve, f"at most {MNIST5K_TEST}")
        need(self.validation < 4000, "validation", self.validation, "below 4000 (the mnist5k training split)")
        need(0 < self.eps <= 1, "eps", self.eps, "in (0, 1] (inputs are in [0, 1]; 8/255 is written 0.0314)")
        need(self.eps_ramp >= 0, "eps-ramp", self.eps_ramp, ">= 0")
        need(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name", self.name,
             "a folder name")


def claim_run_folder(out_dir: str | Path, name: str, overwrite: bool = False) -> tuple[Path, str | None]:
    """The folder this run writes to, and a note when it is not out_dir/name: a folder that already holds a run is
    never written over; the run goes to name-2, name-3, ... instead (or, with overwrite, replaces it)."""
    base = Path(out_dir) / name
    check_writable(Path(out_dir), folder=True, what="output folder")

    def holds_run(p: Path) -> bool:
        return p.exists() and any(p.iterdir())

    if not holds_run(base):
        return base, None
    if overwrite:
        shutil.rmtree(base)
        return base, f"{base} held a run; --overwrite replaced it"
    k = 2
    while holds_run(Path(out_dir) / f"{name}-{k}"):
        k += 1
    new = Path(out_dir) / f"{name}-{k}"
    return new, f"{base} already holds a run (never overwritten); this run is written to {new} (--overwrite replaces)"


def main_job(opts: MainJobOptions = MainJobOptions(), *, overwrite: bool = False, command: str = "robustlab run",
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the main job; returns its summary (also written to RUN/results.json). See the module docstring."""
    from robustlab import evaluate
    from robustlab.data import load_dataset
    from robustlab.engine.checkpoint import load_model
    from robustlab.engine.config import TrainConfig
    from robustlab.engine.trainer import Trainer
    from robustlab.reports import plots
    from robustlab.reports.json import write_json
    from robustlab.reports.run_report import write_report

    opts.check()
    run_dir, note = claim_run_folder(opts.out_dir, opts.name, overwrite)
    if note:
        log(note)
    t0 = time.time()
    eps = opts.eps
    data = load_dataset("mnist5k")
    common: dict[str, Any] = dict(dataset="mnist5k", model="small-cnn", model_kwargs={"width": opts.width, "hidden": 100},
                  epochs=opts.epochs, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="cosine",
                  eval_every=2, eval_samples=opts.validation, validation=opts.validation,
                  eval_attack=f"pgd:eps={eps},steps=20,step_size={eps / 8}", seed=opts.seed, out_dir=str(run_dir),
                  progress=None)
    methods = {"standard": ("standard", {}),
               "pgd-at": ("pgd-at", {"eps": eps, "steps": opts.train_steps,
                                     "step_size": 2.5 * eps / opts.train_steps, "eps_ramp_epochs": opts.eps_ramp})}
    models, histories, events, selection = {}, {}, [], {}
    for label, (method, kw) in methods.items():
        cfg = TrainConfig(name=label, method=method, method_kwargs=kw, **common)
        log(f"[{time.time() - t0:5.0f}s] training {label} ({cfg.epochs} epochs)")
        res = Trainer(cfg, data=data).fit()
        models[label] = load_model(run_dir / label / "best.safetensors")[0]
        histories[label] = res["history"]
        selection[label] = res["best"]
        events += [f"{label}: {e}" for e in res["events"]]
    x, y = data.x_test[:opts.n_eval], data.y_test[:opts.n_eval]
    specs = [f"pgd:norm=linf,eps={eps},steps=40,step_size={eps / 10}", f"autoattack:norm=linf,eps={eps}"]
    results, curves = {}, {}
    eps_grid = [round(eps * f, 4) for f in (0.25, 0.5, 0.75, 1.0, 1.25) if eps * f <= 1]
    for label, model in models.items():
        log(f"[{time.time() - t0:5.0f}s] evaluating {label} on the test split: {', '.join(specs)}")
        results[label] = evaluate(model, x, y, specs, progress=None)
        log(f"[{time.time() - t0:5.0f}s] accuracy-vs-eps curve of {label}: PGD-20 at eps "
            f"{', '.join(f'{e:g}' for e in eps_grid)} on {min(opts.n_curve, data.x_test.shape[0])} test images")
        curve = evaluate(model, data.x_test[: opts.n_curve], data.y_test[: opts.n_curve],
                         [f"pgd:eps={e},steps=20,step_size={e / 8}" for e in eps_grid], progress=None,
                         integrity=False)
        curves[label] = (eps_grid, [a["robust_accuracy"] for a in curve["attacks"].values()])
    figures = {
        "Accuracy vs eps (PGD-20, linf)": plots.accuracy_vs_eps(curves, run_dir / "accuracy_vs_eps.png",
                                                                "mnist5k test split, PGD-20 l_inf", "eps (l_inf)").name,
        "Training curves (validation split)": plots.training_curves(histories, run_dir / "training_curves.png").name,
        "Clean vs robust accuracy per class": plots.per_class_bars(results, run_dir / "per_class.png").name,
    }
    summary = {"name": run_dir.name, "dataset": "mnist5k", "n_eval": int(x.shape[0]), "eps": eps,
               "split": {"train": data.n_train - opts.validation, "validation": opts.validation,
                         "test": int(data.x_test.shape[0]), "evaluated": "test split only"},
               "attack_specs": specs, "results": results, "selection": selection,
               "curves": {k: {"eps": v[0], "robust_accuracy": v[1]} for k, v in curves.items()},
               "histories": histories, "events": events, "machine": machine_description(), "seconds": time.time() - t0,
               "command": command, "options": asdict(opts)}
    write_json(run_dir / "results.json", summary)
    md, page = write_report(run_dir, summary, figures)
    summary["files"] = {"results": str(run_dir / "results.json"), "report_md": str(md), "report_html": str(page)}
    return summary


__all__ = ["MainJobOptions", "main_job", "claim_run_folder"]
