"""Material for the adversary-critic paper's human study (its Figure 4 and Table 2; critic.md 10).

For a set of test images: adversarial examples at the decision boundary (DeepFool with the paper's
settings: the smallest change of prediction) and at high confidence (the critic attack: closest-boundary
target, target confidence = the model's confidence on the original, as in Table 2). Written as image
grids (originals / boundary / high confidence, PNG), one PNG per adversarial image under shuffled ids,
`labels_to_fill.csv` for annotators (id, file, an empty label column: the kind and target hidden) and
`targets.csv` with the key (kind, test index, true label, adversarial target, confidences, l_2 size).
Scoring a filled sheet: the share labelled as the target ("change") and as the original ("no change").
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustlab.errors import InputError


def _grid(images: Tensor, ncol: int) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (rows*H + gaps, ncol*W + gaps, C) uint8 with 2-pixel white gaps."""
    n, c, h, w = images.shape
    rows = (n + ncol - 1) // ncol
    canvas = np.ones((rows * (h + 2) + 2, ncol * (w + 2) + 2, c), dtype=np.float32)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + q * (w + 2): 2 + q * (w + 2) + w] = arr[i]
    return (canvas * 255).round().astype(np.uint8)


def _save_png(arr: np.ndarray, path: Path, scale: int = 1) -> None:
    from PIL import Image

    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    img.save(path)


def export_adversarials(model: nn.Module, x: Tensor, y: Tensor, out_dir: str | Path, *, seed: int = 0,
                        deepfool_steps: int = 500, critic_steps: int = 500, scale: int = 4) -> dict[str, Any]:
    """Attack every correctly classified image of (x, y) both ways and write the study material to out_dir.
    Returns a summary (counts and the mean confidences of Figure 4: originals, boundary, high confidence)."""
    from robustlab.attacks.critic import CriticAttack
    from robustlab.attacks.deepfool import DeepFool
    from robustlab.validation import check_images, check_labels

    check_images(x)
    check_labels(y, x.shape[0])
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    model.eval()
    with torch.no_grad():
        p0 = F.softmax(model(x), 1)
    keep = (p0.argmax(1) == y).nonzero().squeeze(1)
    if keep.numel() == 0:
        raise InputError("the model misclassifies every image given; nothing to attack")
    x, y, p0 = x[keep], y[keep], p0[keep]
    kinds = {"boundary": DeepFool(model, steps=deepfool_steps, max_step=0.1, project=True).run(x, y),
             "high_confidence": CriticAttack(model, steps=critic_steps).run(x, y)}
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"n_images": int(x.shape[0]), "mean_confidence_original": p0.amax(1).mean().item()}
    _save_png(_grid(x, 10), out / "originals.png", scale)
    for kind, res in kinds.items():
        with torch.no_grad():
            p = F.softmax(model(res.x_adv), 1)
        pred = p.argmax(1)
        assert res.success is not None  # AttackOut.run fills it (with_success=True)
        ok = res.success
        _save_png(_grid(res.x_adv, 10), out / f"{kind}.png", scale)
        summary[f"mean_confidence_{kind}"] = p.amax(1)[ok].mean().item() if bool(ok.any()) else None
        summary[f"n_success_{kind}"] = int(ok.sum())
        l2 = (res.x_adv - x).flatten(1).norm(dim=1)
        for i in ok.nonzero().squeeze(1).tolist():
            rows.append({"kind": kind, "test_index": int(keep[i]), "true_label": int(y[i]), "target": int(pred[i]),
                         "clean_confidence": round(p0[i].max().item(), 4),
                         "adversarial_confidence": round(p[i, pred[i]].item(), 4), "l2": round(l2[i].item(), 4),
                         "_image": res.x_adv[i]})
    order = np.random.default_rng(seed).permutation(len(rows))  # shuffled ids: annotators cannot infer the kind
    key_fields = ["id", "file", "kind", "test_index", "true_label", "target", "clean_confidence",
                  "adversarial_confidence", "l2"]
    with open(out / "targets.csv", "w", newline="") as fk, open(out / "labels_to_fill.csv", "w", newline="") as fl:
        key, sheet = csv.DictWriter(fk, key_fields), csv.writer(fl)
        key.writeheader()
        sheet.writerow(["id", "file", "label"])
        for new_id, j in enumerate(order):
            row = rows[j]
            fname = f"images/{new_id:05d}.png"
            _save_png(_grid(row.pop("_image")[None], 1)[2:-2, 2:-2], out / fname, scale)
            key.writerow({"id": new_id, "file": fname, **row})
            sheet.writerow([new_id, fname, ""])
    summary["n_exported"] = len(rows)
    return summary


def score_labels(targets_csv: str | Path, labels_csv: str | Path) -> dict[str, dict[str, float]]:
    """Per kind: the share of labelled images given the adversarial target ("change") and the original
    class ("no change"), from a filled labels_to_fill.csv (Table 2 of the paper)."""
    with open(targets_csv) as f:
        key = {r["id"]: r for r in csv.DictReader(f)}
    out: dict[str, dict[str, float]] = {}
    counts: dict[str, list[int]] = {}
    with open(labels_csv) as f:
        for r in csv.DictReader(f):
            lab = (r.get("label") or "").strip()
            if not lab:
                continue
            if r["id"] not in key:
                raise InputError(f"{labels_csv}: id {r['id']} is not in {targets_csv}")
            k = key[r["id"]]
            c = counts.setdefault(k["kind"], [0, 0, 0])
            c[0] += 1
            c[1] += int(lab == k["target"])
            c[2] += int(lab == k["true_label"])
    for kind, (n, change, same) in counts.items():
        out[kind] = {"n": n, "change": change / n, "no_change": same / n}
    return out
