"""White-box L_inf attacks on SSD detectors (spec cwat.md 3), on pixel-scale images: budgets in 0-255 units.

`det-fgsm` / `det-pgd` ascend any objective of `objectives.py` (A_cls, A_reg, full, TOAT, OWA, CWA); `owa` and
`cwa` are PGD on those objectives; `mda` is MTD's multi-task domain attack (per-image choice between the A_cls
and A_reg examples); `dag` is DAG adapted to a one-stage detector (priors as proposals).

Attacks run the model in eval mode with frozen parameters (restored afterwards, also on errors), match the
ground truth to the priors once, and take input gradients with `torch.autograd.grad`: no parameter gradient
is touched. Calling an attack returns x_adv; `run` also returns pass counts and statistics.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from robustlab import rng
from robustlab.attacks.base import Attack, PassCounter
from robustlab.attacks.pgd import pgd
from robustlab.detection.boxes import box_iou, center_to_corner
from robustlab.detection.evaluate import check_detection_images
from robustlab.detection.loss import decompose
from robustlab.detection.objectives import Objective
from robustlab.detection.targets import check_targets, match_targets
from robustlab.errors import InputError
from robustlab.registry import ATTACKS
from robustlab.threat import LinfBall
from robustlab.types import AttackOut
from robustlab.validation import check_positive, check_positive_int

if TYPE_CHECKING:
    from robustlab.detection.models import Detector

PIXEL_MAX = 255.0


class DetectionAttack(Attack):
    """Base of the detection attacks: an `Attack` on a robustlab detector, with pixel-scale images, padded box
    targets in place of labels (`attack(x, targets) -> x_adv`) and an l_inf ball in [0, 255] as its threat model
    (None for an unbounded attack: DAG without eps stays only in the box). `run` returns an AttackOut without
    success flags (a detector is not "fooled" as a whole) but with `stats`: per batch, counts under keys starting
    with "n_" (the evaluator sums them) and means over the batch's images otherwise (it averages them, weighted)."""

    task = "detection"
    name = ""
    box = (0.0, PIXEL_MAX)

    def __init__(self, model: nn.Module, eps: float = 8.0, seed: int = 0) -> None:
        if getattr(model, "task", None) != "detection":
            raise InputError(f"{self.name} attacks detectors (robustlab SSD models); got {type(model).__name__}")
        if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
            raise InputError(f"eps must be a finite number >= 0 in pixel units (0-255 scale), got {eps!r}")
        super().__init__(model, seed=seed)
        self.detector = cast("Detector", model)  # checked above: a robustlab detector
        self.threat = LinfBall(float(eps), box=(0.0, PIXEL_MAX))

    def prepare(self, x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor | None]:
        check_detection_images(x)
        check_targets(y, self.detector.num_classes)
        if y.shape[0] != x.shape[0]:
            raise InputError(f"{x.shape[0]} images but {y.shape[0]} target rows")
        if target is not None:
            raise InputError(f"attack {self.name!r} has no targeted mode (detection attacks take box targets as y)")
        return y.to(x.device), None

    def make_counter(self, y: Tensor | None = None) -> PassCounter:
        return PassCounter(self.model)

    def success(self, counter: PassCounter, x_adv: Tensor, y: Tensor, target: Tensor | None) -> Tensor | None:
        return None


def _detection_factory(f):
    """Tags an attack factory as attacking detectors (classifier evaluators and tests tell them apart)."""
    f.task = "detection"
    return f


