"""MNG-AC (Madaan, Shin, Hwang, ICML 2021; mng_ac.md 4): SAT + adversarial consistency + the meta noise generator."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from robustlab import rng
from robustlab.errors import InputError
from robustlab.methods.base import StepMethod, load_optimizer_state, optimizer_state_tensors
from robustlab.methods.multi_norm import MultiNormAttacks
from robustlab.methods.sat import ConsistencyBase
from robustlab.registry import METHODS
from robustlab.threat.lp import NORMS
from robustlab.types import StepContext
from robustlab.validation import check_choice, check_positive, check_positive_int


class NoiseGenerator(nn.Module):
    """MNG-AC's noise generator (mng_ac.md 4.1): 1x1 conv to 20, 3x3 valid conv, 1x1, 1x1 back to C (LeakyReLU
    0.01 between), plus the central crop of its Gaussian input z (B, C, H+2, W+2), fresh on every call.

    image_input=False (default) is the official code's input-independent generator (4,183 parameters for C=3), the
    spec's default (mng_ac.md 4.1); image_input=True (the paper's input-dependent description) also feeds x,
    zero-padded by one pixel, next to z.
    """

    def __init__(self, channels: int, width: int = 20, image_input: bool = False) -> None:
        super().__init__()
        self.channels, self.image_input = channels, image_input
        cin = 2 * channels if image_input else channels
        act = nn.LeakyReLU(0.01)
        self.body = nn.Sequential(nn.Conv2d(cin, width, 1), act, nn.Conv2d(width, width, 3), act,
                                  nn.Conv2d(width, width, 1), act, nn.Conv2d(width, channels, 1))
        for m in self.body:
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, (2.0 / k) ** 0.5)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n, c, h, w = x.shape
        z = rng.randn((n, c, h + 2, w + 2), generator=generator, device=x.device, dtype=x.dtype)
        inp = torch.cat([F.pad(x, (1, 1, 1, 1)), z], 1) if self.image_input else z
        return self.body(inp) + z[:, :, 1:-1, 1:-1]


@METHODS.register("mng-ac")
class MNGAC(ConsistencyBase, StepMethod):
    """MNG-AC (Madaan, Shin, Hwang, ICML 2021; mng_ac.md 4): SAT + adversarial consistency + the meta noise
    generator. Each step: (1) x_adv by one SAT attack; (2) meta step: theta' = theta - lr * grad CE(f(x_aug(phi))),
    a one-step lookahead with the graph kept, then phi <- SGD step on CE(f_theta'(x_adv)) (second order, through
    torch.func.functional_call on the real model's parameters and cloned buffers: no model copy, and the
    classifier's weights, .grad and BatchNorm statistics are untouched); (3) classifier step on
    CE(f(x_adv)) + beta * JS(p_clean, p_adv, p_aug) with fresh generator noise.

    generator_input="noise" (default) is the official code's input-independent generator, the one behind the
    published numbers and the spec's default (mng_ac.md 4.1); "image" feeds x and z (the paper's description).
    generator_lr / lookahead_lr: None = the classifier's current lr (the code's choice), else that value times the
    lr schedule's factor.
    """

    name = "mng-ac"
    forwards_options_to = (MultiNormAttacks,)

    def __init__(self, norms=NORMS, beta: float = 12.0, sat_granularity: str = "batch",
                 generator_input: str = "noise", generator_width: int = 20, generator_lr: float | None = None,
                 lookahead_lr: float | None = None, generator_momentum: float = 0.9,
                 generator_weight_decay: float = 5e-4, **attack_kwargs: Any) -> None:
        super().__init__(norms, beta, sat_granularity, **attack_kwargs)
        check_choice(generator_input, "generator_input", ("image", "noise"))
        check_positive_int(generator_width, "generator_width")
        for k, v in (("generator_lr", generator_lr), ("lookahead_lr", lookahead_lr)):
            if v is not None:
                check_positive(v, k)
        check_positive(generator_momentum, "generator_momentum", allow_zero=True)
        check_positive(generator_weight_decay, "generator_weight_decay", allow_zero=True)
        self.generator_input, self.generator_width = generator_input, generator_width
        self.generator_lr, self.lookahead_lr = generator_lr, lookahead_lr
        self.generator_momentum, self.generator_weight_decay = float(generator_momentum), float(generator_weight_decay)
        self.generator: NoiseGenerator | None = None
        self.generator_optimizer: torch.optim.Optimizer | None = None
        self._pending: dict[str, Tensor] | None = None

    # -- owned state ---------------------------------------------------------------------------
    def _ensure(self, x: Tensor) -> NoiseGenerator:
        if self.generator is None:
            self.generator = NoiseGenerator(x.shape[1], self.generator_width,
                                            self.generator_input == "image").to(x.device)
            self.generator_optimizer = torch.optim.SGD(self.generator.parameters(), lr=0.0,
                                                       momentum=self.generator_momentum,
                                                       weight_decay=self.generator_weight_decay)
            if self._pending is not None:
                self._load(self._pending)
                self._pending = None
        return self.generator

    def state_tensors(self) -> dict[str, Tensor]:
        if self.generator is None or self.generator_optimizer is None:
            return dict(self._pending or {})
        out = {f"generator/{k}": v for k, v in self.generator.state_dict().items()}
        out.update(optimizer_state_tensors("generator_optim", self.generator_optimizer))
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        mine = {k: v for k, v in tensors.items() if k.startswith(("generator/", "generator_optim/"))}
        if not mine:
            return
        if self.generator is None:  # built on the first batch (it needs the channel count)
            self._pending = mine
        else:
            self._load(mine)

    def _load(self, tensors: dict[str, Tensor]) -> None:
        assert self.generator is not None and self.generator_optimizer is not None
        self.generator.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("generator/")})
        load_optimizer_state("generator_optim", self.generator_optimizer, tensors)

    # -- the step ------------------------------------------------------------------------------
    def meta_step(self, net: nn.Module, x: Tensor, y: Tensor, x_adv: Tensor, draw: Tensor, lr: float,
                  gen: torch.Generator, f: float = 1.0) -> tuple[Tensor, Tensor]:
        """Generator gradient of CE(f_theta'(x_adv), y), theta' = theta - lr * grad_theta CE(f_theta(x_aug(phi)), y).

        Returns (meta loss, the phi gradients as one flat tensor, for tests); the gradients are also left in .grad.
        Nothing of `net` is modified:
        the gradients are taken w.r.t. phi only and BatchNorm runs on cloned buffers."""
        assert self.generator is not None
        params = {k: p for k, p in net.named_parameters() if p.requires_grad}
        x_aug = self._fit(x, self.generator(x, gen), draw, f)
        inner = F.cross_entropy(functional_call(net, ({**params, **_cloned_buffers(net)},), (x_aug,)), y)
        grads = torch.autograd.grad(inner, list(params.values()), create_graph=True, allow_unused=True)
        lookahead = {k: (p - lr * g if g is not None else p) for (k, p), g in zip(params.items(), grads)}
        meta = F.cross_entropy(functional_call(net, ({**lookahead, **_cloned_buffers(net)},), (x_adv,)), y)
        phi = list(self.generator.parameters())
        g_phi = torch.autograd.grad(meta, phi, allow_unused=True)
        phi_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(phi, g_phi)]
        for p, g in zip(phi, phi_grads):
            p.grad = g
        return meta.detach(), torch.cat([g.flatten() for g in phi_grads])

    def train_step(self, model, batch, optimizer, ctx: StepContext, backward_and_step):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise InputError("mng-ac trains in one process (its generator and meta step are not wired for DDP); "
                             "run without torchrun")
        x, y = batch.x, batch.y
        gen_net = self._ensure(x)
        assert self.generator_optimizer is not None
        net = ctx.attacked(model)
        lr_now = optimizer.param_groups[0]["lr"]
        lookahead_lr = lr_now if self.lookahead_lr is None else self.lookahead_lr * ctx.lr_factor
        generator_lr = lr_now if self.generator_lr is None else self.generator_lr * ctx.lr_factor
        # the attack runs on the real weights with BatchNorm in train mode but its statistics restored, as on the
        # official code's per-step model copy
        x_adv, draw = self.sat_adversarial(model, x, y, ctx, keep_buffers=True)
        for g in self.generator_optimizer.param_groups:
            g["lr"] = generator_lr
        self.generator_optimizer.zero_grad(set_to_none=True)
        f = self.attacks.ramp(ctx)
        meta, _ = self.meta_step(net, x, y, x_adv, draw, lookahead_lr, ctx.generator, f)
        ctx.passes[1] += 2 * x.shape[0]  # the double backward of the meta loss (on top of the inner backward)
        self.generator_optimizer.step()
        with torch.no_grad():
            x_aug = self._fit(x, gen_net(x, ctx.generator), draw, f)  # the updated generator, fresh noise
        out = self.consistency_step(model, x, y, x_adv, x_aug)
        backward_and_step(out.loss)
        out.logs["meta"] = meta
        out.stepped = True
        return out


def _cloned_buffers(net: nn.Module) -> dict[str, Tensor]:
    return {k: b.clone() for k, b in net.named_buffers()}
