"""Model checkpoints: safetensors weights with the model's build config in the metadata.

Loading never unpickles (safetensors only); files are written atomically (temp file + os.replace),
so an interrupted save never leaves a half-written checkpoint under the final name, with the permissions any
other new file gets (the umask's); a SHA-256 of every tensor (name, dtype, shape, bytes) is stored in the
metadata and checked on load, so bytes that rotted under an intact header are refused, not loaded.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustlab.errors import CheckpointError, InputError
from robustlab.outputs import atomic_write_bytes

FORMAT = "robustlab-model-v1"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (independent of file layout)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def verify_sha256(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    """Refuse a file whose tensors no longer match the hash stored when it was written (files from before the hash
    was stored carry none and are accepted)."""
    want = meta.get("sha256")
    if want is not None and tensors_sha256(tensors) != want:
        raise CheckpointError(f"{path} is damaged: its tensors do not match the SHA-256 stored when it was written "
                              "(the header is intact, the weights are not); restore it from a copy")


def file_kind(path: Path) -> str:
    """'safetensors', 'torchscript', 'export', 'torch-save' (a pickle: weights at most) or 'unknown', from the bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if 0 < header_len <= path.stat().st_size - 8 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any(n.endswith("/archive_format") or "/models/" in n for n in names):
            return "export"
        if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        return "torch-save"
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        return "torch-save"
    return "unknown"


def save_model(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> Path:
    """Save weights and buffers + `model.config` (how to rebuild it) + JSON-serialisable `extra`."""
    from safetensors.torch import save

    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise InputError("save_model needs a robustlab model (one built by create_model, with a .config)")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "model": json.dumps(config), "extra": json.dumps(extra or {}),
            "sha256": tensors_sha256(state)}
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
    if file_kind(path) in ("torch-save", "torchscript", "export"):
        raise CheckpointError(f"{path} is a PyTorch file written by torch.save (a pickled state dict or model), not a "
                              "robustlab checkpoint (safetensors). robustlab never unpickles it for you: build your "
                              "model, model.load_state_dict(torch.load(path, weights_only=True)), then evaluate it "
                              "with robustlab.evaluate(model, ...) or save it with "
                              "robustlab.engine.checkpoint.save_model")
    try:
        state = load(path.read_bytes())
        import safetensors

        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (not a valid safetensors file): {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a robustlab model checkpoint (format {meta.get('format')!r})")
    verify_sha256(state, meta, path)
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
