"""Training methods, one file per method or family. A `LossMethod` is a loss on a batch; a `StepMethod` runs its
own optimiser steps (`train_step`). `create_method("pgd-at", eps=0.3)` builds one by name."""
from robustlab.methods import (  # noqa: F401  (each module registers its methods)
    adv_avg_max,
    critic,
    detection,
    fast_at,
    fgsm_at,
    free_at,
    margin,
    mart,
    mng_ac,
    msd,
    part,
    pgd_at,
    sat,
    single_norm,
    standard,
    trades,
    vat,
    wpgd,
)
from robustlab.methods.base import LossMethod, Method, StepMethod, create_method
from robustlab.types import Batch, LossOut, StepContext

__all__ = ["Batch", "LossMethod", "LossOut", "Method", "StepContext", "StepMethod", "create_method"]
