"""What other tools read: a RobustBench `model_info`-style entry, and adversarial examples as safetensors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robustlab.outputs import atomic_write_bytes


def eps_text(eps: float) -> str:
    """RobustBench writes budgets as strings: 8/255 for multiples of 1/255, else the number ("0.5")."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 and eps < 1 else f"{eps:g}"


def robustbench_entry(result: dict[str, Any], *, model_name: str, dataset: str | None) -> dict[str, Any]:
    """The entry RobustBench's `model_info/<dataset>/<threat>/<name>.json` files hold, from an `evaluate` result with
    an AutoAttack attack: accuracies as percent strings with two decimals, eps as a string."""
    name, aa = next((n, a) for n, a in result["attacks"].items() if a.get("attack") == "autoattack")
    threat = {"linf": "Linf", "l2": "L2"}[aa["norm"]]
    return {
        "name": model_name,
        "dataset": dataset,
        "threat_model": threat,
        "eps": eps_text(float(aa["eps"])),
        "clean_acc": f"{100 * result['clean_accuracy']:.2f}",
        "autoattack_acc": f"{100 * aa['robust_accuracy']:.2f}",
        "number_forward_passes": 1,  # forward passes the model makes per prediction (RobustBench's field)
        "additional_data": False,
        "n_samples": result["n_samples"],
        "evaluated_with": f"robustlab {name} ({aa.get('version', 'standard')})",
    }


def save_adversarials(path: str | Path, adversarials: dict[str, Tensor], records: dict[str, Any],
                      specs: list[str]) -> None:
    """One safetensors file: per attack NAME, `NAME.x_adv` (float32, every sample; x itself where the clean
    prediction was wrong) and `NAME.robust` (uint8 0/1), plus `y` and `clean_correct`; the attack specs in the
    metadata. Floats, never PNG/uint8: quantising to 1/255 steps destroys small perturbations."""
    from safetensors.torch import save

    y = torch.tensor(records["label"], dtype=torch.int64)
    tensors = {"y": y, "clean_correct": (torch.tensor(records["clean_pred"]) == y).to(torch.uint8)}
    for name, x_adv in adversarials.items():
        tensors[f"{name}.x_adv"] = x_adv.float().contiguous()
        tensors[f"{name}.robust"] = torch.tensor(records["robust"][name], dtype=torch.uint8)
    atomic_write_bytes(path, save(tensors, metadata={"attack_specs": json.dumps(specs)}))
