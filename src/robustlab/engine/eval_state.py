"""An evaluation's state folder: resumable, shardable `evaluate` runs (`robustlab eval --state DIR --shard I/N`,
`robustlab eval-merge`).

The batch is the unit of work: batch k always covers the same samples (k * batch_size onwards) and every attack
draws from its own seed per call, so batch k's result does not depend on which process computed it or when.
The folder holds:

- `manifest.json`: what was evaluated (robustlab version, SHA-256 of the model's weights and of the data, the
  attack panel, batch size, number of samples, precision, compile, whether adversarial examples are kept). A run
  whose settings differ refuses the folder, naming the field.
- `batch-K.pt`: batch K's clean record (labels, clean predictions, the data's hash); `batch-K-attack-J.pt`: attack
  J's record on it (per-sample robustness, adversarial predictions, norms, passes, seconds, stages, adversarial
  examples when kept). Each is written atomically the moment it is computed, so a kill at any moment loses at
  most the piece in progress.
- `checks.json`: the first batch's checks (integrity probe, bf16 precision checks), written by batch 0's owner;
  with a fast AutoAttack in the panel, also its escalation decision, written before any other batch by the first
  shard to get there.
- `shard-I-of-N.json`: shard I of N finished (with the total number of batches).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable

import torch

from robustlab.errors import InputError, ResumeError
from robustlab.outputs import atomic_create_text, atomic_write_bytes, atomic_write_text

MANIFEST = "manifest.json"
CHECKS = "checks.json"


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        if k == "attacks" and isinstance(a, list) and isinstance(b, list):
            names_a, names_b = [m["name"] for m in a], [m["name"] for m in b]
            if names_a != names_b:
                out.append(f"the attack panel (this folder: {', '.join(names_a)}; this run: {', '.join(names_b)})")
                continue
            for ma, mb in zip(a, b):
                keys = sorted(key for key in set(ma["describe"]) | set(mb["describe"])
                              if ma["describe"].get(key) != mb["describe"].get(key))
                if ma != mb:
                    out.append(f"attack {ma['name']!r} settings " + ", ".join(
                        f"{key} (this folder: {_short(ma['describe'].get(key))}; this run: "
                        f"{_short(mb['describe'].get(key))})" for key in keys))
            continue
        out.append(f"{k} (this folder: {_short(a)}; this run: {_short(b)})")
    return out


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


class EvalState:
    """One state folder. Opening it with a manifest creates the folder (or checks that the stored manifest is the
    same; otherwise ResumeError naming what differs)."""

    def __init__(self, folder: str | Path, manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = _canonical(manifest)
        path = self.folder / MANIFEST
        if not path.exists():
            if self.folder.exists() and not self.folder.is_dir():
                raise InputError(f"--state {self.folder} is a file, not a folder")
            self.folder.mkdir(parents=True, exist_ok=True)
            # a kill while the manifest was being written leaves only its temporary file: not the user's; records
            # are written only after a manifest exists, so files seen while there is none are someone else's
            if any(not (p.name.startswith(f".{MANIFEST}.") and p.name.endswith(".tmp")) and p.name != MANIFEST
                   for p in self.folder.iterdir()) and not path.exists():
                raise InputError(f"--state {self.folder} is not empty and holds no evaluation manifest: name a new "
                                 "or empty folder (robustlab never writes into a folder it did not make)")
            # created only if absent: of two shards starting on one folder at once, the first manifest stands and
            # the other is compared with it below
            atomic_create_text(path, json.dumps(self.manifest, indent=2, sort_keys=True))
        stored = json.loads(path.read_text())
        diff = _differences(stored, self.manifest)
        if diff:
            raise ResumeError(f"state folder {self.folder} belongs to a different evaluation; it differs in "
                              f"{'; '.join(diff)}. Re-run with the same settings to resume, or use a new folder")

    # records ---------------------------------------------------------------------------------------------------
    @staticmethod
    def clean_name(k: int) -> str:
        return f"batch-{k:06d}.pt"

    @staticmethod
    def attack_name(k: int, j: int) -> str:
        return f"batch-{k:06d}-attack-{j:02d}.pt"

    def load(self, name: str) -> dict[str, Any] | None:
        path = self.folder / name
        return torch.load(path, weights_only=True) if path.exists() else None

    def save(self, name: str, record: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save(record, buf)
        atomic_write_bytes(self.folder / name, buf.getvalue())

    def load_checks(self) -> dict[str, Any] | None:
        path = self.folder / CHECKS
        return json.loads(path.read_text()) if path.exists() else None

    def save_checks(self, checks: dict[str, Any]) -> None:
        atomic_write_text(self.folder / CHECKS, json.dumps(checks, indent=2))

    def create_checks(self, checks: dict[str, Any]) -> dict[str, Any]:
        """Store the first batch's checks unless a shard stored them first; returns the stored ones (the one
        decision every shard follows, e.g. a fast AutoAttack's escalation)."""
        atomic_create_text(self.folder / CHECKS, json.dumps(checks, indent=2))
        stored = self.load_checks()
        assert stored is not None
        return stored

    def mark_done(self, shard: int, n_shards: int, n_batches: int) -> None:
        atomic_write_text(self.folder / f"shard-{shard}-of-{n_shards}.json",
                          json.dumps({"shard": shard, "shards": n_shards, "batches": n_batches}))


