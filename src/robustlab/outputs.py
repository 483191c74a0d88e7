"""Output paths: checked before any expensive work starts, and results that are never lost.

`check_writable` creates the folder a result will go to and writes a probe file into it (permission bits say
little when running as root or on a read-only mount; a real write says everything). `save_result` writes a
result atomically (`atomic_write_bytes`: a temporary file and os.replace) and, if that still fails at the end of
a long job, saves it in a fallback place and says where.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from robustlab.errors import OutputError


def check_writable(path: str | Path, *, folder: bool = False, what: str = "output") -> Path:
    """`path` (a file, or a folder with folder=True) can be written: its folder exists or is created, and a probe
    file can be written there. OutputError naming the path and the reason otherwise."""
    path = Path(path)
    directory = path if folder else path.parent
    if not folder and path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name")
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} exists and is not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix=".robustlab-probe-"):
            pass
    except OSError as e:
        raise OutputError(f"cannot write the {what} {path}: {e.strerror or e} ({directory})") from None
    return path


def save_result(path: str | Path, write: Callable[[Path], None], *, what: str = "result") -> tuple[Path, str | None]:
    """write(path); if that fails with OSError, write the result to the current folder or the temporary folder
    instead. Returns (where it was written, None) or (the fallback path, a one-line explanation)."""
    path = Path(path)
    try:
        write(path)
        return path, None
    except OSError as first:
        reason = f"{first.strerror or first}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in (Path.cwd(), Path(tempfile.gettempdir())):
        fallback = folder / f"robustlab-{stamp}-{path.name}"
        try:
            write(fallback)
        except OSError:
            continue
        return fallback, f"cannot write the {what} to {path} ({reason}); it was saved to {fallback} instead"
    raise OutputError(f"cannot write the {what} to {path} ({reason}), nor to the current or temporary folder")




def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def _written_beside(path: Path, data: bytes) -> str:
    """`data` in a fsynced temporary file in path's folder, with the permissions of a new file (mkstemp's would
    otherwise stay 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    written = False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        written = True
    finally:
        if not written:  # whatever stopped the write (a full disk, Ctrl-C) propagates; the partial file goes
            Path(tmp).unlink(missing_ok=True)
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and os.replace: readers see the old
    file or the new one, never a part."""
    tmp = _written_beside(Path(path), data)
    replaced = False
    try:
        os.replace(tmp, path)
        replaced = True
    finally:
        if not replaced:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_npy(path: str | Path, array: Any) -> None:
    """`np.save` through `atomic_write_bytes`: a kill leaves the old file or the whole new one."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_figure(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """A matplotlib figure saved through `atomic_write_bytes` (the format from the path's suffix)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())


def atomic_create_text(path: str | Path, text: str) -> bool:
    """Create `path` with `text` only if it does not exist yet, atomically (a hard link of a complete temporary
    file: of two processes creating it at once, the first wins and the other sees its whole file). Returns whether
    this call created it."""
    tmp = _written_beside(Path(path), text.encode("utf-8"))
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    return True


__all__ = ["atomic_create_text", "atomic_write_bytes", "atomic_write_text", "check_writable", "save_result"]
