"""Shared machinery of every attack: the result type, pass counting, model state, and the `Attack` base.

An attack is a small object binding hyper-parameters to a model; calling it runs the attack's pure
core (`_run`) inside `attack_mode`, which puts the model in eval mode with frozen parameters and
restores both in `finally`. Randomness comes only from a `torch.Generator` seeded per call.
"""
from __future__ import annotations

import contextlib
import weakref
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch
from torch import Tensor, nn

from robustlab import rng
from robustlab.errors import InputError, InputTypeError
from robustlab.threat import LpBall, per_sample_norm
from robustlab.types import AttackOut
from robustlab.utils import compile_module
from robustlab.validation import check_choice, check_fits_model, check_images, check_labels, check_logits

PRECISIONS = ("fp32", "bf16")
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()


def compiled(model: nn.Module) -> nn.Module:
    """`torch.compile(model, dynamic=True)`, built once per model (batch sizes change as samples leave the batch,
    hence dynamic shapes); it shares the model's parameters."""
    if model not in _COMPILED:
        _COMPILED[model] = compile_module(model, dynamic=True)
    return _COMPILED[model]


def _to_fp32(out: Any) -> Any:
    return out.float() if isinstance(out, Tensor) else tuple(o.float() for o in out)


class PassCounter:
    """Runs the model and input gradients for an attack, counting image-passes.

    Counting uses the batch size (a Python int), so it never synchronises with the device.
    precision="bf16" runs the forward under bf16 autocast and hands back fp32 outputs, so losses, gradients
    (w.r.t. the fp32 input) and projections stay fp32; compile=True runs the forward through `torch.compile`.
    """

    def __init__(self, model: nn.Module, y_for_check: Tensor | None = None, *, precision: str = "fp32",
                 compile: bool = False, eot: int = 1) -> None:
        self.model = model
        self.eot = eot
        self.forward = 0
        self.backward = 0
        self._y = y_for_check
        self._net = compiled(model) if compile else model
        check_choice(precision, "precision", PRECISIONS)
        self._bf16 = precision == "bf16"

    def _run_model(self, x: Tensor) -> Any:
        if not self._bf16:
            return self._net(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return _to_fp32(self._net(x))

    def logits(self, x: Tensor) -> Tensor:
        """The model's output at x. Without gradients it runs under `torch.inference_mode` (such outputs cannot
        be modified in place)."""
        if torch.is_grad_enabled():
            out = self._run_model(x)
        else:
            with torch.inference_mode():
                out = self._run_model(x)
        self.forward += x.shape[0]
        if self._y is not None:  # first call only: validate the output and labels against the number of classes
            check_logits(out, x.shape[0])
            check_labels(self._y, self._y.shape[0], num_classes=out.shape[1])
            self._y = None
        return out

    def grad(self, objective: Tensor, x: Tensor, create_graph: bool = False, retain_graph: bool | None = None) -> Tensor:
        """Gradient of a scalar objective w.r.t. x (a sum of per-sample losses: batch-size invariant)."""
        (g,) = torch.autograd.grad(objective, x, create_graph=create_graph, retain_graph=retain_graph)
        self.backward += x.shape[0]
        return g

    def success_rate(self, x: Tensor, success: Callable[[Tensor], Tensor]) -> Tensor:
        """Per sample, the share of `eot` forward passes at x whose output satisfies `success` (0 or 1 with
        eot=1): for a randomised model the EoT estimate, never one draw."""
        with torch.no_grad():
            hits = [success(self.logits(x)) for _ in range(self.eot)]
        return hits[0].to(x.dtype) if self.eot == 1 else torch.stack(hits).to(x.dtype).mean(0)

    def accuracy(self, x: Tensor, y: Tensor) -> Tensor:
        """Per sample, the share of `eot` forward passes at x that predict y (`success_rate`)."""
        return self.success_rate(x, lambda out: out.argmax(1) == y)

    def success_and_grad(self, x: Tensor, loss_fn, y: Tensor, target: Tensor | None,
                         success: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The EoT estimates at x, from `eot` forward/backward passes: per sample the share of the passes whose
        output satisfies `success` (0 or 1 with eot=1), the mean loss and the mean input gradient. Attacks judge
        an iterate of a randomised model by this share, never by one draw (one fooling draw says little)."""
        x = x.detach().requires_grad_(True)

        def one_pass() -> tuple[Tensor, Tensor, Tensor]:
            with torch.enable_grad():
                out = self.logits(x)
                loss = loss_fn(out, y, target)
                g = self.grad(loss.sum(), x)
            return success(out.detach()).to(x.dtype), loss.detach(), g.detach()

        rate, loss_sum, g_sum = one_pass()
        for _ in range(self.eot - 1):  # running sums: memory of one gradient whatever eot is
            hit, loss, g = one_pass()
            rate, loss_sum, g_sum = rate + hit, loss_sum + loss, g_sum + g
        if self.eot == 1:
            return rate, loss_sum, g_sum
        return rate / self.eot, loss_sum / self.eot, g_sum / self.eot

    def loss_and_grad(self, x: Tensor, loss_fn, y: Tensor, target: Tensor | None = None) -> tuple[Any, Tensor, Tensor]:
        """The model's output (logits; a detector's (loc, conf)), the per-sample loss and its input gradient at x
        (one forward, one backward). With `eot` > 1 (expectation over transformation, for models with randomness
        in the forward pass) the gradient is the mean over `eot` passes and the output and loss are the last
        pass's, as in the reference APGD."""
        x = x.detach().requires_grad_(True)
        g_sum: Tensor | None = None
        for _ in range(self.eot):
            with torch.enable_grad():
                out = self.logits(x)
                loss = loss_fn(out, y, target)
                g = self.grad(loss.sum(), x)
            g_sum = g if g_sum is None else g_sum + g
        assert g_sum is not None
        g = g_sum / self.eot if self.eot > 1 else g_sum
        out = out.detach() if isinstance(out, Tensor) else tuple(o.detach() for o in out)
        return out, loss.detach(), g.detach()


BNMode = Literal["eval", "train"]


def check_bn_mode(bn_mode: str, name: str = "bn_mode") -> BNMode:
    """BatchNorm's mode during an attack: 'eval' (running statistics) or 'train' (batch statistics)."""
    if bn_mode == "eval":
        return "eval"
    if bn_mode == "train":
        return "train"
    raise InputError(f"{name} must be 'eval' or 'train', got {bn_mode!r}")


@contextlib.contextmanager
def attack_mode(model: nn.Module, bn_mode: BNMode = "eval") -> Iterator[nn.Module]:
    """Model in eval (or train) mode with `requires_grad=False` on every parameter; both restored in finally."""
    modes = {m: m.training for m in model.modules()}
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        model.train(bn_mode == "train")
        for p in grads:
            p.requires_grad_(False)
        yield model
    finally:
        for m, was_training in modes.items():
            m.training = was_training
        for p, req in grads.items():
            p.requires_grad_(req)


@contextlib.contextmanager
def restored_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics) on exit: train-mode forwards leave no trace."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


