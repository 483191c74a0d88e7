"""Attack objectives on a detector's loss decomposition (spec cwat.md 3.2): A_cls, A_reg, the full multibox
loss, TOAT with task-wise clipping, OWA with object-wise clipping and CWA with class-wise normalisation.

Each returns the per-image objective J_b (B,); attacks ascend sum_b J_b. Clipping `min(l, beta)` is
`clamp(l, max=beta)`: its gradient is the loss's own where l <= beta and zero above (beta = inf: no clipping).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from robustlab.detection.loss import Decomp
from robustlab.errors import InputError
from robustlab.validation import reject_inapplicable

OBJECTIVES = ("cls", "reg", "full", "toat", "owa", "cwa")
GRANULARITIES = ("anchor", "gt")
NEGATIVES = ("none", "ohem")
SCOPES = ("image", "batch")


# the options each objective reads (the others, set away from their defaults, are refused: they would be ignored)
USED_OPTIONS = {"cls": (), "reg": (), "full": (), "toat": ("beta_cls", "beta_reg"),
                "owa": ("beta_o", "granularity", "attack_negatives"),
                "cwa": ("beta_o", "granularity", "attack_negatives", "cwa_scope")}


def _clip(t: Tensor, beta: float) -> Tensor:
    return t if math.isinf(beta) else t.clamp(max=beta)


@dataclass(frozen=True)
class Objective:
    """An attack objective and its options (every decision of spec cwat.md 2 is a field)."""

    name: str = "cls"
    beta_cls: float = math.inf  # TOAT's task-wise clipping (TOAT-6: 6 and 6)
    beta_reg: float = math.inf
    beta_o: float = 6.0  # OWA / CWA object-wise clipping
    granularity: str = "anchor"  # OWA/CWA unit: a matched anchor, or a ground-truth object (mean of its anchors)
    attack_negatives: str = "none"  # OWA/CWA: add OHEM negatives (CWA: as one extra "background" group)
    cwa_scope: str = "image"  # CWA class weights per image, or across the batch (RobustDet's behaviour)

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise InputError(f"unknown detection attack objective {self.name!r}; valid: {', '.join(OBJECTIVES)}")
        for k in ("beta_cls", "beta_reg", "beta_o"):
            v = float(getattr(self, k))
            if not v > 0:
                raise InputError(f"{k} must be > 0 (inf for no clipping), got {v}")
        for k, valid in (("granularity", GRANULARITIES), ("attack_negatives", NEGATIVES), ("cwa_scope", SCOPES)):
            if getattr(self, k) not in valid:
                raise InputError(f"{k} must be one of {', '.join(valid)}, got {getattr(self, k)!r}")
        used = USED_OPTIONS[self.name]
        defaults = {f.name: f.default for f in fields(Objective) if f.name != "name"}
        reject_inapplicable({k: (getattr(self, k), d) for k, d in defaults.items() if k not in used},
                            f"the {self.name!r} objective uses " + (", ".join(used) if used else "none of them"))

    def __call__(self, d: Decomp, num_classes: int, num_objects: int | None = None) -> Tensor:
        """Per-image objective (B,). num_objects (M of the padded targets) is needed for granularity='gt'."""
        if self.name in ("cls", "reg", "full", "toat"):
            lcls, lreg = d.task_losses()
            if self.name == "cls":
                return lcls
            if self.name == "reg":
                return lreg
            if self.name == "full":
                return lcls + lreg
            return _clip(lcls, self.beta_cls) + _clip(lreg, self.beta_reg)
        terms, weights, neg_terms, neg_weights = self._units(d, num_classes, num_objects)
        if self.name == "owa":
            j = (terms * (weights > 0)).sum(1)
            if neg_terms is not None:
                j = j + (neg_terms * d.neg).sum(1)
            return j
        return (terms * weights).sum(1) + ((neg_terms * neg_weights).sum(1) if neg_terms is not None else 0)

    @property
    def clips(self) -> bool:
        """Whether the objective clips loss terms (TOAT with a finite beta, OWA, CWA)."""
        return self.name in ("owa", "cwa") or (self.name == "toat" and not (math.isinf(self.beta_cls)
                                                                             and math.isinf(self.beta_reg)))

    def clipped_fraction(self, d: Decomp, num_classes: int, num_objects: int | None = None) -> float:
        """The share of the objective's terms that its clipping cuts at this decomposition (spec cwat.md 5.2): TOAT's
        per-image task losses above beta_cls / beta_reg; OWA's and CWA's units (matched anchors, or objects with
        granularity='gt') whose classification or localisation loss is above beta_o. 0 where there is no term."""
        if self.name == "toat":
            lcls, lreg = d.task_losses()
            cut = torch.cat([lcls > self.beta_cls, lreg > self.beta_reg])
            return float(cut.float().mean()) if cut.numel() else 0.0
        if self.granularity == "anchor":
            lc, lr, present = d.lc, d.lr, d.pos
        else:
            if num_objects is None:
                raise InputError("granularity='gt' needs the number of objects (padded targets' M)")
            lc, lr, count = d.object_losses(num_objects)
            present = count > 0
        cut = ((lc > self.beta_o) | (lr > self.beta_o)) & present
        return float(cut.sum() / present.sum()) if bool(present.any()) else 0.0

    def unit_weights(self, d: Decomp, num_classes: int, num_objects: int | None = None) -> tuple[Tensor, Tensor | None]:
        """CWA's weights per unit (B, U) (anchors, or objects for granularity='gt') and per mined negative."""
        _, w, _, nw = self._units(d, num_classes, num_objects)
        return w, nw

    def _units(self, d: Decomp, num_classes: int, num_objects: int | None):
        """Clipped per-unit losses (B, U), CWA weights per unit (B, U) (for OWA only their support matters), and
        the clipped OHEM negative terms with their CWA weights when attack_negatives='ohem'."""
        beta = self.beta_o
        if self.granularity == "anchor":
            terms = _clip(d.lc, beta) + _clip(d.lr, beta)
            unit_cls = torch.where(d.pos, d.cls_t, torch.zeros_like(d.cls_t))
            present = d.pos
        else:
            if num_objects is None:
                raise InputError("granularity='gt' needs the number of objects (padded targets' M)")
            oc, orr, count = d.object_losses(num_objects)
            terms = _clip(oc, beta) + _clip(orr, beta)
            present = count > 0
            # the class of an object: the class of any of its anchors (they all share it)
            cls_sum = torch.zeros_like(count).scatter_add(1, d.obj_t.clamp_min(0), (d.cls_t * d.pos).to(count.dtype))
            unit_cls = torch.where(present, (cls_sum / count.clamp_min(1)).round().long(), torch.zeros_like(present, dtype=torch.long))
        neg_terms = _clip(d.lc, beta) if self.attack_negatives == "ohem" else None
        weights, neg_weights = self._class_weights(unit_cls, present, d.neg if neg_terms is not None else None,
                                                   num_classes)
        return terms, weights, neg_terms, neg_weights

    def _class_weights(self, unit_cls: Tensor, present: Tensor, neg: Tensor | None, num_classes: int):
        """w = 1 / (C * n_c) per unit of class c: each present class gets total weight 1/C however many units it
        has. With negatives, background is one more group (n = number of mined negatives)."""
        pf = present.to(torch.float32)
        if self.cwa_scope == "image":
            n_c = torch.zeros(present.shape[0], num_classes + 1, device=present.device).scatter_add(1, unit_cls, pf)
            n_c[:, 0] = 0
            n_groups = (n_c > 0).sum(1, keepdim=True).float()
            n_neg = neg.sum(1, keepdim=True).float() if neg is not None else None
            if n_neg is not None:
                n_groups = n_groups + (n_neg > 0).float()
            w = pf / (n_groups * n_c.gather(1, unit_cls)).clamp_min(1e-12)
            nw = (neg.float() / (n_groups * n_neg).clamp_min(1e-12)) if neg is not None and n_neg is not None else None
            return w, nw
        # batch scope: one class census over the whole batch
        n_c = torch.zeros(num_classes + 1, device=present.device).scatter_add(0, unit_cls.flatten(), pf.flatten())
        n_c[0] = 0
        n_groups = (n_c > 0).sum().float()
        n_neg = neg.sum().float() if neg is not None else None
        if n_neg is not None:
            n_groups = n_groups + (n_neg > 0).float()
        w = pf / (n_groups * n_c[unit_cls]).clamp_min(1e-12)
        nw = (neg.float() / (n_groups * n_neg).clamp_min(1e-12)) if neg is not None and n_neg is not None else None
        return w, nw
