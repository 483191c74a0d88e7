"""Models and data from outside robustlab, for `robustlab eval`: the user's own network and their own arrays.

Models: a robustlab checkpoint; `FILE.py:NAME` or `package.module:NAME` (a class or a function returning an
`nn.Module`, called with `model_kwargs`) with optional `weights`; a TorchScript file (`torch.jit.save`) or a
`torch.export` program (`torch.export.save`), told apart by the file's contents, not its suffix. Importing the
user's Python file is the user's explicit choice; weights are never unpickled as code (safetensors, or
`torch.load(weights_only=True)`). `normalize` / `input_range` wrap the model so that inputs stay in [0, 1].

Data: `.npz`, `.safetensors` or `.pt` files holding `x` (N, C, H, W) float in [0, 1], or uint8 in [0, 255] as
(N, H, W, C) or (N, C, H, W), and `y` integer labels.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustlab.engine.checkpoint import file_kind
from robustlab.errors import CheckpointError, InputError, InputTypeError

# where a state dict hides inside a training checkpoint, and the prefixes DataParallel / torch.compile add
STATE_KEYS = ("state_dict", "model", "model_state_dict", "net")
PREFIXES = ("module.", "_orig_mod.")
ARRAY_SUFFIXES = (".npz", ".safetensors", ".pt", ".pth")


# -- models ------------------------------------------------------------------------------------------------------
class Normalized(nn.Module):
    """model((x * input_range - mean) / std): a model that wants normalised (or [0, 255]) inputs, fed [0, 1] images."""

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, mean: list[float] | None, std: list[float] | None, input_range: float = 1.0):
        super().__init__()
        self.model = model
        self.input_range = float(input_range)
        self.register_buffer("mean", torch.tensor(mean or [0.0]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std or [1.0]).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x * self.input_range - self.mean) / self.std)


def parse_normalize(text: str) -> tuple[list[float], list[float]]:
    """'0.4914,0.4822,0.4465/0.2471,0.2435,0.2616' -> (mean, std)."""
    try:
        mean_s, std_s = text.split("/")
        mean = [float(v) for v in mean_s.split(",")]
        std = [float(v) for v in std_s.split(",")]
    except ValueError:
        raise InputError(f"--normalize {text!r}: expected MEAN/STD with comma-separated numbers, e.g. "
                         "0.4914,0.4822,0.4465/0.2471,0.2435,0.2616") from None
    if len(mean) != len(std):
        raise InputError(f"--normalize {text!r}: {len(mean)} means but {len(std)} standard deviations")
    if any(s <= 0 for s in std):
        raise InputError(f"--normalize {text!r}: standard deviations must be > 0")
    return mean, std


def _import_target(spec: str) -> Any:
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise InputError(f"--model {spec!r}: expected a robustlab checkpoint, a TorchScript or torch.export file, "
                         "FILE.py:NAME or package.module:NAME")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise InputError(f"--model {spec!r}: {path} does not exist")
        module_name = f"robustlab_user_model_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise InputError(f"--model {spec!r}: {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        loader_spec.loader.exec_module(module)  # the user's own file, at the user's explicit request
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise InputError(f"--model {spec!r}: no module {where!r} ({e})") from None
    if not hasattr(module, name):
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:10]
        raise InputError(f"--model {spec!r}: {where} has no {name!r} (it has: {', '.join(public)})")
    return getattr(module, name)


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from safetensors or a torch.save file, loaded with weights_only=True (never code); nested
    state dicts (STATE_KEYS) are unwrapped and DataParallel / torch.compile prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--weights {path} does not exist")
    kind = file_kind(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    elif kind == "torch-save":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"--weights {path} needs more than tensors to unpickle (it would run code or build "
                                  f"objects); robustlab loads weights only. Save model.state_dict() instead. ({e})") \
                from None
    else:
        raise CheckpointError(f"--weights {path} is a {kind} file, not weights (safetensors or torch.save)")
    while isinstance(state, dict) and not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in STATE_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            raise CheckpointError(f"--weights {path}: no tensors, and none of the keys {', '.join(STATE_KEYS)} holds "
                                  f"a state dict (keys: {', '.join(map(str, list(state)[:8]))})")
        state = inner
    if not isinstance(state, dict):
        raise CheckpointError(f"--weights {path} holds a {type(state).__name__}, not a state dict")
    out = {}
    for k, v in state.items():
        for p in PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_weights_into(model: nn.Module, state: dict[str, Tensor], path: str | Path) -> None:
    """Strict load with an error that lists a few missing / unexpected keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        raise CheckpointError(f"--weights {path} does not fit the model: "
                              + "; ".join(part for part in (f"missing {few(missing)}" if missing else "",
                                                            f"unexpected {few(unexpected)}" if unexpected else "")
                                          if part))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shapes
        raise CheckpointError(f"--weights {path} does not fit the model: {e}") from None


