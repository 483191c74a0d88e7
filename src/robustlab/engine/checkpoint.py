"""Model checkpoints: safetensors weights with the model's build config in the metadata.

Loading never unpickles (safetensors only); files are written atomically (temp file + os.replace),
so an interrupted save never leaves a half-written checkpoint under the final name.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT = "robustlab-model-v1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, truncated or not a robustlab checkpoint."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Save weights and buffers + `model.config` (how to rebuild it) + JSON-serialisable `extra`."""
    from safetensors.torch import save

    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError("save_model needs a robustlab model (one built by create_model, with a .config)")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "model": json.dumps(config), "extra": json.dumps(extra or {})}
    atomic_write_bytes(path, save(state, metadata=meta))
    return Path(path)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(state_dict, model config, extra) from a file, with clear errors for every way it can be bad."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    data = path.read_bytes()
    try:
        state = load(data)
        import safetensors

        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (not a valid safetensors file): {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a robustlab model checkpoint (format {meta.get('format')!r})")
    try:
        config = json.loads(meta["model"])
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has damaged metadata: {e}") from None
    return state, config, extra


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from its config and load the weights (strict). Returns (model in eval mode, extra)."""
    from robustlab.models import create_model

    state, config, extra = read_checkpoint(path)
    kwargs = {k: v for k, v in config.items() if k != "name"}
    model = create_model(config["name"], **kwargs)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not match model {config['name']!r}: {e}") from None
    return model.to(map_location).eval(), extra
