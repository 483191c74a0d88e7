"""Classification images left on disk (Tiny-ImageNet, image-folder stream=true) are read by DataLoader workers:
the same pixels as decoding up front, the same training run bit for bit with 0 or 2 workers, and the
validation split, class subsets and smoke cuts work on the files."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from robustlab.data import load_dataset, select_classes
from robustlab.data.embedded import materialise
from robustlab.data.loading import ImageFiles
from robustlab.data.standins import write_standin
from robustlab.engine.config import TrainConfig
from robustlab.engine.trainer import Trainer
from tests.conftest import process_running


@pytest.fixture(scope="module")
def tiny_kwargs(tmp_path_factory):
    return write_standin("tiny-imagenet", tmp_path_factory.mktemp("tiny"), 48, 8, 0)


def test_streamed_and_decoded_pixels_agree(tiny_kwargs):
    streamed = load_dataset("tiny-imagenet", **tiny_kwargs)
    decoded = load_dataset("tiny-imagenet", **tiny_kwargs, stream=False)
    assert isinstance(streamed.x_train, ImageFiles) and decoded.x_train.dtype == torch.uint8
    assert streamed.shape == decoded.shape == (3, 64, 64) and streamed.n_train == decoded.n_train == 48
    assert torch.equal(materialise(streamed.x_train), decoded.x_train)
    assert torch.equal(streamed.y_train, decoded.y_train)
    rest, (x_val, y_val) = streamed.hold_out(6, seed=0)
    assert isinstance(rest.x_train, ImageFiles) and rest.n_train == 42 and x_val.dtype == torch.float32
    _, (x_val2, _) = decoded.hold_out(6, seed=0)
    assert torch.equal(x_val, x_val2)
    sub = select_classes(streamed, classes=[int(streamed.y_train[0]), int(streamed.y_train[1])])
    assert isinstance(sub.x_train, ImageFiles) and sub.n_train == int((sub.y_train >= 0).sum()) >= 2


def test_image_folder_streams_on_request(tmp_path):
    kwargs = write_standin("image-folder", tmp_path, 12, 4, 0, {"size": 16})
    d = load_dataset("image-folder", **kwargs, stream=True)
    assert isinstance(d.x_train, ImageFiles) and d.shape == (3, 16, 16)
    assert torch.equal(materialise(d.x_train), load_dataset("image-folder", **kwargs).x_train)


def test_workers_do_not_change_the_run(tiny_kwargs, tmp_path, monkeypatch):
    """0 workers, 2 forked workers, and 2 workers from a forkserver (how they start once CUDA is initialised,
    simulated here): the same run, bit for bit."""
    def fit(workers, name):
        cfg = TrainConfig(name=name, out_dir=str(tmp_path), dataset="tiny-imagenet",
                          dataset_kwargs=tiny_kwargs, model="small-cnn", model_kwargs={"width": 4, "hidden": 16},
                          method="pgd-at", method_kwargs={"eps": 8 / 255, "steps": 2}, epochs=2, batch_size=16,
                          augment="crop-flip", validation=8, eval_samples=8, workers=workers, deterministic=True,
                          progress=False)
        trainer = Trainer(cfg)
        trainer.fit()
        return trainer

    a, b = fit(0, "w0"), fit(2, "w2")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    c = fit(2, "w2-forkserver")
    assert isinstance(a.data.x_train, ImageFiles) and b.loader.workers == c.loader.workers == 2
    for other in (b, c):
        for x, y in zip(a.model.state_dict().values(), other.model.state_dict().values()):
            assert torch.equal(x, y)
        assert [h["train_ce_adv"] for h in a.history] == [h["train_ce_adv"] for h in other.history]


class _Pids:
    """A source whose items are the pid of the process that read them."""

    def __len__(self):
        return 8

    def item(self, i, seed=None):
        return os.getpid()

    def collate(self, items):
        return list(items)


@pytest.mark.parametrize("cuda_initialised", [False, True])
def test_close_ends_the_persistent_workers(cuda_initialised, monkeypatch):
    """Forked workers, or (once CUDA is initialised) forkserver ones, stop when the loader is closed."""
    import time

    from robustlab.data.loading import EpochLoader, worker_start_method

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda_initialised)
    loader = EpochLoader(_Pids(), workers=2)
    pids = {p for _ in range(2) for batch in loader.epoch([[0, 1], [2, 3], [4, 5]]) for p in batch}
    assert len(pids) == 2 and os.getpid() not in pids
    context = loader.loader.multiprocessing_context  # None: the platform's default (fork on Linux)
    assert (context.get_start_method() if context else "fork") == (worker_start_method() if cuda_initialised else "fork")
    loader.close()
    deadline = time.monotonic() + 10
    while any(process_running(p) for p in pids):
        assert time.monotonic() < deadline, "the workers outlived close()"
        time.sleep(0.05)


def test_data_on_device_is_refused_for_streamed_images(tiny_kwargs, tmp_path):
    from robustlab.errors import ConfigError

    cfg = TrainConfig(name="dev", out_dir=str(tmp_path), dataset="tiny-imagenet", dataset_kwargs=tiny_kwargs,
                      model="small-cnn", data_on_device=True, validation=0, select_best=False)
    with pytest.raises(ConfigError, match="data_on_device needs data held in memory"):
        Trainer(dataclasses.replace(cfg))
