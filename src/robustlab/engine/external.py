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
from robustlab.errors import CheckpointError, InputError, InputTypeError, UserCodeError

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


def _check_normalize_units(text: str, mean: list[float], std: list[float], input_range: float) -> None:
    """The mean and std must be in the units the model is fed: [0, 1], or [0, 255] with --input-range 255. Means
    all <= 1 with --input-range 255 are [0, 1] units (the model would see x * 255 normalised by them)."""
    scale = 255.0 if input_range == 255.0 else 1.0
    if scale == 255.0 and max(mean) <= 1 and max(std) <= 1:
        scaled = ",".join(f"{255 * v:.4g}" for v in mean) + "/" + ",".join(f"{255 * v:.4g}" for v in std)
        raise InputError(f"--normalize {text} is in [0, 1] units but --input-range 255 feeds the model [0, 255] "
                         f"images: give it in [0, 255] units ({scaled}), or drop --input-range 255")
    if scale == 1.0 and (max(mean) > 1 or max(std) > 1):
        scaled = ",".join(f"{v / 255:.4g}" for v in mean) + "/" + ",".join(f"{v / 255:.4g}" for v in std)
        raise InputError(f"--normalize {text} is in [0, 255] units but the model is fed [0, 1] images: give it in "
                         f"[0, 1] units ({scaled}), or add --input-range 255 if the model wants [0, 255] inputs")
    if min(mean) < 0 or max(mean) > scale:
        raise InputError(f"--normalize {text}: channel means must lie in [0, {scale:g}] (the input range)")


def probe_model(model: nn.Module, x: Tensor, model_spec: str, data_name: str) -> None:
    """One forward pass of the model on one image of the data before any work: a model that cannot take the
    data's images (channels, size) fails here in one line instead of inside an attack."""
    from robustlab.attacks.base import attack_mode
    from robustlab.validation import check_fits_model

    p = next(model.parameters(), None)
    x1 = x[:1].to(p.device if p is not None else "cpu")
    check_fits_model(model, x1, name=data_name)  # a robustlab model knows its input shape: the plainer message
    try:
        with attack_mode(model), torch.no_grad():
            out = model(x1)
    except Exception as e:  # the user's model on the user's data: their mismatch or their bug, their traceback
        if raised_by_robustlab(e):
            raise
        raise UserCodeError(f"--model {model_spec} does not run on one image of {data_name} (shape "
                            f"{tuple(x1.shape[1:])}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
                            "check the model's expected channels and size", user_traceback(e)) from None
    if not isinstance(out, Tensor) or out.dim() != 2:
        raise InputError(f"--model {model_spec} returns {type(out).__name__}"
                         + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else "")
                         + f" on one image of {data_name}; a classifier returns logits of shape (N, classes)")


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
        folder = str(path.resolve().parent)
        if folder not in sys.path:  # as `python FILE.py` would: FILE's neighbours import
            sys.path.insert(0, folder)
        try:
            loader_spec.loader.exec_module(module)  # the user's own file, at the user's explicit request
        except Exception as e:  # anything their file raises is their bug: one line, then their traceback
            sys.modules.pop(module_name, None)
            if raised_by_robustlab(e):
                raise
            raise UserCodeError(f"--model {spec!r}: importing {path} failed: {type(e).__name__}: {e}",
                                user_traceback(e)) from None
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise InputError(f"--model {spec!r}: no module {where!r} ({e})") from None
    if not hasattr(module, name):
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:10]
        raise InputError(f"--model {spec!r}: {where} has no {name!r} (it has: {', '.join(public)})")
    return getattr(module, name)


def raised_by_robustlab(e: BaseException) -> bool:
    """Whether an exception caught around the user's code (their file, their model's forward) came from robustlab
    itself: its innermost frame outside torch and importlib lies in robustlab (a SyntaxError: its file does). Such
    an exception is a bug of ours and keeps its own traceback instead of becoming a UserCodeError."""
    import traceback

    robustlab_dir = str(Path(__file__).resolve().parents[1])
    if isinstance(e, SyntaxError):
        return str(e.filename or "").startswith(robustlab_dir)
    torch_dir = str(Path(torch.__file__).resolve().parent)
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(torch_dir) and "importlib" not in f.filename]
    return bool(frames) and frames[-1].filename.startswith(robustlab_dir)


def user_traceback(e: BaseException) -> str:
    """The traceback of an exception raised in the user's code, without robustlab's own frames (and importlib's)."""
    import traceback

    robustlab_dir = str(Path(__file__).resolve().parents[1])
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if not f.filename.startswith(robustlab_dir) and "importlib" not in f.filename
              and not f.filename.endswith("torch/nn/modules/module.py")]  # nn.Module's call plumbing
    lines = ["Traceback (most recent call last), the user's code:\n", *traceback.format_list(frames),
             *traceback.format_exception_only(type(e), e)]
    return "".join(lines)


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
    if mean_std is not None:
        _check_normalize_units(normalize or "", *mean_std, input_range)
    path = Path(spec)
    extra: dict[str, Any] | None = None
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))[:5]
        raise CheckpointError(f"--model {path} is a folder; give a model file"
                              + (f" in it ({', '.join(inside)})" if inside else ""))
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
        try:
            model = target(**kwargs)
        except Exception as e:  # raised inside the user's code: their bug, with their traceback
            if raised_by_robustlab(e):
                raise
            raise UserCodeError(f"--model {spec!r}: building the model failed: {type(e).__name__}: {e}",
                                user_traceback(e)) from None
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
