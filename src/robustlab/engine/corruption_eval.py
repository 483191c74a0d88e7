"""Accuracy under common corruptions (PART's CIFAR-10-C table): one number per corruption and severity,
read from the `<corruption>.npy` + `labels.npy` layout that `robustlab corruptions generate` writes."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from robustlab.data.corruptions import CORRUPTIONS
from robustlab.errors import DataError


def corruption_accuracy(models: Mapping[str, nn.Module], root: str | Path, *, corruptions=None,
                        severities=(1, 2, 3, 4, 5), n_samples: int | None = None, batch_size: int = 500,
                        device: str | torch.device = "cpu") -> dict[str, Any]:
    """{model: {corruption: {severity: accuracy, "mean": mean over severities}}, "clean" per model if
    `clean.npy` exists}. Missing corruption files raise a DataError naming what is there."""
    from robustlab.data.files import cifar10_c

    names = list(corruptions or [p for p in CORRUPTIONS if (Path(root) / f"{p}.npy").exists()])
    if not names:
        raise DataError(f"no corruption files (<corruption>.npy) in {root}")
    out: dict[str, Any] = {label: {} for label in models}
    for name in names:
        for sev in severities:
            data = cifar10_c(root, corruption=name, severity=int(sev))
            n = data.x_test.shape[0] if n_samples is None else min(n_samples, data.x_test.shape[0])
            x, y = data.x_test[:n], data.y_test[:n]
            for label, model in models.items():
                model.eval()
                correct = 0
                with torch.no_grad():
                    for i in range(0, n, batch_size):
                        xb = x[i:i + batch_size].to(device)
                        correct += int((model(xb).argmax(1).cpu() == y[i:i + batch_size]).sum())
                out[label].setdefault(name, {})[str(sev)] = correct / n
    for label in models:
        for name in names:
            accs = [v for k, v in out[label][name].items() if k != "mean"]
            out[label][name]["mean"] = sum(accs) / len(accs)
    return {"corruptions": names, "severities": list(severities), "accuracy": out}


def corruption_table(result: dict[str, Any], key: str = "mean") -> str:
    """Markdown: one row per corruption, one column per model (accuracy %, `key` = "mean" or a severity)."""
    models = list(result["accuracy"])
    lines = ["| corruption | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for name in result["corruptions"]:
        cells = [f"{100 * result['accuracy'][m][name][key]:.2f}" for m in models]
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    avg = [sum(result["accuracy"][m][n][key] for n in result["corruptions"]) / len(result["corruptions"]) for m in models]
    lines.append("| **mean** | " + " | ".join(f"**{100 * a:.2f}**" for a in avg) + " |")
    return "\n".join(lines)
