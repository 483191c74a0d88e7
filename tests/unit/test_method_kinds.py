"""Every registered method is one of the two kinds (methods/base.py): a LossMethod (a loss; the Trainer steps) or a
StepMethod (its own optimiser steps, no loss), never both and never a stub loss beside a train_step."""
import inspect

import pytest

from robustlab.methods import LossMethod, StepMethod
from robustlab.registry import METHODS


@pytest.mark.parametrize("name", METHODS.names())
def test_each_method_is_a_loss_method_or_a_step_method(name):
    cls = METHODS.get(name)
    assert inspect.isclass(cls)
    assert issubclass(cls, LossMethod) != issubclass(cls, StepMethod), name
    if issubclass(cls, StepMethod):
        assert not hasattr(cls, "loss"), f"{name} is a step method with a loss"
        assert "train_step" in {k for c in cls.__mro__ if c is not StepMethod for k in vars(c)}, name
    else:
        assert not inspect.isabstract(cls), name


def test_the_kinds_include_the_step_methods_of_the_papers():
    step = {n for n in METHODS.names() if issubclass(METHODS.get(n), StepMethod)}
    assert step == {"free-at", "critic", "mng-ac", "cwat-fast", "mtd-fast"}
