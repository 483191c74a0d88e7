"""Classification images left on disk (Tiny-ImageNet, image-folder stream=true) are read by DataLoader workers:
the same pixels as decoding up front, the same training run bit for bit with 0 or 2 workers, and the
validation split, class subsets and smoke cuts work on the files."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from robustlab.data import load_dataset, select_classes
from robustlab.data.embedded import materialise
from robustlab.data.loading import ImageFiles
from robustlab.data.standins import write_standin
from robustlab.engine.config import TrainConfig
from robustlab.engine.trainer import Trainer


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


def test_workers_do_not_change_the_run(tiny_kwargs, tmp_path):
    def fit(workers):
        cfg = TrainConfig(name=f"w{workers}", out_dir=str(tmp_path), dataset="tiny-imagenet",
                          dataset_kwargs=tiny_kwargs, model="small-cnn", model_kwargs={"width": 4, "hidden": 16},
                          method="pgd-at", method_kwargs={"eps": 8 / 255, "steps": 2}, epochs=2, batch_size=16,
                          augment="crop-flip", validation=8, eval_samples=8, workers=workers, deterministic=True,
                          progress=False)
        trainer = Trainer(cfg)
        trainer.fit()
        return trainer

    a, b = fit(0), fit(2)
    assert isinstance(a.data.x_train, ImageFiles) and b.loader.loader.num_workers == 2
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    assert [h["train_ce_adv"] for h in a.history] == [h["train_ce_adv"] for h in b.history]


def test_data_on_device_is_refused_for_streamed_images(tiny_kwargs, tmp_path):
    from robustlab.errors import ConfigError

    cfg = TrainConfig(name="dev", out_dir=str(tmp_path), dataset="tiny-imagenet", dataset_kwargs=tiny_kwargs,
                      model="small-cnn", data_on_device=True, validation=0, select_best=False)
    with pytest.raises(ConfigError, match="data_on_device needs data held in memory"):
        Trainer(dataclasses.replace(cfg))
