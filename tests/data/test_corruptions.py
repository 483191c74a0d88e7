"""The CIFAR-10-C corruption generator: deterministic, shape- and dtype-preserving, distortion growing with
severity where the CIFAR-10-C parameter schedule is monotone, and readable by the cifar10-c loader."""
import numpy as np
import pytest

from robustlab.data import load_dataset
from robustlab.data.corruptions import CORRUPTIONS, corrupt, write_cifar10_c

# CIFAR-10-C schedules that are not monotone in strength, so no distortion measure can grow with severity:
NOT_MONOTONE = {
    "saturate": "saturation x0.3, x0.1 at severities 1-2 (desaturate), x1.5 .. x2.5 at 3-5",
    "elastic_transform": "the affine jitter shrinks with severity (0.08 -> 0.03 of the size) as the smooth field grows",
    "spatter": "water drops at severities 1-3, mud at 4-5",
    "glass_blur": "the larger blur of severities 2-3 smooths away the pixel shuffle (PSNR 20.8, 20.8, 21.9)",
    "frost": "the image weight falls (1 -> 0.75) while the frost weight rises; PSNR is not monotone between 3 and 4",
}


@pytest.fixture(scope="module")
def colour_images():
    """20 colourful 32x32 RGB images: real MNIST digits in a random colour over a random background."""
    d = load_dataset("mnist5k")
    g = np.random.default_rng(0)
    x = d.x_test[:20].numpy()[:, 0]
    out = np.zeros((20, 32, 32, 3))
    for i in range(20):
        m = np.pad(x[i], 2)[..., None]
        out[i] = m * g.uniform(0.3, 1, 3) + (1 - m) * g.uniform(0, 0.6, 3)
    return np.round(out * 255).astype(np.uint8)


def _psnr(a, b):
    mse = ((a.astype(float) - b.astype(float)) ** 2).mean(axis=(1, 2, 3))
    return float((10 * np.log10(255 ** 2 / np.maximum(mse, 1e-10))).mean())


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_shape_dtype_and_severity(name, colour_images):
    x = colour_images[:8]
    a, b = corrupt(x, name, 3, seed=1), corrupt(x, name, 3, seed=1)
    assert a.shape == x.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    f = corrupt(x.astype(np.float32) / 255, name, 3, seed=1)
    assert f.dtype == np.float32 and f.min() >= 0 and f.max() <= 1
    psnr = [_psnr(x, corrupt(x, name, s)) for s in range(1, 6)]
    assert all(p < 45 for p in psnr), psnr  # every severity visibly distorts
    if name not in NOT_MONOTONE:
        assert all(p1 >= p2 - 0.05 for p1, p2 in zip(psnr, psnr[1:])), psnr
        assert psnr[0] - psnr[-1] > 1.0, psnr


def test_grey_images_and_the_loader_layout(tmp_path):
    d = load_dataset("mnist5k")
    x = (d.x_test[:10].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    out = write_cifar10_c(x, d.y_test[:10].numpy(), tmp_path, corruptions=["fog", "jpeg_compression"], progress=False)
    fog = np.load(out / "fog.npy")
    assert fog.shape == (50, 28, 28, 1) and fog.dtype == np.uint8
    c = load_dataset("cifar10-c", root=tmp_path, corruption="fog", severity=2)
    assert c.x_test.shape == (10, 1, 28, 28) and (c.y_test == d.y_test[:10]).all()
    assert np.array_equal((c.x_test.numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1), fog[10:20])


def test_bad_input():
    x = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corrupt(x, "rain", 1)
    with pytest.raises(ValueError, match="severity must be an integer in 1..5"):
        corrupt(x, "fog", 6)
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        corrupt(np.zeros((8, 8, 3), np.uint8), "fog", 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(np.full((1, 8, 8, 3), 2.0), "fog", 1)


def test_generation_is_atomic_with_a_completion_marker_written_last(tmp_path, monkeypatch):
    """Each file is written whole (a kill leaves none half-written) and complete.json comes last: a folder without it
    is an interrupted generation (issue 31)."""
    import json

    import robustlab.data.corruptions as corruptions_module

    x = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    y = np.arange(4)
    out = write_cifar10_c(x, y, tmp_path / "ok", corruptions=["fog"], progress=False)
    assert json.loads((out / "complete.json").read_text())["corruptions"] == ["fog"]
    written = []
    real = corruptions_module.atomic_save_npy

    def dies_after_the_first(path, array):
        if written:
            raise KeyboardInterrupt("killed")
        real(path, array)
        written.append(path)

    monkeypatch.setattr(corruptions_module, "atomic_save_npy", dies_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        write_cifar10_c(x, y, tmp_path / "killed", corruptions=["fog", "jpeg_compression"], progress=False)
    files = sorted(p.name for p in (tmp_path / "killed").iterdir())
    assert files == ["fog.npy"] and np.load(tmp_path / "killed" / "fog.npy").shape == (20, 8, 8, 3)


def test_figures_are_written_atomically(tmp_path):
    from robustlab.outputs import atomic_save_figure
    from robustlab.reports.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    atomic_save_figure(fig, tmp_path / "f.png", dpi=50)
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no temporary file left
