"""File-backed detection data through DataLoader workers: a synthetic VOC folder (64 images, written in VOC's own
layout) trains det-std with 0 and 2 workers to the same batches and the same weights bit for bit, and a run killed
mid-epoch resumes to the same weights. Per-sample augmentation seeds make the worker count irrelevant."""
from __future__ import annotations

import pytest
import torch

from robustlab.data.loading import EpochLoader, sample_seed
from robustlab.data.standins import write_standin
from robustlab.engine.config import TrainConfig
from robustlab.engine.trainer import Trainer

pytestmark = pytest.mark.xdist_group("voc-stream")


@pytest.fixture(scope="module")
def voc_kwargs(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    return write_standin("voc", root, 64, 8, 0, {"image_size": 96, "train_sets": ["2007/trainval"]})


def _config(voc_kwargs, tmp_path, name, workers):
    return TrainConfig(name=name, out_dir=str(tmp_path), dataset="voc", dataset_kwargs=voc_kwargs, model="tinyssd-96",
                       method="det-std", epochs=2, batch_size=32, lr=0.01, validation=0, select_best=False,
                       eval_every=2, eval_samples=8, workers=workers, deterministic=True, progress=False, seed=3)


def _fit(cfg, batches=None, **kwargs):
    trainer = Trainer(cfg)
    if batches is not None:
        inner = trainer._train_batch

        def record(batch, gen):
            x, y = inner(batch, gen)
            batches.append((x.clone(), y.clone()))
            return x, y
        trainer._train_batch = record  # type: ignore[method-assign]
    result = trainer.fit(**kwargs)
    return trainer, result


def test_workers_do_not_change_batches_or_weights(voc_kwargs, tmp_path):
    seen0: list = []
    seen2: list = []
    t0, r0 = _fit(_config(voc_kwargs, tmp_path, "w0", 0), seen0)
    t2, r2 = _fit(_config(voc_kwargs, tmp_path, "w2", 2), seen2)
    assert t0.data.train.streams and t2.loader.workers == 2
    assert len(seen0) == len(seen2) == 4  # 2 epochs of 2 steps
    for (x0, y0), (x2, y2) in zip(seen0, seen2):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    assert not torch.equal(seen0[0][0], seen0[2][0])  # epoch 2 reads other augmentations
    assert [h["train_loss_cls"] for h in r0["history"]] == [h["train_loss_cls"] for h in r2["history"]]
    for (k, a), b in zip(t0.model.state_dict().items(), t2.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_killed_run_resumes_bit_exact_with_workers(voc_kwargs, tmp_path):
    full, _ = _fit(_config(voc_kwargs, tmp_path, "full", 2))
    with pytest.raises(KeyboardInterrupt):
        _fit(_config(voc_kwargs, tmp_path, "cut", 2), stop_at_step=3)  # mid-epoch 2
    resumed, _ = _fit(_config(voc_kwargs, tmp_path, "cut", 0), resume=True)  # workers may change on resume
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_item_seeds_depend_on_run_epoch_and_index_only(voc_kwargs):
    from robustlab.detection.data import load_detection_data

    data = load_detection_data("voc", **voc_kwargs)
    loader = EpochLoader(data.train, workers=0, seed=7)
    (x, t), = list(loader.epoch([torch.tensor([5, 9])], epoch=1))
    x9, t9 = data.train.batch(torch.tensor([9]), seeds=[sample_seed(7, 1, 9)])
    assert torch.equal(x[1:], x9) and torch.equal(t[1:, :t9.shape[1]], t9)


def test_workers_start_without_fork_after_cuda_init(voc_kwargs, monkeypatch):
    """With CUDA initialised in the parent (simulated), the workers start from a forkserver instead of a fork
    (PyTorch does not support fork after CUDA: a child that frees an inherited CUDA tensor aborted on an H200);
    the detection source travels to them pickled and the batches are the same."""
    from robustlab.data.loading import worker_start_method
    from robustlab.detection.data import load_detection_data

    data = load_detection_data("voc", **voc_kwargs)
    batches = [torch.tensor([5, 7]), torch.tensor([1, 2])]
    plain = list(EpochLoader(data.test, workers=0).epoch(batches))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    loader = EpochLoader(data.test, workers=1)
    served = list(loader.epoch(batches))
    assert loader.loader.multiprocessing_context.get_start_method() == worker_start_method()
    loader.close()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(plain, served))
