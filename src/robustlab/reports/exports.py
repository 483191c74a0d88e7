"""What other tools read: a RobustBench `model_info`-style entry, and adversarial examples as safetensors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from robustlab.errors import InputError
from robustlab.outputs import atomic_write_bytes


def eps_text(eps: float) -> str:
    """RobustBench writes budgets as strings: 8/255 for multiples of 1/255, else the number ("0.5")."""
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-6 and eps < 1 else f"{eps:g}"


# the keys of RobustBench's model_info files that only the user knows (`--robustbench-info KEY=VALUE`); null when
# not given, so the entry drops into model_info/<dataset>/<threat>/ as it is and shows what is missing
ROBUSTBENCH_INFO = ("name", "link", "authors", "venue", "architecture", "reported", "footnote", "dataset",
                    "additional_data", "number_forward_passes")


def parse_robustbench_info(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` items -> {key: value}: additional_data true/false, number_forward_passes an integer, the rest
    strings (RobustBench writes accuracies and budgets as strings)."""
    from robustlab.validation import parse_assignment

    out: dict[str, Any] = {}
    for item in items:
        key, value = parse_assignment(item, "--robustbench-info", literal=False)
        if key not in ROBUSTBENCH_INFO:
            raise InputError(f"--robustbench-info {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(ROBUSTBENCH_INFO)}")
        if key == "additional_data":
            if value.lower() not in ("true", "false"):
                raise InputError(f"--robustbench-info {item!r}: additional_data is true or false")
            out[key] = value.lower() == "true"
        elif key == "number_forward_passes":
            if not value.isdigit() or int(value) < 1:
                raise InputError(f"--robustbench-info {item!r}: number_forward_passes is a positive integer")
            out[key] = int(value)
        else:
            out[key] = value
    return out


def robustbench_entry(result: dict[str, Any], *, model_name: str, dataset: str | None,
                      info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The entry RobustBench's `model_info/<dataset>/<threat>/<name>.json` files hold, from an `evaluate` result with
    an AutoAttack attack: accuracies as percent strings with two decimals, eps as a string; `info` gives the keys
    only the user knows (ROBUSTBENCH_INFO; null where not given). dataset: a named dataset, None for a file."""
    name, aa = next((n, a) for n, a in result["attacks"].items()
                    if a.get("attack") == "autoattack" and a.get("ran", a.get("version")) != "fast")
    threat = {"linf": "Linf", "l2": "L2"}[aa["norm"]]
    entry: dict[str, Any] = {key: None for key in ROBUSTBENCH_INFO}
    entry.update({
        "name": model_name,
        "dataset": dataset,
        "threat_model": threat,
        "eps": eps_text(float(aa["eps"])),
        "clean_acc": f"{100 * result['clean_accuracy']:.2f}",
        "autoattack_acc": f"{100 * aa['robust_accuracy']:.2f}",
        "number_forward_passes": 1,  # forward passes the model makes per prediction (RobustBench's field)
        "additional_data": False,
    })
    entry.update(info or {})
    entry.update({"n_samples": result["n_samples"],
                  "evaluated_with": f"robustlab {name} ({aa.get('version', 'standard')})"})
    return entry


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
        flags = records["robust"][name]  # 0/1, or a randomised model's expected accuracies (float32 shares)
        tensors[f"{name}.robust"] = torch.tensor(flags, dtype=torch.float32 if any(isinstance(v, float) for v in flags)
                                                 else torch.uint8)
    atomic_write_bytes(path, save(tensors, metadata={"attack_specs": json.dumps(specs)}))
