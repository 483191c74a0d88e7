"""Class activation maps for a whole batch in one forward and one backward (spec part.md 3.1-3.3).

`class_activation_maps(model, x, layer="layer4", method="gradcam")` hooks the module at `layer` (a
dotted module path), runs the model in eval mode (BatchNorm running statistics: samples independent,
so the gradient of sum_i z_{c_i}(x_i) gives every sample's own gradient), and returns (B, h, w) maps
in [0, 1] for the predicted class (or the given `classes`). Hooks are removed, and the model's
train/eval modes and its parameters' `requires_grad` and `.grad` restored, in `finally`.

- GradCAM:  w_k = mean_ij G_kij;                     L = ReLU(sum_k w_k A_k)
- XGradCAM: w_k = sum_ij G_kij A_kij / sum_ij A_kij  (channels with zero activation sum are skipped)
- LayerCAM: L = ReLU(sum_k ReLU(G_k) * A_k)
with A the hooked activation and G = dz_c/dA (pre-softmax logit). Each map is min-max normalised per
sample; a constant map becomes all zeros (no NaN).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from robustlab.errors import InputError

CAM_METHODS = ("gradcam", "xgradcam", "layercam")


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at a dotted path; an unknown path lists the valid names."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        valid = [n for n in modules if n]
        raise InputError(f"CAM layer {name!r} is not a module of {type(model).__name__}; valid layer names: "
                         + ", ".join(valid))
    return modules[name]


def _combine(a: Tensor, g: Tensor, method: str) -> Tensor:
    if method == "gradcam":
        w = g.mean(dim=(2, 3), keepdim=True)
        return torch.relu((w * a).sum(1))
    if method == "xgradcam":
        s = a.sum(dim=(2, 3), keepdim=True)
        w = torch.where(s != 0, (g * a).sum(dim=(2, 3), keepdim=True) / torch.where(s != 0, s, torch.ones_like(s)),
                        torch.zeros_like(s))
        return torch.relu((w * a).sum(1))
    return torch.relu((torch.relu(g) * a).sum(1))  # layercam


def normalize_maps(cam: Tensor) -> Tensor:
    """Per-sample min-max normalisation to [0, 1]; constant maps become 0."""
    flat = cam.flatten(1)
    lo, hi = flat.amin(1), flat.amax(1)
    span = hi - lo
    out = (flat - lo[:, None]) / torch.where(span > 0, span, torch.ones_like(span))[:, None]
    return torch.where((span > 0)[:, None], out, torch.zeros_like(out)).view_as(cam)


def class_activation_maps(model: nn.Module, x: Tensor, layer: str, method: str = "gradcam",
                          classes: Tensor | None = None) -> Tensor:
    """(B, h, w) CAMs in [0, 1] of `classes` (default: the predicted class) at module `layer`."""
    if method not in CAM_METHODS:
        raise InputError(f"unknown CAM method {method!r}; valid: {', '.join(CAM_METHODS)}")
    module = find_module(model, layer)
    store: dict[str, Tensor] = {}

    def hook(_m, _inp, out):
        if not isinstance(out, Tensor) or out.dim() != 4:
            raise InputError(f"CAM layer {layer!r} must output a (B, C, h, w) tensor, got "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        store["a"] = out

    modes = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    req = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)  # only d z / d A is needed: no parameter gradients are built
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))  # the graph runs from x (parameters are frozen)
            if "a" not in store:
                raise RuntimeError(f"CAM layer {layer!r} was not called in the forward pass")
            a = store["a"]
            if not a.requires_grad:
                raise RuntimeError(f"CAM layer {layer!r} output does not depend on anything differentiable")
            c = logits.argmax(1) if classes is None else classes.to(logits.device).long()
            (g,) = torch.autograd.grad(logits.gather(1, c[:, None]).sum(), a)
        return normalize_maps(_combine(a.detach(), g, method))
    finally:
        handle.remove()
        for m, was in modes.items():
            m.training = was
        for p, r, gr in zip(params, req, grads):
            p.requires_grad_(r)
            p.grad = gr
