"""Dataset loaders: tiny files in each real format are written here and read back; bad files give
errors naming the path and the expected layout."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from robustlab.data import DataError, load_dataset, select_classes
from robustlab.data.embedded import as_float_images


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx(tmp_path, compress):
    rng = np.random.default_rng(0)
    xtr, ytr = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    xte, yte = rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3)
    for stem, arr in [("train-images-idx3-ubyte", xtr), ("train-labels-idx1-ubyte", ytr),
                      ("t10k-images-idx3-ubyte", xte), ("t10k-labels-idx1-ubyte", yte)]:
        data = _idx(arr)
        (tmp_path / (stem + (".gz" if compress else ""))).write_bytes(gzip.compress(data) if compress else data)
    d = load_dataset("mnist", root=tmp_path)
    assert d.x_train.shape == (7, 1, 28, 28) and d.x_test.shape == (3, 1, 28, 28)
    assert d.x_train.dtype == torch.uint8  # training images stay uint8 (a quarter of the memory)
    assert torch.equal(d.x_train[:, 0], torch.tensor(xtr, dtype=torch.uint8))
    assert d.y_test.tolist() == yte.tolist()


def test_mnist_missing_and_truncated(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*expected layout"):
        load_dataset("mnist", root=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(np.zeros((2, 28, 28)))[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", root=tmp_path)


def _cifar_batch(path, n, key="labels", seed=0, k=10):
    rng = np.random.default_rng(seed)
    d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key.encode(): list(rng.integers(0, k, n))}
    path.write_bytes(pickle.dumps(d))
    return d


def test_cifar10_pickles(tmp_path):
    batches = [_cifar_batch(tmp_path / f"data_batch_{i}", 4, seed=i) for i in range(1, 6)]
    test = _cifar_batch(tmp_path / "test_batch", 3, seed=9)
    d = load_dataset("cifar10", root=tmp_path)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    first = batches[0][b"data"][0].reshape(3, 32, 32)
    assert torch.equal(d.x_train[0], torch.tensor(first, dtype=torch.uint8))
    assert d.x_test.dtype == torch.float32  # test images: float in [0, 1]
    assert torch.allclose(d.x_test[0] * 255, torch.tensor(test[b"data"][0].reshape(3, 32, 32), dtype=torch.float32))
    assert d.y_test.tolist() == [int(v) for v in test[b"labels"]]


def test_cifar100_pickles(tmp_path):
    for name in ("train", "test"):
        rng = np.random.default_rng(0)
        (tmp_path / name).write_bytes(pickle.dumps({b"data": rng.integers(0, 256, (5, 3072), dtype=np.uint8),
                                                    b"fine_labels": list(range(5)), b"coarse_labels": [0] * 5}))
    assert load_dataset("cifar100", root=tmp_path).num_classes == 100
    assert load_dataset("cifar100", root=tmp_path, label="coarse").y_train.tolist() == [0] * 5


def test_cifar_pickle_never_executes_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    for i in range(1, 6):
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset("cifar10", root=tmp_path)


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    for name, n in (("train_32x32.mat", 6), ("test_32x32.mat", 2)):
        savemat(tmp_path / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                  "y": np.array([[10], [1], [2], [3], [4], [5]][:n], dtype=np.uint8)})
    d = load_dataset("svhn", root=tmp_path)
    assert d.x_train.shape == (6, 3, 32, 32)
    assert d.y_train.tolist() == [0, 1, 2, 3, 4, 5]  # label 10 means digit 0


def _png(path, size=8, value=0):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def test_image_folder(tmp_path):
    for split, n in (("train", 2), ("test", 1)):
        for ci, c in enumerate(("cat", "dog")):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", value=100 * ci)
    d = load_dataset("image-folder", root=tmp_path)
    assert d.x_train.shape == (4, 3, 8, 8) and d.num_classes == 2 and d.classes == ["cat", "dog"]
    assert d.y_train.tolist() == [0, 0, 1, 1]
    assert d.x_train[2].max().item() == 100 and as_float_images(d.x_train)[2].max().item() == pytest.approx(100 / 255)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="expected layout"):
        load_dataset("image-folder", root=tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "test" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image"):
        load_dataset("image-folder", root=tmp_path)


def test_tiny_imagenet(tmp_path):
    (tmp_path / "wnids.txt").write_text("n01\nn02\n")
    for w in ("n01", "n02"):
        _png(tmp_path / "train" / w / "images" / f"{w}_0.JPEG", size=64)
    _png(tmp_path / "val" / "images" / "val_0.JPEG", size=64)
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn02\t0\t0\t10\t10\n")
    d = load_dataset("tiny-imagenet", root=tmp_path)
    assert d.x_train.shape == (2, 3, 64, 64) and d.y_test.tolist() == [1]
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\n")
    with pytest.raises(DataError, match="not in wnids.txt"):
        load_dataset("tiny-imagenet", root=tmp_path)


def test_cifar10_c(tmp_path):
    x = np.stack([np.full((32, 32, 3), s, dtype=np.uint8) for s in range(5) for _ in range(2)])
    np.save(tmp_path / "fog.npy", x)
    np.save(tmp_path / "labels.npy", np.array([1, 2] * 5))
    d = load_dataset("cifar10-c", root=tmp_path, corruption="fog", severity=3)
    assert d.x_test.shape == (2, 3, 32, 32) and d.x_train.shape[0] == 0
    assert d.x_test.max().item() == pytest.approx(2 / 255)
    with pytest.raises(DataError, match="corruptions present: fog"):
        load_dataset("cifar10-c", root=tmp_path, corruption="snow")
    with pytest.raises(ValueError, match="severity"):
        load_dataset("cifar10-c", root=tmp_path, corruption="fog", severity=6)


def test_select_classes_and_imbalance(mnist):
    d = select_classes(mnist, classes=[3, 8], imbalance={8: 0.3})
    assert d.num_classes == 2 and set(d.y_train.tolist()) == {0, 1}
    n3, n8 = (d.y_train == 0).sum().item(), (d.y_train == 1).sum().item()
    full8 = (mnist.y_train == 8).sum().item()
    assert n8 == round(0.3 * full8) and n3 == (mnist.y_train == 3).sum().item()
    with pytest.raises(ValueError, match="distinct"):
        select_classes(mnist, classes=[1, 1])


def test_embedded_splits_are_fixed_and_stratified(mnist, digits):
    assert mnist.x_train.shape == (4000, 1, 28, 28) and mnist.x_test.shape == (1000, 1, 28, 28)
    assert mnist.x_train.min() >= 0 and mnist.x_train.max() <= 1
    counts = torch.bincount(mnist.y_test, minlength=10)
    assert counts.min() >= 90 and counts.max() <= 115  # stratified: class shares as in the 5,000
    again = load_dataset("mnist5k")
    assert torch.equal(again.y_test, mnist.y_test)
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.x_test.shape[0] == 360
