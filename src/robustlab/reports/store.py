"""The local results store: every `robustlab eval` of a classifier, summary and per-sample robustness, in SQLite.

Keyed by the model's weight hash, the data and the threat model ("linf:8/255"), so the same network evaluated from
a checkpoint, a TorchScript file or its own code is one entry. The leaderboard's *best-known* robust accuracy is
per sample the worst case over every attack ever run on that model, data and threat (RobustBench's `external`
field). Writers (DDP ranks, two terminals) are serialised by SQLite itself: WAL journal, one transaction per
evaluation, a busy timeout instead of failing.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from robustlab.errors import InputError, RobustlabError

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_hash TEXT NOT NULL, model TEXT NOT NULL, data TEXT NOT NULL, threat TEXT NOT NULL,
    attack TEXT NOT NULL, spec TEXT NOT NULL, clean_accuracy REAL NOT NULL, robust_accuracy REAL NOT NULL,
    n_samples INTEGER NOT NULL, created TEXT NOT NULL, robustlab_version TEXT NOT NULL,
    metric TEXT NOT NULL DEFAULT 'accuracy'
);
CREATE TABLE IF NOT EXISTS samples (
    evaluation_id INTEGER NOT NULL REFERENCES evaluations(id), idx INTEGER NOT NULL,
    clean_correct INTEGER NOT NULL, robust INTEGER NOT NULL, PRIMARY KEY (evaluation_id, idx)
);
CREATE INDEX IF NOT EXISTS evaluations_key ON evaluations (model_hash, data, threat);
"""


def default_store() -> Path:
    """$ROBUSTLAB_STORE, else ~/.robustlab/results.sqlite."""
    return Path(os.environ.get("ROBUSTLAB_STORE") or Path.home() / ".robustlab" / "results.sqlite")


def model_hash(model: nn.Module) -> str:
    """SHA-256 of the model's weights and buffers (names, dtypes, shapes, bytes), wrappers' prefixes included."""
    from robustlab.engine.checkpoint import tensors_sha256

    return tensors_sha256({k: v for k, v in model.state_dict().items()})


def data_key(info: dict[str, Any]) -> str:
    """What was evaluated, as a key: 'mnist5k:test' (with its options), or 'file:<sha256 prefix>' of an array file
    (its contents, so a renamed copy is the same data)."""
    if info.get("name") == "file":
        import hashlib

        h = hashlib.sha256()
        with open(info["path"], "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return f"file:{h.hexdigest()[:16]}"
    opts = ",".join(f"{k}={v}" for k, v in sorted((info.get("kwargs") or {}).items()))
    return f"{info['name']}{'[' + opts + ']' if opts else ''}:{info.get('split', 'test')}"


def threat_key(norm: str | None, eps: Any) -> str:
    """'linf:8/255', 'l2:0.5'; 'l2:unbounded' for a minimal attack without a budget, 'linf:per-sample' for a
    tensor budget."""
    from robustlab.reports.exports import eps_text

    if eps is None:
        return f"{norm or 'none'}:unbounded"
    if not isinstance(eps, (int, float)):
        return f"{norm or 'none'}:per-sample"
    return f"{norm}:{eps_text(float(eps))}"


def parse_threat(text: str) -> str:
    """A threat filter as the store writes it: 'linf:0.30', 'Linf:76.5/255' -> 'linf:0.3'; 'l2:unbounded' as is.
    A filter that is not NORM:BUDGET is refused (it would match nothing, silently)."""
    from robustlab.threat.lp import normalise_norm
    from robustlab.validation import parse_value

    norm, sep, budget = str(text).partition(":")
    if not sep or not budget.strip():
        raise InputError(f"--threat {text!r}: expected NORM:BUDGET, e.g. linf:8/255, linf:0.3, l2:0.5 or (detectors, "
                         "pixel units) linf:8px")
    if norm.strip() == "none" and budget.strip() == "unbounded":  # an unbounded attack without a norm (DAG)
        return "none:unbounded"
    norm = normalise_norm(norm.strip())
    if budget.strip() in ("unbounded", "per-sample"):
        return f"{norm}:{budget.strip()}"
    pixels = budget.strip().endswith("px")
    if pixels:
        budget = budget.strip()[:-2]
    try:
        value = parse_value(budget)
    except RobustlabError:
        value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"--threat {text!r}: the budget {budget!r} is not a positive number (e.g. 0.3, 8/255, "
                         "8px), 'unbounded' or 'per-sample'")
    return detector_threat_key(norm, value) if pixels else threat_key(norm, float(value))