def load_any_model(spec: str, *, model_kwargs: str | None = None, weights: str | Path | None = None,
                   normalize: str | None = None, input_range: float = 1.0,
                   map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any] | None]:
    """The model `robustlab eval --model` names, in eval mode, wrapped for [0, 1] inputs; (model, extra), where
    extra is a robustlab checkpoint's metadata (None for a model robustlab did not write: it records no dataset)."""
    kwargs: dict[str, Any] = {}
    if model_kwargs:
        try:
            kwargs = json.loads(model_kwargs)
        except json.JSONDecodeError as e:
            raise InputError(f"--model-kwargs {model_kwargs!r} is not JSON: {e}") from None
        if not isinstance(kwargs, dict):
            raise InputError(f"--model-kwargs must be a JSON object, e.g. '{{\"depth\": 28}}', got {model_kwargs!r}")
    if input_range not in (1.0, 255.0):
        raise InputError(f"--input-range must be 1 or 255, got {input_range!r}")
    mean_std = parse_normalize(normalize) if normalize else None
    path = Path(spec)
    extra: dict[str, Any] | None = None
    if not path.is_file() and (":" not in spec or path.suffix in (".safetensors", ".pt", ".pth", ".pt2", ".ckpt")):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_file():
        kind = file_kind(path)
        for flag, value in (("--model-kwargs", model_kwargs), ("--weights", weights)):
            if value:
                raise InputError(f"{flag} applies to FILE.py:NAME / module:NAME models; {path} is a {kind} file "
                                 "that holds its weights")
        if kind == "safetensors":
            from robustlab.engine.checkpoint import load_model

            model, extra = load_model(path, map_location=map_location)
        elif kind == "torchscript":
            model = torch.jit.load(str(path), map_location=map_location)
        elif kind == "export":
            model = _exported(path)
        elif kind == "torch-save":
            raise CheckpointError(f"{path} is a torch.save file; robustlab does not unpickle models. Give the code and "
                                  f"the weights: --model FILE.py:NAME --weights {path}")
        else:
            raise CheckpointError(f"{path} is corrupt or not a model file (none of: robustlab checkpoint "
                                  "(safetensors), TorchScript, torch.export program)")
    else:
        target = _import_target(spec)
        try:  # the arguments are checked against the signature; an error inside the user's code keeps its traceback
            inspect.signature(target).bind(**kwargs)
        except TypeError as e:
            raise InputError(f"--model {spec!r} with --model-kwargs {kwargs}: {e}") from None
        except ValueError:  # no signature to read (some builtins): let the call itself say what is wrong
            pass
        model = target(**kwargs)
        if not isinstance(model, nn.Module):
            raise InputTypeError(f"--model {spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
        if weights:
            load_weights_into(model, read_weights(weights), weights)
    if mean_std is not None or input_range != 1.0:
        mean, std = mean_std if mean_std is not None else (None, None)
        model = Normalized(model, mean, std, input_range)
    return model.to(map_location).eval(), extra


def _exported(path: Path) -> nn.Module:
    program = torch.export.load(str(path))
    inputs = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    if inputs and isinstance(inputs[0].meta["val"].shape[0], int):  # a SymInt when the batch dimension is dynamic
        raise InputError(f"{path} was exported with a fixed batch size ({inputs[0].meta['val'].shape[0]}); attacks "
                         "change the batch size. Export with a dynamic batch dimension: torch.export.export(model, "
                         "(x,), dynamic_shapes=({0: torch.export.Dim('batch')},))")
    return Exported(program.module())


class Exported(nn.Module):
    """A torch.export program as a module. Its train/eval behaviour was fixed when it was exported (the program
    refuses .eval()), so train()/eval() here only set the flag."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def train(self, mode: bool = True) -> "Exported":
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.program(x)


# -- data --------------------------------------------------------------------------------------------------------
def is_array_file(spec: str | None) -> bool:
    return spec is not None and Path(spec).suffix.lower() in ARRAY_SUFFIXES and Path(spec).is_file()


def _read_arrays(path: Path) -> dict[str, Any]:
    kind = file_kind(path)
    if path.suffix.lower() == ".npz":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: torch.from_numpy(f[k]) for k in f.files}
        except ValueError as e:  # object arrays would need pickle
            raise InputError(f"--data {path}: {e}") from None
    if kind == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if kind == "torch-save":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise InputError(f"--data {path} needs code to unpickle; save a dict of tensors {{'x': ..., 'y': ...}} "
                             f"({e})") from None
        if not isinstance(obj, dict):
            raise InputError(f"--data {path} holds a {type(obj).__name__}; expected a dict with 'x' and 'y'")
        return obj
    raise InputError(f"--data {path} is not an .npz, safetensors or torch.save file")


def load_array_data(path: str | Path) -> tuple[Tensor, Tensor]:
    """(x float32 (N, C, H, W) in [0, 1], y int64) from a file; every shape, dtype, range and length is checked."""
    path = Path(path)
    arrays = _read_arrays(path)
    for key in ("x", "y"):
        if key not in arrays:
            raise InputError(f"--data {path} has no {key!r} (keys: {', '.join(map(str, arrays))}); it needs x (images) "
                             "and y (labels)")
    x, y = arrays["x"], arrays["y"]
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InputError(f"--data {path}: x and y must be arrays")
    if x.dim() != 4:
        raise InputError(f"--data {path}: x has shape {tuple(x.shape)}; expected 4 dimensions (N, C, H, W), or "
                         "(N, H, W, C) for uint8")
    if x.dtype == torch.uint8:
        if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)  # (N, H, W, C), the layout image libraries write
        x = x.float() / 255.0
    elif x.dtype.is_floating_point:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise InputError(f"--data {path}: float x has values in [{lo:.4g}, {hi:.4g}]; float images must lie in "
                             "[0, 1] (store uint8 for [0, 255]; normalisation belongs to the model: --normalize)")
        x = x.float()
    else:
        raise InputError(f"--data {path}: x has dtype {x.dtype}; expected float in [0, 1] or uint8")
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
        raise InputError(f"--data {path}: y must be 1-D integer labels, got dtype {y.dtype}, shape {tuple(y.shape)}")
    if y.shape[0] != x.shape[0]:
        raise InputError(f"--data {path}: {x.shape[0]} images but {y.shape[0]} labels")
    if y.numel() and int(y.min()) < 0:
        raise InputError(f"--data {path}: labels must be >= 0, got {int(y.min())}")
    return x.contiguous(), y.long()
