"""JSON output: atomic writes, NaN/inf written as null (JSON has no such numbers)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from robustlab.outputs import atomic_write_bytes


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2) + "\n").encode())