def read_states(folders: Iterable[str | Path]) -> tuple[dict[str, Any], list[Path], int, Path]:
    """The manifest shared by `folders`, the folders, the number of batches and the folder holding the first
    batch's checks. Errors name what differs or which shards are missing."""
    dirs = [Path(f) for f in folders]
    if not dirs:
        raise InputError("eval-merge needs at least one state folder")
    manifests = {}
    for f in dirs:
        path = f / MANIFEST
        if not path.is_file():
            raise InputError(f"{f} is not an evaluation state folder (no {MANIFEST}); write one with "
                             "robustlab eval --state DIR")
        manifests[f] = json.loads(path.read_text())
    first = dirs[0]
    for f in dirs[1:]:
        diff = _differences(manifests[first], manifests[f])
        if diff:
            raise InputError(f"cannot merge {first} and {f}: they evaluated different settings: "
                             + "; ".join(d.replace("this folder", str(first)).replace("this run", str(f))
                                         for d in diff))
    done: dict[int, int] = {}
    counts: set[int] = set()
    batches: set[int] = set()
    for f in dirs:
        for marker in f.glob("shard-*-of-*.json"):
            info = json.loads(marker.read_text())
            done[info["shard"]] = info["batches"]
            counts.add(info["shards"])
            batches.add(info["batches"])
    if not counts:
        raise InputError(f"no finished shard in {', '.join(map(str, dirs))}: resume the runs (same command) first")
    if len(counts) > 1:
        raise InputError(f"the dirs hold shards of different splits ({' and '.join(f'N={n}' for n in sorted(counts))}); "
                         "merge the shards of one split")
    n_shards = counts.pop()
    missing = [i for i in range(n_shards) if i not in done]
    if missing:
        raise InputError(f"incomplete set of shards: missing {', '.join(f'{i}/{n_shards}' for i in missing)} "
                         f"(run robustlab eval ... --shard I/{n_shards} --state DIR for each, then merge every folder)")
    n_batches = batches.pop()
    owner = next((f for f in dirs if (f / EvalState.clean_name(0)).exists()), None)
    if owner is None:
        raise InputError("no folder holds batch 0")
    return manifests[first], dirs, n_batches, owner


def read_records(folders: Iterable[str | Path]) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """Everything the shards of one evaluation wrote: (manifest, batch records in batch order, the first batch's
    checks or None). Each batch: {"k", "clean", "attacks": [one record per attack of the manifest's panel]}."""
    manifest, dirs, n_batches, owner = read_states(folders)
    n_attacks = len(manifest["attacks"])
    batches = [{"k": k, "clean": find_record(dirs, EvalState.clean_name(k)),
                "attacks": [find_record(dirs, EvalState.attack_name(k, j)) for j in range(n_attacks)]}
               for k in range(n_batches)]
    checks = owner / CHECKS
    return manifest, batches, (json.loads(checks.read_text()) if checks.exists() else None)


def find_record(folders: list[Path], name: str) -> dict[str, Any]:
    for f in folders:
        path = f / name
        if path.exists():
            return torch.load(path, weights_only=True)
    raise InputError(f"{name} is in none of the state folders {', '.join(map(str, folders))}: a shard is incomplete")


__all__ = ["EvalState", "read_states", "read_records", "find_record"]