def ascend(counter: PassCounter, x: Tensor, targets: Tensor, objective: Objective, threat: LinfBall, alpha: float,
           steps: int, random_start: bool = False, generator: torch.Generator | None = None,
           matched: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Signed-gradient ascent of sum_b J_b within the threat's l_inf ball and [0, 255] box (spec cwat.md 3.1), on
    the shared PGD loop. The caller puts the model (`counter.model`, a robustlab detector) in eval mode."""
    model = cast("Detector", counter.model)
    matched = matched if matched is not None else match_targets(targets, model.priors)
    k, m = model.num_classes, targets.shape[1]

    def objective_of(out: tuple[Tensor, Tensor], t: Tensor, _target: Tensor | None) -> Tensor:
        return objective(decompose(out[0], out[1], t, model.priors, matched), k, m)

    # sign(0) = 0 in the l_inf step: zero-gradient pixels stay
    return pgd(counter, x, targets, threat=threat, loss_fn=objective_of, steps=steps, step_size=alpha,
               random_start=random_start, generator=generator).x_adv.detach()


class DetPGD(DetectionAttack):
    """PGD-K (FGSM when steps=1 and alpha=eps) on a detection objective; eps, alpha in pixel units."""

    name = "det-pgd"

    def __init__(self, model: nn.Module, objective: str = "cls", eps: float = 8.0, alpha: float | None = None,
                 steps: int = 10, random_start: bool = False, beta_cls: float = math.inf, beta_reg: float = math.inf,
                 beta_o: float = 6.0, granularity: str = "anchor", attack_negatives: str = "none",
                 cwa_scope: str = "image", seed: int = 0) -> None:
        super().__init__(model, eps, seed)
        check_positive_int(steps, "steps")
        self.alpha = float(eps) / 4 if alpha is None else float(alpha)  # spec DECISION: eps/4 (= 2 at eps 8)
        check_positive(self.alpha, "alpha", allow_zero=True)
        self.steps = steps
        self.random_start = random_start
        self.objective = Objective(objective, float(beta_cls), float(beta_reg), float(beta_o), granularity,
                                   attack_negatives, cwa_scope)

    def _run(self, counter, x, y, target, gen):
        matched = match_targets(y, self.detector.priors)
        x_adv = ascend(counter, x, y, self.objective, cast(LinfBall, self.threat), self.alpha, self.steps,
                       self.random_start, gen, matched)
        stats: dict[str, float] = {}
        if self.objective.clips:  # spec cwat.md 5.2: the share of object terms the clipping cut, at x_adv
            with torch.no_grad():
                loc, conf = self.model(x_adv)
            counter.forward += x.shape[0]
            d = decompose(loc, conf, y, self.detector.priors, matched)
            stats["clipped_fraction"] = float(self.objective.clipped_fraction(d, self.detector.num_classes,
                                                                              y.shape[1]))
        return AttackOut(x_adv, None, stats=stats)


class DetFGSM(DetPGD):
    name = "det-fgsm"


class OWA(DetPGD):
    name = "owa"


class CWA(DetPGD):
    name = "cwa"


@ATTACKS.register("det-pgd")
@_detection_factory
def det_pgd(model: nn.Module, **kwargs: Any) -> DetPGD:
    """Detector PGD-K (Madry et al. 2018) on an objective: cls = A_cls, reg = A_reg, full, toat, owa, cwa."""
    return DetPGD(model, **kwargs)


@ATTACKS.register("det-fgsm")
@_detection_factory
def det_fgsm(model: nn.Module, objective: str = "cls", eps: float = 8.0, **kwargs: Any) -> DetPGD:
    """Detector FGSM (Goodfellow et al. 2015): one signed step of size eps on an objective (cls = A_cls, ...)."""
    return DetFGSM(model, objective=objective, eps=eps, alpha=eps, steps=1, **kwargs)


@ATTACKS.register("owa")
@_detection_factory
def owa(model: nn.Module, beta_o: float = 6.0, steps: int = 10, **kwargs: Any) -> DetPGD:
    """Object-wise attack (Chen et al., CVPR 2021, eq. 10-11): PGD on per-object losses clipped at beta_o."""
    return OWA(model, objective="owa", beta_o=beta_o, steps=steps, **kwargs)


@ATTACKS.register("cwa")
@_detection_factory
def cwa(model: nn.Module, beta_o: float = 6.0, steps: int = 10, **kwargs: Any) -> DetPGD:
    """Class-wise attack (Chen et al., CVPR 2021, eq. 12): clipped object losses averaged per class, then over classes."""
    return CWA(model, objective="cwa", beta_o=beta_o, steps=steps, **kwargs)


class MDA(DetectionAttack):
    """MTD's multi-task domain attack: PGD-K on A_cls and on A_reg, then per image the example with the larger
    total (unclipped) multibox loss, ties to the A_reg example (spec cwat.md 3.3)."""

    name = "mda"

    def __init__(self, model: nn.Module, eps: float = 8.0, alpha: float | None = None, steps: int = 10,
                 random_start: bool = False, seed: int = 0) -> None:
        super().__init__(model, eps, seed)
        check_positive_int(steps, "steps")
        self.alpha = float(eps) / 4 if alpha is None else float(alpha)
        self.steps = steps
        self.random_start = random_start

    def _run(self, counter, x, y, target, gen):
        matched = match_targets(y, self.detector.priors)
        args = (cast(LinfBall, self.threat), self.alpha, self.steps, self.random_start, gen, matched)
        x_cls = ascend(counter, x, y, Objective("cls"), *args)
        x_reg = ascend(counter, x, y, Objective("reg"), *args)
        pick_cls, _ = select_by_total_loss(self.detector, x_cls, x_reg, y, matched)
        counter.forward += 2 * x.shape[0]
        x_adv = torch.where(pick_cls[:, None, None, None], x_cls, x_reg)
        n_cls = int(pick_cls.sum())
        return AttackOut(x_adv, None, stats={"n_chose_cls": n_cls, "n_chose_reg": x.shape[0] - n_cls})


@torch.no_grad()
def select_by_total_loss(model: Detector, xa: Tensor, xb: Tensor, targets: Tensor,
                         matched: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Per image: True where xa has the strictly larger total loss L_cls,b + L_reg,b (two no-grad forwards)."""
    totals = []
    for xi in (xa, xb):
        loc, conf = model(xi)
        lcls, lreg = decompose(loc, conf, targets, model.priors, matched).task_losses()
        totals.append(lcls + lreg)
    return totals[0] > totals[1], torch.stack(totals)


@ATTACKS.register("mda")
@_detection_factory
def mda(model: nn.Module, **kwargs: Any) -> MDA:
    """MTD's multi-task domain attack (Zhang & Wang, ICCV 2019): per image the stronger of PGD-K A_cls / A_reg."""
    return MDA(model, **kwargs)


class DAG(DetectionAttack):
    """Dense Adversary Generation adapted to SSD (spec cwat.md 3.4): priors with IoU > 0.1 to an object and
    probability > 0.1 for its class are the targets; each present class maps to a different, absent class
    (injective when enough absent classes exist); each iteration raises the adversarial logit and lowers the
    true one on still-active targets, r += gamma * g / max|g| per image, until no target keeps its true class.
    Unbounded by default (as the original); eps > 0 projects r onto [-eps, eps] (the `dag-eps` variant)."""

    name = "dag"

    def __init__(self, model: nn.Module, eps: float = 0.0, gamma: float = 0.5, max_iter: int = 150,
                 iou_threshold: float = 0.1, prob_threshold: float = 0.1, seed: int = 0) -> None:
        super().__init__(model, eps, seed)
        self.bound = float(eps)  # 0: unbounded, only the [0, 255] box (the original DAG)
        if self.bound == 0:
            self.threat = None
        check_positive(gamma, "gamma")
        check_positive_int(max_iter, "max_iter")
        self.gamma, self.max_iter = float(gamma), max_iter
        self.iou_threshold, self.prob_threshold = iou_threshold, prob_threshold

    def adversarial_map(self, present: Tensor, gen: torch.Generator) -> Tensor:
        """(B, K + 1) map of anchor labels: present class c -> a different class, injective onto absent classes
        when there are at least as many absent as present ones; background maps to itself (never targeted)."""
        b, k1 = present.shape
        out = torch.arange(k1).repeat(b, 1)
        for i in range(b):  # per image, a handful of classes: host-side bookkeeping, not a hot loop
            pres = present[i].nonzero().flatten().tolist()
            absent = [c for c in range(1, k1) if c not in pres]
            perm = rng.randperm(len(absent), generator=gen).tolist()
            for j, c in enumerate(pres):
                if len(absent) >= len(pres):
                    out[i, c] = absent[perm[j]]
                else:
                    others = [o for o in range(1, k1) if o != c]
                    out[i, c] = others[int(rng.randint(len(others), (), generator=gen))]
        return out

    def _run(self, counter, x, y, target, _gen):
        model, targets, eps = self.detector, y, self.bound
        gen = torch.Generator().manual_seed(self.seed)  # the class map is drawn on the host
        b, p = x.shape[0], model.priors.shape[0]
        valid = (targets[..., 4] >= 0) & (targets[..., 5] <= 0)
        iou = box_iou(targets[..., :4], center_to_corner(model.priors)[None].expand(b, p, 4))  # (B, M, P)
        iou = torch.where(valid[..., None], iou, torch.full_like(iou, -1.0))
        best_iou, best_gt = iou.max(1)
        true = targets[..., 4].long().clamp_min(0).gather(1, best_gt) + 1  # (B, P) anchor label 1..K
        with torch.no_grad():
            conf0 = model(x)[1]
            prob = torch.softmax(conf0.float(), -1)
        is_target = (best_iou > self.iou_threshold) & (prob.gather(2, true[..., None])[..., 0] > self.prob_threshold)
        n_targets = is_target.sum().clamp_min(1)
        true_before = (is_target & (conf0.argmax(-1) == true)).sum() / n_targets
        present = torch.zeros(b, model.num_classes + 1, dtype=torch.bool)
        present.scatter_(1, (targets[..., 4].long().clamp_min(-1) + 1).cpu(), True)
        present[:, 0] = False
        amap = self.adversarial_map(present, gen).to(x.device)
        adv = amap.gather(1, true)
        r = torch.zeros_like(x)
        done = torch.zeros(b, dtype=torch.bool, device=x.device)
        iters = torch.zeros(b, dtype=torch.long, device=x.device)
        fwd = bwd = 0
        for _ in range(self.max_iter):
            xr = (x + r).clamp(0, PIXEL_MAX).requires_grad_(True)
            with torch.enable_grad():
                conf = model(xr)[1]
                fwd += b
                pred = conf.argmax(-1)
                still = is_target & (pred == true)
                done = ~still.any(1)  # stop per image as soon as no target keeps its true class
                if bool(done.all()):
                    break
                active = is_target & (pred != adv) & (pred != 0) & ~done[:, None]
                z_adv = conf.gather(2, adv[..., None])[..., 0]
                z_true = conf.gather(2, true[..., None])[..., 0]
                (g,) = torch.autograd.grad(((z_adv - z_true) * active).sum(), xr)
                bwd += b
            scale = g.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
            step = torch.where(done.view(-1, 1, 1, 1), torch.zeros_like(g), self.gamma * g / scale)
            r = r + step
            if eps > 0:
                r = r.clamp(-eps, eps)
            iters += (~done).long()
        x_adv = (x + r).clamp(0, PIXEL_MAX).detach()
        with torch.no_grad():
            true_after = (is_target & (model(x_adv)[1].argmax(-1) == true)).sum() / n_targets
        counter.forward += fwd + b
        counter.backward += bwd
        return AttackOut(x_adv, None, stats={"targets_per_image": float(is_target.sum(1).float().mean()),
                                             "targets_true_before": float(true_before),
                                             "targets_true_after": float(true_after),
                                             "fooled_fraction": float(done.float().mean()),
                                             "n_fooled": int(done.sum()),
                                             "mean_iterations": float(iters.float().mean())})


@ATTACKS.register("dag")
@_detection_factory
def dag(model: nn.Module, **kwargs: Any) -> DAG:
    """DAG (Xie et al., ICCV 2017) on a one-stage detector: priors as proposals, 150 iterations; eps > 0 bounds it."""
    return DAG(model, **kwargs)


# The seed's evaluation panels (spec cwat.md 5.2; eps 8, PGD-10 with alpha 2, no random start):
# Tables 1, 2, 4, 5 (columns) and Table 3 (per-class AP under MDA, OWA, CWA).
PANELS = {
    "table1": {"fgsm-cls": "det-fgsm:objective=cls", "fgsm-reg": "det-fgsm:objective=reg",
               "pgd-cls": "det-pgd:objective=cls", "pgd-reg": "det-pgd:objective=reg", "cwa": "cwa", "dag": "dag"},
    "table3": {"mda": "mda", "owa": "owa", "cwa": "cwa"},
}


for _factory, _fixed in ((det_pgd, ()), (det_fgsm, ("alpha", "steps")), (owa, ("objective",)), (cwa, ("objective",))):
    _factory.forwards_options_to = (DetPGD,)  # type: ignore[attr-defined]
    _factory.fixed_options = _fixed  # type: ignore[attr-defined]
mda.forwards_options_to = (MDA,)  # type: ignore[attr-defined]
dag.forwards_options_to = (DAG,)  # type: ignore[attr-defined]


def detection_attacks(specs: list[str], model: nn.Module) -> dict[str, Attack]:
    """{label: detection attack bound to `model`} from attack specs or panel names ('table1', 'table3'); every spec
    is checked (built) here, before any work."""
    from robustlab.attacks.spec import create_attack

    out: dict[str, Attack] = {}
    for spec in specs:
        items = PANELS[spec].items() if spec in PANELS else [(spec, spec)]
        for label, s in items:
            atk = create_attack(s, model)
            if getattr(atk, "task", None) != "detection":
                raise InputError(f"attack {s!r} is a classifier attack; detectors take det-fgsm, det-pgd, owa, cwa, "
                                 "mda, dag (or the panels table1, table3)")
            out[label] = atk
    return out