def store_contents(path: str | Path) -> dict[str, list[str]]:
    """The data and threat keys the store holds (what a filter can match)."""
    with _connect(Path(path)) as con:
        return {"data": [r[0] for r in con.execute("SELECT DISTINCT data FROM evaluations ORDER BY data")],
                "threat": [r[0] for r in con.execute("SELECT DISTINCT threat FROM evaluations ORDER BY threat")]}


def store_problem(path: str | Path) -> str | None:
    """Why the store at `path` cannot be written (None when it can): its folder is made if missing, the schema
    created and a write lock taken and released, so a command learns it before its work, not after."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _connect(path) as con:
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
    except (sqlite3.Error, OSError) as e:  # a read-only folder or file, a path through a file, a full disk
        return f"{type(e).__name__}: {e}"
    return None


@contextlib.contextmanager
def _transaction(path: Path) -> Iterator[sqlite3.Connection]:
    """One write transaction on the store: committed when the block ends, rolled back whatever stopped it (a reader
    never sees half an evaluation)."""
    with _connect(path) as con:
        con.execute("BEGIN IMMEDIATE")
        committed = False
        try:
            yield con
            con.execute("COMMIT")
            committed = True
        finally:
            if not committed:
                con.execute("ROLLBACK")


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=120, isolation_level=None)  # explicit transactions below
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=120000")
        con.executescript(SCHEMA)
        columns = {row[1] for row in con.execute("PRAGMA table_info(evaluations)")}
        if "metric" not in columns:  # a store written before detectors were recorded: every row is an accuracy
            try:
                con.execute("ALTER TABLE evaluations ADD COLUMN metric TEXT NOT NULL DEFAULT 'accuracy'")
            except sqlite3.OperationalError as e:  # another writer added it a moment ago
                if "duplicate column" not in str(e):
                    raise
        yield con
    finally:
        con.close()


def record(path: str | Path, *, model_digest: str, model_name: str, data: str, result: dict[str, Any],
           specs: list[str], version: str) -> list[int]:
    """Store one `evaluate` result made with keep_records=True, for the model whose weights hash to `model_digest`
    (`model_hash`): one row per attack and its per-sample flags, all in one transaction (a reader never sees half
    an evaluation). Returns the evaluation ids."""
    if "map" in (result.get("clean") or {}):  # a detector: mAP per attack, no per-sample flags
        return _record_detector(path, model_digest=model_digest, model_name=model_name, data=data, result=result,
                                specs=specs, version=version)
    records = result.get("records")
    if records is None:
        raise ValueError("record() needs an evaluate result made with keep_records=True")
    digest = model_digest
    labels, preds = records["label"], records["clean_pred"]
    clean = [int(a == b) for a, b in zip(labels, preds)]
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    ids = []
    with _transaction(Path(path)) as con:
        for (name, entry), spec in zip(result["attacks"].items(), specs):
            cur = con.execute(
                "INSERT INTO evaluations (model_hash, model, data, threat, attack, spec, clean_accuracy, "
                "robust_accuracy, n_samples, created, robustlab_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (digest, model_name, data, threat_key(entry.get("norm"), entry.get("eps")), attack_kind(entry, name),
                 spec, result["clean_accuracy"], entry["robust_accuracy"], result["n_samples"], now, version))
            eid = int(cur.lastrowid or 0)
            ids.append(eid)
            # robust: 0 or 1, or a randomised model's expected accuracy (a share; SQLite keeps it REAL), so the
            # best-known accuracy takes per sample the lowest over the evaluations, as evaluate's union does
            con.executemany("INSERT INTO samples (evaluation_id, idx, clean_correct, robust) VALUES (?, ?, ?, ?)",
                            [(eid, i, c, r if isinstance(r, float) else int(r))
                             for i, (c, r) in enumerate(zip(clean, records["robust"][name]))])
    return ids


def attack_kind(entry: dict[str, Any], name: str) -> str:
    """The attack as the store and the leaderboard name it: AutoAttack's fast version is "autoattack-fast" (the
    leaderboard's AutoAttack column is the standard protocol: standard, or rand for a randomised model, which
    includes a fast evaluation that escalated)."""
    attack = entry.get("attack", name)
    if attack == "autoattack" and entry.get("ran", entry.get("version")) == "fast":
        return "autoattack-fast"
    return attack


def detector_threat_key(norm: str | None, eps: Any) -> str:
    """A detector's threat: the budget in pixel units (0-255), marked so: 'linf:8px'; 'none:unbounded' for DAG."""
    if eps is None:
        return f"{norm or 'none'}:unbounded"
    return f"{norm}:{float(eps):g}px"


