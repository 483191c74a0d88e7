"""Reading file-backed datasets through `torch.utils.data.DataLoader` workers.

A *streamed source* is map-style: `item(i, seed)` decodes (and, given a seed, augments) sample i and `collate(items)`
makes a batch. `EpochLoader` keeps one DataLoader for a whole run (persistent workers, prefetch, pinned memory on
CUDA) and is handed each epoch's index batches. Every sample's augmentation seed is a function of (run seed,
epoch, sample index) alone, so a batch is the same bit for bit with 0 or 8 workers, on one rank or many, and
after a resume. In-memory data needs none of this: its batches are indexed where they live.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from robustlab.errors import DataError
from robustlab.utils import mix_seed


class StreamedSource(Protocol):
    def __len__(self) -> int: ...

    def item(self, i: int, seed: int | None) -> Any: ...

    def collate(self, items: Sequence[Any]) -> Any: ...


def default_workers() -> int:
    """DataLoader workers when the config does not say: one core is left to the training process, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores - 1))


def resolve_workers(workers: int | None) -> int:
    """The config's `workers`, or the machine's default when it is null."""
    return default_workers() if workers is None else int(workers)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample `index` in `epoch` (independent of batches, workers and ranks)."""
    return mix_seed(seed, epoch, index, 4)


def read_image_array(path: Path, size: int | None, mode: str) -> np.ndarray:
    """An image file as uint8 (C, H, W) in Pillow mode `mode` ("L" or "RGB"), resized to size x size if given."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


class ImageFiles:
    """Classification training images left as files and decoded per item (by DataLoader workers during training):
    a map-style source of uint8 (C, H, W) images of one shape with their labels. It stands where an ImageData's
    `x_train` tensor would (same `shape` and `dtype`); `take` and `materialise` in data.embedded treat both alike.
    Augmentation happens on the device with the step's generator, so items need no seed."""

    streams = True
    dtype = torch.uint8

    def __init__(self, paths: Sequence[Path], labels: Tensor, size: int | None, mode: str,
                 image_shape: tuple[int, int, int]) -> None:
        if len(paths) != labels.shape[0]:
            raise DataError(f"{len(paths)} image files but {labels.shape[0]} labels")
        self.paths, self.labels, self.size, self.mode = list(paths), labels, size, mode
        self.shape = (len(self.paths), *image_shape)

    def __len__(self) -> int:
        return len(self.paths)

    def item(self, i: int, seed: int | None = None) -> tuple[Tensor, Tensor]:
        image = torch.from_numpy(read_image_array(self.paths[i], self.size, self.mode).copy())
        if tuple(image.shape) != self.shape[1:]:
            raise DataError(f"{self.paths[i]} is {tuple(image.shape)}, the other images {self.shape[1:]}; pass size=N "
                            f"to resize")
        return image, self.labels[i]

    def collate(self, items: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        images, labels = zip(*items)
        return torch.stack(images), torch.stack(labels)

    def subset(self, idx: Tensor) -> "ImageFiles":
        ids = idx.tolist()
        return ImageFiles([self.paths[i] for i in ids], self.labels[idx], self.size, self.mode,
                          self.shape[1:])

    def load(self) -> Tensor:
        """Every image, decoded, as one uint8 tensor (a validation split, or evaluation on the training split)."""
        if not self.paths:
            return torch.zeros(self.shape, dtype=torch.uint8)
        return self.collate([self.item(i) for i in range(len(self))])[0]


class _Items(torch.utils.data.Dataset):
    """The DataLoader's view of a source: item (i, seed) -> source.item(i, seed)."""

    def __init__(self, source: StreamedSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int | None]) -> Any:
        return self.source.item(*key)


class _Batches(torch.utils.data.Sampler):
    """This epoch's batches of (index, seed) pairs; replaced before each epoch (the workers persist)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int | None]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # workers decode; the training process owns the cores' BLAS threads


class EpochLoader:
    """Batches of a streamed source read by `workers` processes. `epoch(index_batches, epoch)` yields the collated
    batches in order; seed=None reads without augmentation (evaluation)."""

    def __init__(self, source: StreamedSource, workers: int = 0, pin_memory: bool = False, seed: int | None = None,
                 prefetch: int = 2, persistent: bool = True) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
        self.source, self.seed, self._batches = source, seed, _Batches()
        # persistent: a training run keeps its workers from epoch to epoch (close() ends them); a one-pass read
        # (evaluation) lets them exit at the end of the pass
        extra: dict[str, Any] = ({"persistent_workers": persistent, "prefetch_factor": prefetch,
                                  "worker_init_fn": _one_thread} if workers else {})
        self.workers, self._started = workers, False
        self.loader: torch.utils.data.DataLoader | None = torch.utils.data.DataLoader(
            _Items(source), batch_sampler=self._batches, num_workers=workers, collate_fn=source.collate,
            pin_memory=pin_memory, **extra)

    def epoch(self, index_batches: Sequence[Tensor | Sequence[int]], epoch: int = 0) -> Iterator[Any]:
        assert self.loader is not None, "EpochLoader.epoch after close()"
        seed = self.seed
        self._batches.batches = [[(int(i), None if seed is None else sample_seed(seed, epoch, int(i))) for i in b]
                                 for b in index_batches]
        if self.workers and not self._started and torch.cuda.is_initialized():
            # PyTorch does not support forking a process that has initialised CUDA: the workers (started at the
            # first epoch, kept when persistent) come from a clean forkserver process instead (spawn where there
            # is none); the source, its collate and the worker set-up are picklable for it
            self.loader.multiprocessing_context = worker_start_method()
        self._started = True
        return iter(self.loader)

    def close(self) -> None:
        """End the persistent worker processes now (not whenever the garbage collector gets to them): the
        DataLoader goes, and its iterator's finaliser, torch's own way to end persistent workers, stops them."""
        self.loader = None


def worker_start_method() -> str:
    """How DataLoader workers start once CUDA is initialised: forkserver, else spawn."""
    import multiprocessing

    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class IndexLoader:
    """In-memory data: the index batches themselves (the task indexes the tensors where they live)."""

    def epoch(self, index_batches: Sequence[Tensor], epoch: int = 0) -> Iterator[Tensor]:
        return iter(index_batches)

    def close(self) -> None:
        return None
