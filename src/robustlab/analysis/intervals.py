"""Intervals for claims made over seeds and test images.

Two sources of error sit in every robustness number: the seed (initialisation, data order, attack starts), measured by
repeating a run (`robustlab repeat`), and the finite test set, a binomial error over the test images. `t_interval`
gives the mean over seeds with Student's t interval; `clopper_pearson` the exact binomial interval of one accuracy;
`paired_difference` the difference of two configs paired by seed, with a verdict that says only what its interval
supports.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from scipy import stats

LEVEL = 0.95
NO_DIFFERENCE = "no detectable difference at this sample size"


def t_interval(values: Sequence[float], level: float = LEVEL) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof 1) and the Student-t interval of the mean of `values` (None bounds
    with fewer than two values: one run says nothing about the spread)."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = math.fsum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci": [None, None], "level": level}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci": [mean - half, mean + half], "level": level}


def clopper_pearson(k: int, n: int, level: float = LEVEL) -> list[float]:
    """The exact (Clopper-Pearson) interval of a proportion k / n."""
    if not 0 <= k <= n or n <= 0:
        raise ValueError(f"clopper_pearson needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    alpha = 1 - level
    lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return [lo, hi]


def sampling_error(values: Sequence[float], n_images: int, level: float = LEVEL) -> dict[str, Any]:
    """The test set's own error beside the seeds' spread: per seed the exact binomial interval of its accuracy over
    `n_images` images, and the binomial standard deviation sqrt(p (1 - p) / n) at the mean accuracy."""
    mean = math.fsum(values) / len(values)
    return {"n_images": n_images, "binomial_std": math.sqrt(max(mean * (1 - mean), 0.0) / n_images),
            "per_seed_ci": [clopper_pearson(round(v * n_images), n_images, level) for v in values]}


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL,
                      names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """a[i] - b[i] over the pairs (the same seed), its mean and t interval, and the verdict: "<A> better" when the
    whole interval is above 0 (higher is better), "<B> better" when it is below, else NO_DIFFERENCE."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs pairs: {len(a)} and {len(b)} values")
    out = t_interval([x - y for x, y in zip(a, b)], level)
    lo, hi = out["ci"]
    if lo is not None and lo > 0:
        out["verdict"] = f"{names[0]} better"
    elif hi is not None and hi < 0:
        out["verdict"] = f"{names[1]} better"
    else:
        out["verdict"] = NO_DIFFERENCE + (" (one pair: no interval)" if lo is None else "")
    return out


__all__ = ["t_interval", "clopper_pearson", "sampling_error", "paired_difference", "LEVEL", "NO_DIFFERENCE"]