# targets_at_once=None: on a GPU, as many targets side by side as keep the working batch within this many input
# elements (64 MiB per image-sized fp32 tensor); on a CPU one at a time (arithmetic-bound: no gain, measured)
TARGETS_AT_ONCE_ELEMENTS = 2**24


def targets_at_once(requested: int | None, n_targets: int, x: Tensor, n_images: int) -> int:
    """How many targets APGD-T / FAB-T run side by side on n_images of x's images (their broken set does not
    depend on it)."""
    if requested is not None:
        return requested
    if x.device.type != "cuda":
        return 1
    return max(1, min(n_targets, TARGETS_AT_ONCE_ELEMENTS // max(n_images * x[0].numel(), 1)))


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """An attack's generator, on the device of the images it perturbs."""
    return rng.device_generator(device, 0 if seed is None else int(seed))


class Attack(ABC):
    """Base class. Subclasses set `name`, implement `_run(counter, x, y, generator) -> AttackOut`.

    Call as `attack(x, y) -> x_adv`, or `attack.run(x, y) -> AttackOut` for success flags, norms and passes.
    Targeted attacks take `attack(x, y, target=t)`. Classifier attacks take images in [0, 1] and int labels;
    detection attacks (robustlab.detection.attacks) override `prepare`, `make_counter` and `success` for
    pixel-scale images and box targets, and share everything else: the model state, the generator, the pass counting, the threat models.
    """

    name: ClassVar[str] = ""
    task: ClassVar[str] = "classification"  # or "detection": what the attacked model is
    minimal: ClassVar[bool] = False  # minimal-perturbation attack: reports norms, eps optional
    supports_targeted: ClassVar[bool] = False
    # options every attack accepts that this one cannot use, with the reason (tests/unit/test_options.py)
    no_op_options: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module, *, seed: int | None = 0, bn_mode: str = "eval", precision: str = "fp32",
                 compile: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise InputTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.seed = seed
        self.bn_mode: BNMode = check_bn_mode(bn_mode)
        # how the model's forward runs (PassCounter): bf16 autocast with fp32 gradients/projections, torch.compile
        check_choice(precision, "precision", PRECISIONS)
        self.precision = precision
        self.eot = 1  # gradient passes averaged per step (PGD and APGD take eot=K for randomised models)
        self.compile = bool(compile)
        self.threat: LpBall | None = None
        # called with a short status ("apgd-t: 42 robust") by attacks made of stages (AutoAttack); evaluate shows it
        self.report_progress: Callable[[str], None] | None = None
        # attacks made of stages (AutoAttack): one entry per stage of the last call, {"attack", "robust_after",
        # "seconds", "forward", "backward"}; evaluate sums them over batches into an AutoAttack-style log
        self.last_log: list[dict[str, Any]] = []

    # threat model helpers --------------------------------------------------------------------
    @property
    def norm(self) -> str | None:
        return self.threat.norm if self.threat is not None else None

    @property
    def eps(self) -> float | Tensor | None:
        return self.threat.eps if self.threat is not None else None

    def describe(self) -> dict[str, Any]:
        eps = self.eps
        return {"attack": self.name, "norm": self.norm, "eps": eps if not isinstance(eps, Tensor) else "tensor",
                **self.execution()}

    def execution(self) -> dict[str, Any]:
        """How the model's forward runs (part of every `describe`)."""
        return {"precision": self.precision, "compile": self.compile}

    # entry points ----------------------------------------------------------------------------
    def __call__(self, x: Tensor, y: Tensor, target: Tensor | None = None) -> Tensor:
        return self.run(x, y, target=target, with_success=False).x_adv

    def run(self, x: Tensor, y: Tensor, target: Tensor | None = None, *, with_success: bool = True) -> AttackOut:
        """Run the attack. with_success=False skips the extra forward some attacks need for success flags."""
        y, target = self.prepare(x, y, target)
        x = x.detach()
        # an attack object never changes the model it attacks: train-mode BatchNorm (bn_mode="train") would move
        # the running statistics, so they are put back
        keep = restored_buffers(self.model) if self.bn_mode == "train" else contextlib.nullcontext()
        with keep, attack_mode(self.model, self.bn_mode):
            counter = self.make_counter(y)
            gen = make_generator(x.device, self.seed)
            out = self._run(counter, x, y, target, gen)
            if out.success is None and with_success:
                out.success = self.success(counter, out.x_adv, y, target)
        out.x_adv = out.x_adv.detach()
        out.forward, out.backward = counter.forward, counter.backward
        return out

    def prepare(self, x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Check a call's inputs before any work; returns (y, target) as the attack uses them."""
        check_images(x)
        check_labels(y, x.shape[0])
        check_fits_model(self.model, x)
        if target is not None:
            if not self.supports_targeted:
                raise InputError(f"attack {self.name!r} has no targeted mode")
            check_labels(target, x.shape[0], name="target")
            if (target == y).any():
                raise InputError("target equals the true label for some samples; a targeted attack needs target != y")
        return y.long(), (target.long() if target is not None else None)

    def make_counter(self, y: Tensor | None = None) -> PassCounter:
        """The pass counter of one call; a classifier's first forward also checks the logits against the labels."""
        return PassCounter(self.model, y_for_check=y, precision=self.precision, compile=self.compile, eot=self.eot)

    def success(self, counter: PassCounter, x_adv: Tensor, y: Tensor, target: Tensor | None) -> Tensor | None:
        """Per-sample success when `_run` left it open: fooled (untargeted) or the target reached (one forward)."""
        with torch.no_grad():
            pred = counter.logits(x_adv).argmax(1)
        return pred == target if target is not None else pred != y

    @abstractmethod
    def _run(self, counter: PassCounter, x: Tensor, y: Tensor, target: Tensor | None, gen: torch.Generator) -> AttackOut:
        """The algorithm: x, y validated, model in attack mode, passes counted by `counter`."""


def restrict_to_budget(counter: PassCounter, x: Tensor, x_adv: Tensor, y: Tensor, norms: Tensor,
                       eps: float | None, norm: str) -> AttackOut:
    """Final judging of a minimal attack's best points `x_adv` (norms: inf where nothing was found), as foolbox
    judges its minimisation attacks (MNG-AC's evaluation protocol): without eps, success where a point was found;
    with eps, points beyond the budget are scaled onto the ball (x + d * eps / ||d||, still in the box; l_inf: d
    clipped to [-eps, eps]) and count only if the model is still fooled there."""
    def view(t: Tensor) -> Tensor:
        return t.view(-1, *([1] * (x.dim() - 1)))

    found = torch.isfinite(norms)
    if eps is None:
        return AttackOut(torch.where(view(found), x_adv, x), found, norms=norms)
    d = x_adv - x
    if norm == "linf":  # foolbox clips an l_inf perturbation into the ball
        d = d.clamp(-eps, eps)
    else:
        d = d * view(torch.clamp(eps / per_sample_norm(d, norm).clamp_min(1e-12), max=1.0))
    within = norms <= eps  # kept as found: x + (x_adv - x) can round a point on the boundary to its other side
    x_in = torch.where(view(found & within), x_adv, torch.where(view(found), x + d, x))
    with torch.no_grad():
        fooled = counter.logits(x_in).argmax(1) != y
    success = found & fooled
    out_norms = torch.where(success, per_sample_norm(x_in - x, norm), torch.full_like(norms, float("inf")))
    return AttackOut(torch.where(view(success), x_in, x), success, norms=out_norms)
