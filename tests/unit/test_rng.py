"""No generator crosses devices (robustlab/rng.py): every seeded draw in the package goes through the checked
helpers, the check refuses a generator of another device, and the device-side generators the Trainer and the
attacks make are only ever drawn from with the device named (tests/engine/test_smoke.py records every draw of
every shipped config's run)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from robustlab import rng

SRC = Path(rng.__file__).parent
DRAWS = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
         "multinomial", "poisson"}
IN_PLACE = {"uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_", "cauchy_", "log_normal_"}


def _seeded_draws_outside_rng(src: Path = SRC) -> list[str]:
    found = []
    for path in src.rglob("*.py"):
        if path.name == "rng.py" and path.parent == src:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if not any(k.arg == "generator" for k in node.keywords):
                continue
            f = node.func
            direct = isinstance(f.value, ast.Name) and f.value.id == "torch" and f.attr in DRAWS
            if direct or f.attr in IN_PLACE:
                found.append(f"{path.relative_to(src)}:{node.lineno} {f.attr}")
    return found


def test_every_seeded_draw_goes_through_the_checked_helpers():
    assert _seeded_draws_outside_rng() == []


def test_the_scan_finds_a_direct_draw(tmp_path):
    (tmp_path / "x.py").write_text("import torch\ng = None\nu = torch.rand(3, generator=g)\n"
                                   "v = u.uniform_(generator=g)\nw = torch.rand(3)\n")
    assert _seeded_draws_outside_rng(tmp_path) == ["x.py:3 rand", "x.py:4 uniform_"]


def test_a_generator_of_another_device_is_refused_before_torch_sees_it():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(rng.GeneratorDeviceError, match="generator on cpu cannot draw a tensor on meta"):
        rng.rand(3, generator=g, device="meta")
    assert rng.same_device(torch.device("cuda", 0), torch.device("cuda", 0))
    assert not rng.same_device(torch.device("cuda", 0), torch.device("cpu"))
    assert not rng.same_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert not rng.same_device(torch.device("cpu"), torch.device("cuda", 0))


def test_helpers_match_torch_draw_for_draw():
    a = rng.randint(0, 10, (5,), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 10, (5,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.int64
    g = rng.device_generator("cpu", 4)
    assert torch.equal(rng.randn(2, 3, generator=g), torch.randn(2, 3, generator=torch.Generator().manual_seed(4)))


@pytest.mark.cuda  # conftest skips it, saying why, where torch.cuda.is_available() is False
def test_a_cuda_generator_cannot_draw_on_the_host():
    with pytest.raises(rng.GeneratorDeviceError):
        rng.randint(0, 2 ** 62, (4,), generator=rng.device_generator("cuda", 0))  # the old FileSource bug
