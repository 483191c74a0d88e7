"""Detection fixtures: a small MNIST-Det split and a briefly trained TinySSD-96, shared per session."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def det_small():
    from robustlab.detection.data import mnist_det

    return mnist_det(preset="voc", n_train=256, n_test=64)


# CI-sized clean training (about a minute on one core): 600 MNIST-Det `voc` images, 10 epochs, batch 8, SGD with
# cosine lr. Measured mAP@0.5 on 200 test images: 0.284 (the full 2,000-image / 30-epoch recipe: 0.58).
STD_BUDGET = dict(dataset="mnist-det", dataset_kwargs={"preset": "voc", "n_train": 600, "n_test": 200},
                  model="tinyssd-96", method="det-std", epochs=10, batch_size=8, lr=0.01, weight_decay=5e-4,
                  schedule="cosine", warmup_epochs=1, eval_every=10, eval_samples=200, progress=False, seed=0,
                  select_best=False)  # evaluated once, at the end: nothing to select, no validation split


@pytest.fixture(scope="session")
def trained_std_detector(tmp_path_factory):
    """(model in eval mode, data, training history) of the CI-sized STD TinySSD-96."""
    from robustlab.engine.checkpoint import load_model
    from robustlab.engine.config import TrainConfig
    from robustlab.engine.trainer import Trainer

    out = tmp_path_factory.mktemp("det-std")
    trainer = Trainer(TrainConfig(name="std", out_dir=str(out), **STD_BUDGET))
    res = trainer.fit()
    model, _ = load_model(out / "std" / "best.safetensors")
    return model, trainer.data, res["history"]


def perfect_outputs(targets, priors, num_classes, logit=20.0):
    """Network outputs that predict the ground truth exactly: +logit on the matched class of every matched
    prior (background elsewhere) and encode(GT) as the offsets."""
    from robustlab.detection.targets import match_targets

    conf_t, loc_t, _ = match_targets(targets, priors)
    conf = torch.zeros(*conf_t.shape, num_classes + 1)
    conf.scatter_(2, conf_t[..., None], logit)
    return loc_t.clone(), conf
