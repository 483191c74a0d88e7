"""PNG figures for reports (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from robustlab.outputs import atomic_save_figure


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: matplotlib is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_eps(curves: dict[str, tuple[list[float], list[float]]], path: Path, title: str, xlabel: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for name, (eps, acc) in curves.items():
        ax.plot(eps, [100 * a for a in acc], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
    return path


def training_curves(histories: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), dpi=120)
    for name, hist in histories.items():
        ep = [h["epoch"] for h in hist]
        axes[0].plot(ep, [100 * h["train_accuracy"] for h in hist], marker=".", label=f"{name} (train batches)")
        ev = [h for h in hist if "eval_robust" in h]
        axes[1].plot([h["epoch"] for h in ev], [100 * h["eval_clean"] for h in ev], marker="o", label=f"{name} clean")
        axes[1].plot([h["epoch"] for h in ev], [100 * h["eval_robust"] for h in ev], marker="s", ls="--",
                     label=f"{name} robust")
    axes[0].set_title("training accuracy (on the method's inputs)")
    axes[1].set_title("held-out accuracy during training")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylabel("%")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
    return path


def per_class_bars(results: dict[str, dict[str, Any]], path: Path) -> Path:
    import numpy as np

    plt = pyplot()
    names = list(results)
    classes = sorted({c for r in results.values() for c in r["per_class"]}, key=int)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.9), dpi=120, squeeze=False)
    xs = np.arange(len(classes))
    for ax, name in zip(axes[0], names):
        pc = results[name]["per_class"]
        ax.bar(xs - 0.2, [100 * pc[c]["clean_accuracy"] for c in classes], 0.4, label="clean")
        ax.bar(xs + 0.2, [100 * pc[c]["union_accuracy"] for c in classes], 0.4, label="robust (all attacks)")
        ax.set_xticks(xs, classes)
        ax.set_xlabel("class")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)
    return path