def _record_detector(path: str | Path, *, model_digest: str, model_name: str, data: str, result: dict[str, Any],
                     specs: list[str], version: str) -> list[int]:
    """One row per attack of a detector evaluation (metric 'map': clean and attacked mAP), in one transaction."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    ids = []
    with _transaction(Path(path)) as con:
        for name, entry in result["attacks"].items():
            cur = con.execute(
                "INSERT INTO evaluations (model_hash, model, data, threat, attack, spec, clean_accuracy, "
                "robust_accuracy, n_samples, created, robustlab_version, metric) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?, ?, 'map')",
                (model_digest, model_name, data, detector_threat_key(entry.get("norm"), entry.get("eps")),
                 entry.get("attack", name), name, result["clean"]["map"], entry["map"], result["n_images"],
                 now, version))
            ids.append(int(cur.lastrowid or 0))
    return ids


def leaderboard(path: str | Path, *, data: str | None = None, threat: str | None = None) -> list[dict[str, Any]]:
    """One row per (model, data, threat): clean accuracy, the latest AutoAttack robust accuracy, and the best-known
    robust accuracy (per sample: clean-correct and robust to every attack ever run), sorted best first. A detector's
    row (metric 'map') holds its clean mAP and the best-known robust mAP: the lowest mAP any attack of that threat
    reached."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no results store at {path}; `robustlab eval` records there (or pass --store PATH)")
    where, args = [], []
    if data:  # "mnist5k" matches every split of it ("mnist5k:test"), "mnist5k:test" only that
        where.append("(e.data = ? OR substr(e.data, 1, length(?) + 1) = ? || ':')")
        args += [data, data, data]
    if threat:
        threat = parse_threat(threat)
        where.append("e.threat = ?")
        args.append(threat)
    cond = ("WHERE " + " AND ".join(where)) if where else ""
    with _connect(path) as con:
        keys = con.execute(f"SELECT DISTINCT e.model_hash, e.data, e.threat FROM evaluations e {cond}", args).fetchall()
        rows = []
        for digest, d, t in keys:
            key = (digest, d, t)
            evals = con.execute("SELECT id, model, attack, clean_accuracy, robust_accuracy, n_samples, metric FROM "
                                "evaluations WHERE model_hash = ? AND data = ? AND threat = ? ORDER BY id",
                                key).fetchall()
            if evals[-1][6] == "map":
                rows.append({
                    "model": evals[-1][1], "model_hash": digest[:12], "data": d, "threat": t, "metric": "map",
                    "clean_accuracy": evals[-1][3], "autoattack_accuracy": None,
                    "best_known_accuracy": min(e[4] for e in evals), "n_samples": evals[-1][5],
                    "evaluations": len(evals), "attacks": sorted({e[2] for e in evals}),
                })
                continue
            best = con.execute(
                "SELECT COUNT(*), SUM(ok) FROM (SELECT s.idx, MIN(s.clean_correct * s.robust) AS ok FROM samples s "
                "JOIN evaluations e ON e.id = s.evaluation_id WHERE e.model_hash = ? AND e.data = ? AND e.threat = ? "
                "GROUP BY s.idx)", key).fetchone()
            aa = [e for e in evals if e[2] == "autoattack"]
            rows.append({
                "model": evals[-1][1], "model_hash": digest[:12], "data": d, "threat": t, "metric": "accuracy",
                "clean_accuracy": evals[-1][3],
                "autoattack_accuracy": aa[-1][4] if aa else None,
                "best_known_accuracy": (best[1] or 0) / best[0] if best[0] else None,
                "n_samples": best[0], "evaluations": len(evals),
                "attacks": sorted({e[2] for e in evals}),
            })
    return sorted(rows, key=lambda r: (-(r["best_known_accuracy"] or 0), r["model"]))


def format_leaderboard(rows: list[dict[str, Any]], fmt: str) -> str:
    """md | csv | json | html."""
    import csv
    import html
    import io
    import json

    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    cols = ["model", "model_hash", "data", "threat", "metric", "clean", "autoattack", "best known", "n", "evaluations",
            "attacks"]

    def cells(r: dict[str, Any]) -> list[str]:
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
        return [r["model"], r["model_hash"], r["data"], r["threat"], r["metric"], pct(r["clean_accuracy"]),
                pct(r["autoattack_accuracy"]), pct(r["best_known_accuracy"]), str(r["n_samples"]),
                str(r["evaluations"]), " ".join(r["attacks"])]

    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        w.writerows(cells(r) for r in rows)
        return buf.getvalue()
    if fmt == "html":
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells(r)) + "</tr>" for r in rows)
        return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>\n"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
