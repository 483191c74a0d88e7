"""AutoAttack "standard" (Croce & Hein, ICML 2020, arXiv:2003.01690): APGD-CE -> APGD-T -> FAB-T -> Square;
version="rand" (randomised defenses): APGD-CE -> APGD-DLR, each step's gradient averaged over 20 passes (EoT);
version="fast": APGD-CE -> APGD-T with MALT's targets (5 targets chosen by the gradient-normalised logit gap,
Melamed et al., NeurIPS 2024), about an eighth of standard's time on a robust model (docs/benchmarks.md). Its escalation rule lives in
`evaluate`, which holds the integrity probe: when the probe flags anything (or the model is randomised), standard
(or rand) runs instead and the result says so (`ran`). Called on its own, version="fast" runs the two attacks.

Protocol (baselines.md 2.8): only clean-correct points are attacked, each attack only on points
still robust, a point drops out as soon as one attack fools it; x_adv equals x for robust points.
min(9, K-1) targets for APGD-T and FAB-T. `impl="reference"` runs the authors' package
(`pyautoattack`, if installed) on the same model, so robustlab's numbers can be cross-checked with
one flag; `impl="torchattacks"` runs torchattacks' weaker version (PART's table used it).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.attacks.apgd import APGD, APGDT, MALT_TARGETS
from robustlab.attacks.base import Attack, PassCounter
from robustlab.attacks.fab import FAB
from robustlab.attacks.square import Square
from robustlab.errors import InputError, MissingDependencyError
from robustlab.registry import ATTACKS
from robustlab.threat import make_threat
from robustlab.types import AttackOut
from robustlab.validation import check_choice, check_positive_int

RAND_EOT = 20  # EoT passes per APGD step in version="rand" (the reference's eot_iter)
VERSIONS = ("standard", "rand", "fast")


@ATTACKS.register("autoattack")
class AutoAttack(Attack):
    """AutoAttack, l_inf or l_2; version = standard | rand | fast; impl = robustlab | reference (pyautoattack) |
    torchattacks. n_targets: APGD-T's and FAB-T's targets (standard, rank targeting); malt_targets: version=fast's
    MALT targets."""

    name = "autoattack"

    def __init__(self, model: nn.Module, *, norm: str = "linf", eps: float = 8 / 255, version: str = "standard",
                 impl: str = "robustlab", n_targets: int = 9, malt_targets: int = MALT_TARGETS,
                 apgd_steps: int = 100, fab_steps: int = 100,
                 square_queries: int = 5000, targets_at_once: int | None = None, seed: int | None = 0,
                 bn_mode: str = "eval",
                 precision: str = "fp32", compile: bool = False) -> None:
        super().__init__(model, seed=seed, bn_mode=bn_mode, precision=precision, compile=compile)
        if targets_at_once is not None:
            check_positive_int(targets_at_once, "targets_at_once")
        if str(norm).lower() not in ("linf", "l2", "inf"):
            raise InputError(f"AutoAttack supports norms linf and l2, got {norm!r}")
        check_choice(version, "AutoAttack version", VERSIONS)
        check_choice(impl, "AutoAttack impl", ("robustlab", "reference", "torchattacks"))
        check_positive_int(n_targets, "n_targets")
        check_positive_int(malt_targets, "malt_targets")
        if version == "fast" and impl != "robustlab":
            raise InputError(f"AutoAttack version='fast' (MALT-targeted) is robustlab's; impl={impl!r} has "
                             "versions standard and rand")
        if version != "fast" and malt_targets != MALT_TARGETS:
            raise InputError(f"malt_targets={malt_targets} applies to version='fast' only (version is {version!r}; "
                             "n_targets sets standard's targets)")
        if impl != "robustlab" and (precision != "fp32" or compile or targets_at_once is not None):
            raise InputError(f"AutoAttack impl={impl!r} runs another package's code: precision={precision!r}, "
                             f"compile={compile!r} and targets_at_once={targets_at_once} apply only to "
                             f"impl='robustlab'")
        self.ball = make_threat(norm, eps)  # the threat model, never None (self.threat is Optional in the base)
        self.threat = self.ball
        self.impl, self.version = impl, version
        self.n_targets, self.apgd_steps, self.fab_steps, self.square_queries = n_targets, apgd_steps, fab_steps, square_queries
        self.malt_targets = malt_targets
        self.targets_at_once = targets_at_once  # APGD-T's and FAB-T's (the broken set does not depend on it)
        # version=rand judges images as its stages do: by the share of RAND_EOT passes that classify them correctly
        self.eot = RAND_EOT if version == "rand" else 1

    def describe(self) -> dict[str, Any]:
        extra = {"malt_targets": self.malt_targets} if self.version == "fast" else {}
        return {**super().describe(), "version": self.version, "impl": self.impl,
                "targets_at_once": self.targets_at_once, **extra}

    def escalated(self, randomised: bool) -> "AutoAttack":
        """What version=fast escalates to (`evaluate`, when the integrity probe flags anything): standard with the
        same budget, steps, seed and execution, or rand for a randomised model."""
        return AutoAttack(self.model, norm=self.ball.norm, eps=float(self.ball.eps),
                          version="rand" if randomised else "standard", n_targets=self.n_targets,
                          apgd_steps=self.apgd_steps, fab_steps=self.fab_steps, square_queries=self.square_queries,
                          targets_at_once=self.targets_at_once, seed=self.seed, bn_mode=self.bn_mode,
                          precision=self.precision, compile=self.compile)

    def components(self) -> list[Attack]:
        norm, eps = self.ball.norm, self.ball.eps
        common: dict[str, Any] = dict(seed=self.seed, bn_mode=self.bn_mode, precision=self.precision,
                                      compile=self.compile)
        if self.version == "rand":  # the reference's version for randomised defenses: 20 EoT passes per step
            return [APGD(self.model, norm=norm, eps=eps, steps=self.apgd_steps, eot=RAND_EOT, **common),
                    APGD(self.model, norm=norm, eps=eps, steps=self.apgd_steps, eot=RAND_EOT, loss="dlr", **common)]
        if self.version == "fast":
            return [APGD(self.model, norm=norm, eps=eps, steps=self.apgd_steps, **common),
                    APGDT(self.model, norm=norm, eps=eps, steps=self.apgd_steps, targeting="malt",
                          n_targets=self.malt_targets, targets_at_once=self.targets_at_once, **common)]
        return [
            APGD(self.model, norm=norm, eps=eps, steps=self.apgd_steps, **common),
            APGDT(self.model, norm=norm, eps=eps, steps=self.apgd_steps, n_targets=self.n_targets,
                  targets_at_once=self.targets_at_once, **common),
            FAB(self.model, norm=norm, eps=float(eps), steps=self.fab_steps, targeted=True, n_targets=self.n_targets,
                targets_at_once=self.targets_at_once, compact=True, **common),
            Square(self.model, norm=norm, eps=float(eps), n_queries=self.square_queries, **common),
        ]

    def _run(self, counter: PassCounter, x: Tensor, y: Tensor, target, gen) -> AttackOut:
        if self.impl != "robustlab":
            return self._run_external(counter, x, y)
        # per image the model's accuracy: 0 or 1, or (version=rand) the EoT estimate over RAND_EOT passes, as
        # every stage judges its iterates; an image goes to the next stage while it is above 0, and a stage's
        # point replaces the kept one where it is estimated lower
        acc = counter.accuracy(x, y)
        x_adv = x.clone()
        self.last_log = []
        for attack in self.components():
            idx = (acc > 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            sub = attack.make_counter()
            start = time.perf_counter()
            # Component attacks share the ensemble's generator stream through their own seeds.
            out = attack._run(sub, x[idx], y[idx], None, gen)
            stage_acc = out.accuracy
            if stage_acc is None:
                with torch.no_grad():
                    stage_acc = (counter.logits(out.x_adv).argmax(1) == y[idx]).to(x.dtype)
            counter.forward += sub.forward
            counter.backward += sub.backward
            x_adv[idx] = torch.where((stage_acc < acc[idx]).view(-1, 1, 1, 1), out.x_adv, x_adv[idx])
            acc[idx] = torch.minimum(acc[idx], stage_acc)
            stage = attack.name + ("-t" if attack.name == "fab" else "")
            stage = "apgd-dlr" if getattr(attack, "loss_name", "") == "dlr" and stage == "apgd-ce" else stage
            stage = "apgd-t-malt" if getattr(attack, "targeting", "") == "malt" else stage
            # robust_after: robust images, or (rand) the sum of their estimated accuracies; a host sync that also
            # ends the timing
            after = float(acc.sum()) if self.eot > 1 else int(acc.sum())
            self.last_log.append({"attack": stage, "robust_after": after,
                                  "seconds": time.perf_counter() - start,
                                  "forward": sub.forward, "backward": sub.backward})
            if self.report_progress is not None:
                self.report_progress(f"{stage}: {after:g} of {x.shape[0]} robust")
        return AttackOut(x_adv, acc < 0.5, accuracy=acc if self.eot > 1 else None)

    def _run_external(self, counter: PassCounter, x: Tensor, y: Tensor) -> AttackOut:
        norm = "Linf" if self.ball.norm == "linf" else "L2"
        eps = float(self.ball.eps)
        if self.impl == "reference":
            try:
                from pyautoattack import AutoAttack as RefAA
            except ImportError as e:  # optional dependency
                raise MissingDependencyError("impl='reference' needs the reference AutoAttack: pip install pyautoattack") from e
            ref = RefAA(self.model, norm=norm, eps=eps, version=self.version, device=str(x.device),
                        seed=0 if self.seed is None else self.seed)
            ref.verbose = False
            with torch.no_grad():
                k = counter.logits(x[:1]).shape[1]
            ref.apgd_targeted.n_target_classes = min(9, k - 1)
            ref.fab.n_target_classes = min(9, k - 1)
            out = ref.run_standard_evaluation(x, y, batch_size=max(x.shape[0], 1))
            x_adv = out[0] if isinstance(out, tuple) else out  # pyautoattack returns (x_adv, y_adv)
        else:
            try:
                import torchattacks
            except ImportError as e:
                raise MissingDependencyError("impl='torchattacks' needs torchattacks: pip install --no-deps torchattacks") from e
            with torch.no_grad():
                k = counter.logits(x[:1]).shape[1]
            ref = torchattacks.AutoAttack(self.model, norm=norm, eps=eps, version=self.version, n_classes=k,
                                          seed=0 if self.seed is None else self.seed)
            x_adv = ref(x, y)
        with torch.no_grad():
            success = counter.logits(x_adv).argmax(1) != y
        return AttackOut(x_adv.detach(), success)


def is_protocol_autoattack(spec: str) -> bool:
    """An AutoAttack spec string of the published protocol (version standard or rand), not version=fast: what
    RobustBench entries and the leaderboard's AutoAttack column report."""
    if spec.split(":")[0].strip() != "autoattack":
        return False
    from robustlab.attacks.spec import parse_attack_spec

    return parse_attack_spec(spec)[1].get("version", "standard") != "fast"
