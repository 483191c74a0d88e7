"""Training methods. Each is a loss on a batch (`Method.loss`); methods needing several optimiser steps
per batch (Free-AT) override `Method.train_step`. `create_method("pgd-at", eps=0.3)` builds one by name."""
from robustlab.methods import baselines, critic, detection, multi_norm, part, wpgd  # noqa: F401  (registers the methods)
from robustlab.methods.base import Batch, LossOut, Method, StepContext, create_method

__all__ = ["Batch", "LossOut", "Method", "StepContext", "create_method"]
