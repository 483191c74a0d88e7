"""Attacks on classifiers. Each is an object `Attack(model, **settings)`, called as `attack(x, y) -> x_adv`.

`attack.run(x, y)` returns an `AttackOut` with success flags, perturbation norms (minimal-perturbation
attacks) and the forward/backward image-passes spent. `create_attack("pgd", model, eps=0.3)` builds one
by its registry name; `parse_attack_spec("pgd:norm=linf,eps=0.3")` parses the CLI syntax.
"""
from robustlab.attacks.apgd import APGD, APGDDLR, APGDT
from robustlab.attacks.autoattack import AutoAttack
from robustlab.attacks.base import Attack, PassCounter, attack_mode
from robustlab.attacks.bb import BrendelBethge
from robustlab.attacks.critic import CriticAttack
from robustlab.attacks.cw import CW
from robustlab.attacks.deepfool import DeepFool
from robustlab.attacks.fab import FAB
from robustlab.attacks.l1 import EAD, SaltAndPepper
from robustlab.attacks.mma import MMA
from robustlab.attacks.noise import GaussianNoise
from robustlab.attacks.pgd import FGSM, PGD
from robustlab.attacks.pixel_ag import PixelAG
from robustlab.attacks.spec import create_attack, parse_attack_spec
from robustlab.attacks.square import Square
from robustlab.types import AttackOut

__all__ = ["Attack", "AttackOut", "GaussianNoise", "PassCounter", "attack_mode", "FGSM", "PGD", "APGD", "APGDDLR", "APGDT", "FAB",
           "Square", "BrendelBethge", "CW", "CriticAttack", "DeepFool", "MMA", "AutoAttack", "EAD",
           "SaltAndPepper", "PixelAG", "create_attack", "parse_attack_spec"]
