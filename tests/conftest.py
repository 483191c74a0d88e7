"""Shared fixtures: tiny random models for invariants, and small trained models cached per session.

Trained models use robustlab's own training loop on the embedded data, seeded, so every run sees the
same weights. Threads are pinned to 1 (CI sets OMP_NUM_THREADS=1 as well).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


class Linear(nn.Module):
    """z = W x + b on flattened images: the analytic oracle of baselines.md section 4."""

    def __init__(self, d: int, k: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(d, k)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(k, d, generator=g) * 0.5)
            self.fc.bias.copy_(torch.randn(k, generator=g) * 0.1)

    def forward(self, x):
        return self.fc(x.flatten(1))


class TinyCNN(nn.Module):
    """Conv + BatchNorm + dropout-free head: small enough for hypothesis-driven invariant tests."""

    def __init__(self, c: int = 1, k: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, k)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        h = F.adaptive_avg_pool2d(h, 4)
        return self.fc(h.flatten(1))


def require(package: str):
    """A test-only package a cross-check needs (pyautoattack, torchattacks, ...): skipped where it is not installed,
    but in CI (CI=true, set by .ci/run, which installs every one of them) a missing package fails the test: a
    failed install must not turn cross-checks into silent skips."""
    if os.environ.get("CI") == "true":
        import importlib

        return importlib.import_module(package)
    return pytest.importorskip(package, reason=f"{package} is not installed (bash scripts/setup.sh --test)")


def process_running(pid: int) -> bool:
    """The process exists and is not a zombie (a killed child not yet reaped is dead)."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def train_classifier(model: nn.Module, x, y, *, epochs: int, adv_eps: float = 0.0, adv_steps: int = 5,
                     lr: float = 1e-3, batch_size: int = 100, seed: int = 0) -> nn.Module:
    """Plain (or PGD-AT when adv_eps > 0) training loop used to build test fixtures."""
    from robustlab.attacks import PGD

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[perm[i:i + batch_size]], y[perm[i:i + batch_size]]
            if adv_eps > 0:
                xb = PGD(model, eps=adv_eps, steps=adv_steps, step_size=2.5 * adv_eps / adv_steps, seed=i)(xb, yb)
            model.train()
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def mnist():
    from robustlab.data import load_dataset

    return load_dataset("mnist5k")


@pytest.fixture(scope="session")
def digits():
    from robustlab.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def mnist_cnn(mnist):
    """small-cnn (width 8) trained 2 epochs on mnist5k: ~90% clean accuracy, not robust."""
    from robustlab.models import create_model

    torch.manual_seed(0)
    model = create_model("small-cnn", width=8, hidden=64)
    return train_classifier(model, mnist.x_train, mnist.y_train, epochs=2)


@pytest.fixture(scope="session")
def digits_mlp(digits):
    from robustlab.models import create_model

    torch.manual_seed(0)
    model = create_model("mlp", input_size=8, hidden=64, depth=2)
    return train_classifier(model, digits.x_train, digits.y_train, epochs=30, lr=3e-3)


@pytest.fixture(scope="session")
def digits_mlp_at(digits):
    """PGD-AT (linf eps 0.1) MLP on the 8x8 digits: robust enough for AutoAttack to have work to do."""
    from robustlab.models import create_model

    torch.manual_seed(0)
    model = create_model("mlp", input_size=8, hidden=64, depth=2)
    return train_classifier(model, digits.x_train, digits.y_train, epochs=30, lr=3e-3, adv_eps=0.1)


@pytest.fixture(scope="session")
def digits_tiny_cnn(digits):
    """TinyCNN trained on the 8x8 digits (~97% clean, a second to train): the trained model every attack's
    invariants are checked on (a random model with random labels proves little)."""
    torch.manual_seed(0)
    return train_classifier(TinyCNN(c=1, k=10), digits.x_train, digits.y_train, epochs=20, lr=1e-2, batch_size=64)


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def linear_model():
    return Linear(16, 3).eval()


@pytest.fixture(scope="session", autouse=True)
def _robustlab_cache(tmp_path_factory):
    """Generated datasets (MNIST-Det) are cached, evaluations recorded, in per-session folders, never in the
    user's home."""
    os.environ["ROBUSTLAB_CACHE"] = str(tmp_path_factory.mktemp("robustlab-cache"))
    # `robustlab eval` records every evaluation in the results store: a per-session one, never the user's
    os.environ["ROBUSTLAB_STORE"] = str(tmp_path_factory.mktemp("robustlab-store") / "results.sqlite")
    yield


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that runs the CLI in-process (`--threads 2`) must not leave torch on other threads for the tests after
    it: a fixture trained later would come out with other weights (float sums in another order), so a test's
    outcome would depend on which tests ran before it on its worker."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


# pytest-xdist (CI runs `-n 2 --dist loadgroup`): tests that share an expensive trained fixture run on one worker,
# so the fixture is built once per run instead of once per worker.
_XDIST_GROUPS = {"trained_std_detector": "det-std", "standard": "train-robust", "multi_norm_trained": "multi-norm",
                 "wpgd_models": "wpgd"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marker into the node id
def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        for fixture, group in _XDIST_GROUPS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
                break
    # long tests first (a stable sort): xdist hands out the groups first, then single tests in this order, so a
    # minute-long test never starts last on one worker while the other sits idle
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_report_header(config):
    if torch.cuda.is_available():
        return f"cuda tests: run on {torch.cuda.get_device_name()}"
    return "cuda tests: skipped, no CUDA device (they run where torch.cuda.is_available(); see docs/benchmarks.md)"


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """Under `--dist loadgroup`, grouped tests carry their group in the node id; if they do not, xdist is not
    grouping (pytest >= 9.2 with pytest-xdist 3.8, xdist issue 1386) and every worker would train the shared
    fixtures again. Fail loudly instead of silently doubling CI time."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    grouped = [i for i in session.items if any(True for _ in i.iter_markers("xdist_group"))]
    if grouped and not any("@" in i.nodeid for i in grouped):
        raise pytest.UsageError("pytest-xdist --dist loadgroup is not grouping tests with this pytest version; "
                                "install the test extra (pytest < 9.2)")
