"""Repeated runs: one config trained and evaluated over seeds (`robustlab repeat`), and two repeated configs compared
seed by seed (`robustlab compare-runs`).

The folder of a repeat:

- `manifest.json`: what is repeated (the config's text, the overrides, the evaluation's attacks and images); a
  resume with other settings is refused, naming what differs (more seeds may be added).
- `seed-S/`: seed S's run (`robustlab train ... seed=S`, its run folder inside), `trained.json` once training
  ended, `eval-state/` (the evaluation's resumable state) and `result.json` (`robustlab eval --json`) once it is
  evaluated. A seed with a result is never run again; a killed one resumes (training from its last state,
  evaluation from its last batch); a trained seed whose checkpoint is gone trains again. So a folder kept with only
  its small files (the manifest, results and markers: what `results/repeats/` in the repository holds) resumes.
  With `--trained-from OTHER` (the same config and overrides), a seed's run is OTHER's `seed-S/` run (trained there
  if it is not): another evaluation of the same weights, e.g. a costlier attack on fewer images.
- `repeat.json`: the aggregate (`aggregate`), rewritten after every finished seed.

Each seed runs the CLI in a subprocess (its own threads and memory; a kill of the repeat kills them too); `jobs`
seeds run side by side. A repeat holds `repeat.lock` in its folder while it runs, so a second repeat of the same folder
is refused at once; a seed's training holds `seed-S/train.lock`, so a `--trained-from` repeat that needs a seed
another repeat is training waits for it instead of training it again over it (advisory `flock` locks: the system
drops them when their process dies, so a killed repeat leaves no lock held; the files stay, empty of meaning).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

from robustlab.analysis.intervals import LEVEL, paired_difference, sampling_error, t_interval
from robustlab.errors import InputError, ResumeError, RunExistsError
from robustlab.outputs import atomic_create_text, atomic_write_text

MANIFEST = "manifest.json"
AGGREGATE = "repeat.json"
LOCK = "repeat.lock"
CLI = [sys.executable, "-m", "robustlab.cli.main"]


def parse_seeds(text: str) -> list[int]:
    """"5" -> seeds 0..4; "0,3,7" -> those seeds."""
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise InputError(f"--seeds takes a count (5) or a list (0,3,7), got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds needs at least one seed, none negative or repeated, got {text!r}")
    return seeds


class Repeat:
    """One repeat folder: its manifest (created, or checked against this run's settings) and its seeds."""

    def __init__(self, folder: str | Path, config: Path, overrides: Sequence[str], attacks: Sequence[str],
                 n_samples: int | None, threads: int, trained_from: str | Path | None = None) -> None:
        from robustlab.engine.config import load_config

        self.folder, self.config, self.threads = Path(folder), Path(config), threads
        cfg = load_config(config, list(overrides))  # a bad config or override fails here, before any work
        if any(o.split("=", 1)[0] in ("seed", "out_dir") for o in overrides):
            raise InputError("repeat sets seed and out_dir itself: drop them from the overrides")
        self.name = cfg.name
        self.overrides = list(overrides)
        if not attacks and not cfg.eval_attack:
            raise InputError(f"config {config} has no eval_attack: give the evaluation's attacks with --attack")
        self.attacks = list(attacks) or [str(cfg.eval_attack)]
        _check_attacks(self.attacks)
        self.n_samples = n_samples
        self.manifest = {"config": self.config.read_text(), "overrides": self.overrides, "attacks": self.attacks,
                         "n_samples": n_samples, "name": self.name}
        # another evaluation of the seeds another repeat trained (e.g. a costlier attack on fewer images): the same
        # config and overrides, the checkpoints read from there
        self.trained_from = Path(trained_from) if trained_from is not None else None
        if self.trained_from is not None:
            other = self.trained_from / MANIFEST
            if not other.exists():
                raise InputError(f"--trained-from {self.trained_from} holds no repeat (no {MANIFEST})")
            theirs = json.loads(other.read_text())
            if (theirs["config"], theirs["overrides"]) != (self.manifest["config"], self.overrides):
                raise InputError(f"--trained-from {self.trained_from} repeats another config or other overrides: "
                                 "its seeds are not this config's")
            if self.trained_from.resolve() == Path(folder).resolve():
                raise InputError("--trained-from names the repeat's own folder: give another --out-dir")
            self.manifest["trained_from"] = str(self.trained_from)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / MANIFEST
        if not path.exists() and any(self.folder.iterdir()):
            raise InputError(f"{self.folder} is not empty and holds no repeat: name a new or empty folder")
        atomic_create_text(path, json.dumps(self.manifest, indent=2))
        stored = json.loads(path.read_text())
        diff = [k for k in self.manifest if stored.get(k) != self.manifest[k]]
        if diff:
            raise ResumeError(f"{self.folder} repeats other settings ({', '.join(diff)} differ): resume with the same "
                              "config, overrides, attacks and --n-samples, or use a new --out-dir")

    def seed_dir(self, seed: int) -> Path:
        return self.folder / f"seed-{seed}"

    def done(self, seed: int) -> bool:
        return (self.seed_dir(seed) / "result.json").exists()

    def train_seed(self, seed: int) -> Path:
        """Seed `seed`'s run folder (in the --trained-from repeat's folder if there is one), trained or resumed
        unless it holds a trained checkpoint: a folder kept without its checkpoints trains again (training is
        deterministic per seed: the same weights)."""
        d = (self.trained_from or self.folder) / f"seed-{seed}"
        d.mkdir(exist_ok=True)
        run = d / self.name
        with locked(d / "train.lock", wait=True):
            self._train(seed, d, run)
        return run

    def _train(self, seed: int, d: Path, run: Path) -> None:
        if not (d / "trained.json").exists() or not (run / "best.safetensors").exists():
            train = [*CLI, "train", "--config", str(self.config), "--out-dir", str(d), "--threads", str(self.threads),
                     *self.overrides, f"seed={seed}"]
            if (run / "train_state.safetensors").exists():
                train.append("--resume")
            elif run.exists():  # killed before its first state: nothing to resume
                train.append("--overwrite")
            _run(train, d / "train.log")
            atomic_write_text(d / "trained.json", json.dumps({"seed": seed, "run": str(run)}))

    def run_seed(self, seed: int) -> dict[str, Any]:
        """Train (or resume) seed `seed`, then evaluate its selected checkpoint; returns its result."""
        d = self.seed_dir(seed)
        d.mkdir(exist_ok=True)
        run = self.train_seed(seed)
        evaluate = [*CLI, "eval", "--model", str(run / "best.safetensors"), "--json", str(d / "result.json"),
                    "--state", str(d / "eval-state"), "--threads", str(self.threads), "--quiet", "--no-store"]
        for spec in self.attacks:
            evaluate += ["--attack", spec]
        if self.n_samples is not None:
            evaluate += ["--n-samples", str(self.n_samples)]
        _run(evaluate, d / "eval.log")
        return json.loads((d / "result.json").read_text())


@contextlib.contextmanager
def locked(path: Path, wait: bool) -> Iterator[IO[str]]:
    """An exclusive `flock` on `path` (created if missing) while the block runs. Taken by another process: wait for
    it (wait=True) or raise RunExistsError naming that process."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if not wait:
                raise RunExistsError(f"{path.parent} is in use by {holder}: wait for it to end, or use another "
                                     "--out-dir") from None
            print(f"waiting for {holder}, which holds {path}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"robustlab repeat (pid {os.getpid()})\n")
        f.flush()
        yield f


class SeedFailed(RuntimeError):
    """A seed's training or evaluation ended with an error (its log says which and why)."""


def _check_attacks(specs: Sequence[str]) -> None:
    """Every attack spec parses and names only options its attack has: before any seed trains."""
    from robustlab.attacks.spec import expand_panels, parse_attack_spec
    from robustlab.registry import ATTACKS

    for spec in expand_panels(list(specs)):
        name, kwargs = parse_attack_spec(spec)
        ATTACKS.check_options(name, kwargs, 1)  # the model is the attack's first argument


def _run(command: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SeedFailed(f"robustlab {command[3]} failed (exit {done.returncode}); its output is in {log}")


def run_repeat(rep: Repeat, seeds: Sequence[int], jobs: int, report: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every seed without a result (`jobs` at a time), rewriting the aggregate after each; returns it."""
    with locked(rep.folder / LOCK, wait=False):
        todo = [s for s in seeds if not rep.done(s)]
        if len(todo) < len(seeds):
            report(f"seeds {', '.join(str(s) for s in seeds if rep.done(s))} already evaluated: kept")
        lock = threading.Lock()

        def one(seed: int) -> None:
            rep.run_seed(seed)
            with lock:
                write_aggregate(rep.folder, seeds)
                report(f"seed {seed} done ({rep.seed_dir(seed) / 'result.json'})")

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for future in [pool.submit(one, s) for s in todo]:
                future.result()
        return write_aggregate(rep.folder, seeds)


def is_detection(result: dict[str, Any]) -> bool:
    return isinstance(result.get("clean"), dict) and "map" in result["clean"]


def metrics_of(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of one evaluation, flat. A classifier: its accuracies, clean_accuracy, attacks.NAME,
    union_accuracy, per_norm.NORM, norm_average_accuracy, and attacks.NAME.rho for minimal attacks run without a
    budget (those present).
    A detector: clean_map, attacks.NAME (mAP) and the evenness of the per-class AP, clean_ap_std / clean_ap_min and
    attacks.NAME.ap_std / .ap_min."""
    if is_detection(result):
        out: dict[str, float] = {}
        for key, entry in [("clean", result["clean"])] + [(f"attacks.{n}", a) for n, a in result["attacks"].items()]:
            ap = [float(v) for v in entry["ap"]]
            mean = sum(ap) / len(ap)
            out[f"{key}_map" if key == "clean" else key] = entry["map"]
            out[f"{key}{'_' if key == 'clean' else '.'}ap_std"] = (sum((v - mean) ** 2 for v in ap) / len(ap)) ** 0.5
            out[f"{key}{'_' if key == 'clean' else '.'}ap_min"] = min(ap)
        return out
    out = {"clean_accuracy": result["clean_accuracy"]}
    out.update({f"attacks.{name}": a["robust_accuracy"] for name, a in result["attacks"].items()})
    # minimal-perturbation attacks run without a budget: rho, the mean relative l_2 norm (the critic paper's measure;
    # higher is better). Under a budget (eps set) rho is the mean over the images the attack fooled within it, a
    # different set per model, so comparing it would favour the model the attack fails on least: left out there
    out.update({f"attacks.{name}.rho": a["perturbation"]["rho"] for name, a in result["attacks"].items()
                if a.get("perturbation") and a["perturbation"].get("rho") is not None and a.get("eps") is None})
    for key in ("union_accuracy", "norm_average_accuracy"):
        if result.get(key) is not None:
            out[key] = result[key]
    out.update({f"per_norm.{norm}": v for norm, v in result.get("per_norm", {}).items()})
    return out


def seed_results(folder: Path, seeds: Sequence[int] | None = None) -> dict[int, dict[str, Any]]:
    """The evaluated seeds of a repeat folder (all of them, or those of `seeds`)."""
    out = {}
    for d in sorted(Path(folder).glob("seed-*")):
        seed = int(d.name.split("-", 1)[1])
        if (d / "result.json").exists() and (seeds is None or seed in seeds):
            out[seed] = json.loads((d / "result.json").read_text())
    return out


def aggregate(results: dict[int, dict[str, Any]], level: float = LEVEL) -> dict[str, Any]:
    """Per metric: the seeds' values, their mean, standard deviation and t interval (the seed-to-seed spread) and the
    test set's binomial error beside it (`intervals.sampling_error`)."""
    seeds = sorted(results)
    per_seed = {s: metrics_of(results[s]) for s in seeds}
    names = [k for k in per_seed[seeds[0]] if all(k in m for m in per_seed.values())] if seeds else []
    metrics = {}
    n_images = _n_images(results[seeds[0]]) if seeds else 0
    for k in names:
        values = [per_seed[s][k] for s in seeds]
        # the binomial error applies to accuracies (a share of images), not to mAP, its per-class spread or rho
        sampling = sampling_error(values, n_images, level) if _is_share(results[seeds[0]], k) else None
        metrics[k] = {"values": values, **t_interval(values, level), "sampling": sampling}
    return {"seeds": seeds, "level": level, "n_images": n_images, "metrics": metrics}


def _is_share(result: dict[str, Any], metric: str) -> bool:
    """An accuracy: a share of the test images, with a binomial sampling error."""
    return not is_detection(result) and not metric.endswith(".rho")


def _n_images(result: dict[str, Any]) -> int:
    return result["n_images"] if is_detection(result) else result["n_samples"]


def write_aggregate(folder: Path, seeds: Sequence[int]) -> dict[str, Any]:
    results = seed_results(folder, seeds)
    agg = aggregate(results) if results else {"seeds": [], "metrics": {}}
    agg["manifest"] = json.loads((Path(folder) / MANIFEST).read_text())
    agg["missing_seeds"] = [s for s in seeds if s not in results]
    atomic_write_text(Path(folder) / AGGREGATE, json.dumps(agg, indent=2))
    return agg


def compare_runs(a: Path, b: Path, level: float = LEVEL) -> dict[str, Any]:
    """The paired difference A - B of every metric both repeats measured, over the seeds both evaluated."""
    ra, rb = seed_results(a), seed_results(b)
    if not ra or not rb:
        empty = a if not ra else b
        raise InputError(f"{empty} holds no evaluated seed (robustlab repeat --out-dir {empty} ...)")
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        raise InputError(f"{a} (seeds {sorted(ra)}) and {b} (seeds {sorted(rb)}) share no seed to pair")
    na, nb = {_n_images(ra[s]) for s in seeds}, {_n_images(rb[s]) for s in seeds}
    if na != nb:
        raise InputError(f"{a} and {b} were evaluated on different numbers of test images ({na} vs {nb})")
    ma, mb = {s: metrics_of(ra[s]) for s in seeds}, {s: metrics_of(rb[s]) for s in seeds}
    names = [k for k in ma[seeds[0]] if all(k in ma[s] and k in mb[s] for s in seeds)]
    n_images = na.pop()
    metrics: dict[str, Any] = {}
    out = {"a": str(a), "b": str(b), "seeds": seeds, "level": level, "n_images": n_images, "metrics": metrics}
    for k in names:
        va, vb = [ma[s][k] for s in seeds], [mb[s][k] for s in seeds]
        # the test set's error of the difference, as if A's and B's were independent (an upper bound: both are
        # measured on the same images); accuracies only
        sampling = None if not _is_share(ra[seeds[0]], k) else (
            sampling_error(va, n_images)["binomial_std"] ** 2 + sampling_error(vb, n_images)["binomial_std"] ** 2) ** 0.5
        # higher is better, except the spread of the per-class AP (more even is better)
        better_low = k.endswith("ap_std")
        diff = paired_difference(vb, va, level, names=("A", "B")) if better_low else \
            paired_difference(va, vb, level, names=("A", "B"))
        if better_low:  # B - A > 0: A is the more even; reported as A - B like the others
            diff = {**diff, "mean": -diff["mean"], "ci": [None if c is None else -c for c in diff["ci"][::-1]]}
        metrics[k] = {"a": t_interval(va, level)["mean"], "b": t_interval(vb, level)["mean"], "difference": diff,
                      "sampling_std_of_difference": sampling}
    return out


__all__ = ["Repeat", "SeedFailed", "run_repeat", "aggregate", "compare_runs", "metrics_of", "seed_results", "parse_seeds"]
