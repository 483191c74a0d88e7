"""Detection data: MNIST-Det (invariant 24), VOC/COCO readers on folders the tests write, SSD augmentation."""
import json

import numpy as np
import pytest
import torch

from robustlab.data.files import DataError
from robustlab.detection import mnistdet
from robustlab.detection.data import FileSource, mnist_det
from robustlab.detection.folders import read_coco, read_voc
from robustlab.detection.targets import check_targets, unpad
from robustlab.detection.transforms import hsv_to_rgb, random_crop, resize, rgb_to_hsv, ssd_augment
from robustlab.registry import DATASETS


def _pairwise_ok(split, size):
    off, boxes = split["offsets"], split["boxes"]
    assert boxes.min() >= 0 and boxes.max() <= size
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert w.min() >= 4 and h.min() >= 4 and (w / h).min() >= 0.5 - 1e-6
    for i in range(len(off) - 1):
        b = torch.from_numpy(boxes[off[i]:off[i + 1]])
        if len(b) > 1:
            from robustlab.detection.boxes import box_iou

            iou = box_iou(b, b)
            assert (iou - torch.eye(len(b))).max() < 0.2


def test_same_seed_same_bytes_and_disjoint_digit_pools():
    cfg = mnistdet.make_config("voc", n_train=40, n_test=20)
    a, b = mnistdet.generate_split(cfg, "train"), mnistdet.generate_split(cfg, "train")
    for k in a:
        assert a[k].tobytes() == b[k].tobytes()
    other = mnistdet.generate_split(mnistdet.make_config("voc", n_train=40, n_test=20, seed=5), "train")
    assert other["images"].tobytes() != a["images"].tobytes()
    train, test = mnistdet._digit_pools()
    seen = {d.tobytes() for pool in train for d in pool}
    assert not any(d.tobytes() in seen for pool in test for d in pool)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["voc", "coco"])
def test_statistics_match_the_preset(preset):
    cfg = mnistdet.make_config(preset, n_train=2000, n_test=1)
    split = mnistdet.generate_split(cfg, "train")
    s = mnistdet.split_statistics(split)
    objects, classes, single = mnistdet.PRESET_TARGETS[preset]
    assert abs(s["objects_per_image"] / objects - 1) <= 0.15
    assert abs(s["classes_per_image"] / classes - 1) <= 0.10
    assert abs(s["single_class_fraction"] - single) <= 0.05
    assert abs(s["class_shares"][0] - mnistdet.class_distribution(1.0)[0]) <= 0.03
    _pairwise_ok(split, cfg.image_size)


def test_dataset_is_cached_and_a_damaged_cache_is_regenerated(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTLAB_CACHE", str(tmp_path))
    d1 = mnist_det(n_train=16, n_test=8)
    files = list(tmp_path.glob("mnist-det-voc-*.npz"))
    assert len(files) == 1
    d2 = mnist_det(n_train=16, n_test=8)
    assert torch.equal(d1.train.images, d2.train.images) and torch.equal(d1.test.targets, d2.test.targets)
    files[0].write_bytes(b"not a zip file")
    d3 = mnist_det(n_train=16, n_test=8)
    assert torch.equal(d1.train.images, d3.train.images)
    assert d1.model_kwargs()["num_classes"] == 10 and len(d1.mean) == 3 and 0 < d1.mean[0] < 255


def test_batches_are_pixel_scale_with_valid_targets(det_small):
    x, t = det_small.train.batch(torch.arange(8))
    assert x.shape == (8, 3, 96, 96) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 255
    check_targets(t, 10)
    assert all(len(b) >= 1 for b, _, _ in unpad(t))


def test_bad_generator_options():
    with pytest.raises(ValueError, match="preset"):
        mnistdet.make_config("kitti")
    with pytest.raises(ValueError, match="n_train"):
        mnistdet.make_config("voc", n_train=0)
    with pytest.raises(ValueError, match="range"):
        mnistdet.make_config("voc", p_same=1.5)


# -- VOC and COCO folders ----------------------------------------------------------------------------
def _jpeg(path, w, h, seed=0):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _voc_xml(w, h, objects):
    objs = "".join(f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin>"
                   f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                   for n, b, d in objects)
    return f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>"


@pytest.fixture
def voc_root(tmp_path):
    base = tmp_path / "VOC2007"
    (base / "ImageSets" / "Main").mkdir(parents=True)
    (base / "Annotations").mkdir()
    ann = {"000001": (_voc_xml(120, 80, [("dog", (11, 21, 60, 70), False), ("person", (70, 5, 110, 75), True)]), 120, 80),
           "000002": (_voc_xml(100, 100, []), 100, 100)}
    for i, (xml, w, h) in ann.items():
        (base / "Annotations" / f"{i}.xml").write_text(xml)
        _jpeg(base / "JPEGImages" / f"{i}.jpg", w, h)
    (base / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    (base / "ImageSets" / "Main" / "test.txt").write_text("000001\n")
    return tmp_path


def test_voc_reader_and_dataset(voc_root):
    recs = read_voc(voc_root, "2007/trainval", keep_difficult=True)
    assert [r.image_id for r in recs] == ["000001", "000002"]
    assert recs[0].boxes[0].tolist() == [10, 20, 59, 69]  # 1-based inclusive -> 0-based
    assert recs[0].labels.tolist() == [11, 14] and recs[0].difficult.tolist() == [False, True]
    assert len(recs[1].boxes) == 0  # an image without objects is valid
    assert len(read_voc(voc_root, "2007/trainval", keep_difficult=False)[0].boxes) == 1
    data = DATASETS.create("voc", root=str(voc_root), train_sets=["2007/trainval"], test_set="2007/test", image_size=64)
    x, t = data.test.batch(torch.tensor([0]))
    assert x.shape == (1, 3, 64, 64)
    boxes, labels, diff = unpad(t)[0]
    assert torch.allclose(boxes[0], torch.tensor([10 / 120, 20 / 80, 59 / 120, 69 / 80]))
    assert diff.tolist() == [False, True]
    xt, tt = data.train.batch(torch.tensor([0, 1]), seeds=[5, 6])
    assert xt.shape == (2, 3, 64, 64) and 0 <= xt.min() and xt.max() <= 255
    check_targets(tt, 20)
    assert data.test.original_size(0) == (120, 80)
    src = FileSource(data.train.records, 64, (0, 0, 0))
    a, b = src.batch(torch.tensor([0, 1, 0]), seeds=[3, 4, 3]), src.batch(torch.tensor([0, 1, 0]), seeds=[3, 4, 9])
    assert torch.equal(a[0][0], a[0][2]) and torch.equal(a[0][:2], b[0][:2])  # an item depends on its own seed only
    assert not torch.equal(a[0][2], b[0][2])


def test_voc_bad_files(voc_root):
    base = voc_root / "VOC2007"
    with pytest.raises(DataError, match="does not exist"):
        read_voc(voc_root, "2012/trainval")
    (base / "ImageSets" / "Main" / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        read_voc(voc_root, "2007/empty")
    (base / "Annotations" / "000002.xml").write_text(_voc_xml(100, 100, [("dog", (50, 10, 20, 40), False)]))
    with pytest.raises(DataError, match="xmax < xmin"):
        read_voc(voc_root, "2007/trainval")
    (base / "Annotations" / "000002.xml").write_text(_voc_xml(100, 100, [("dog", (10, 10, 150, 40), False)]))
    with pytest.raises(DataError, match="outside"):
        read_voc(voc_root, "2007/trainval")
    (base / "Annotations" / "000002.xml").write_text(_voc_xml(100, 100, [("unicorn", (10, 10, 20, 40), False)]))
    with pytest.raises(DataError, match="unknown VOC class"):
        read_voc(voc_root, "2007/trainval")
    (base / "Annotations" / "000002.xml").write_text("")
    with pytest.raises(DataError, match="not valid XML"):
        read_voc(voc_root, "2007/trainval")
    (base / "Annotations" / "000002.xml").unlink()
    with pytest.raises(DataError, match="missing"):
        read_voc(voc_root, "2007/trainval")
    with pytest.raises(ValueError, match="root"):
        DATASETS.create("voc")


@pytest.fixture
def coco_root(tmp_path):
    for split in ("train2017", "val2017"):
        _jpeg(tmp_path / split / "a.jpg", 64, 48)
        _jpeg(tmp_path / split / "b.jpg", 32, 32, seed=1)
        d = {"images": [{"id": 10, "file_name": "a.jpg", "width": 64, "height": 48},
                        {"id": 11, "file_name": "b.jpg", "width": 32, "height": 32}],
             "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "bus"}],
             "annotations": [{"id": 1, "image_id": 10, "category_id": 7, "bbox": [4, 5, 20, 10], "iscrowd": 0},
                             {"id": 2, "image_id": 10, "category_id": 3, "bbox": [30, 5, 20, 30], "iscrowd": 0},
                             {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 64, 48], "iscrowd": 1},
                             {"id": 4, "image_id": 11, "category_id": 7, "bbox": [1, 1, 0.5, 9], "iscrowd": 0}]}
        (tmp_path / "annotations").mkdir(exist_ok=True)
        (tmp_path / "annotations" / f"instances_{split}.json").write_text(json.dumps(d))
    return tmp_path


def test_coco_reader_and_dataset(coco_root):
    recs, names, ids = read_coco(coco_root, "val2017", training=False)
    assert names == ["bus", "cat"] and ids == [3, 7]  # contiguous labels in increasing category-id order
    assert len(recs) == 2 and recs[0].boxes.tolist() == [[4, 5, 24, 15], [30, 5, 50, 35]]
    assert recs[0].labels.tolist() == [1, 0] and len(recs[1].boxes) == 0  # crowd and sub-pixel boxes skipped
    train, _, _ = read_coco(coco_root, "train2017", training=True)
    assert len(train) == 1  # training skips images left without boxes
    data = DATASETS.create("coco", root=str(coco_root), image_size=32)
    assert data.num_classes == 2 and data.info["category_ids"] == [3, 7]
    x, t = data.train.batch(torch.tensor([0]), seeds=[1])
    assert x.shape == (1, 3, 32, 32)
    check_targets(t, 2)


def test_coco_bad_files(coco_root):
    (coco_root / "annotations" / "instances_val2017.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        read_coco(coco_root, "val2017", training=False)
    (coco_root / "annotations" / "instances_val2017.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="annotations"):
        read_coco(coco_root, "val2017", training=False)
    with pytest.raises(DataError, match="does not exist"):
        read_coco(coco_root, "test2017", training=False)


def test_missing_image_file_is_named(coco_root):
    (coco_root / "val2017" / "a.jpg").unlink()
    recs, _, _ = read_coco(coco_root, "val2017", training=False)
    with pytest.raises(DataError, match="a.jpg"):
        FileSource(recs, 32, (0, 0, 0)).batch(torch.tensor([0]))


# -- augmentation -------------------------------------------------------------------------------------
def test_hsv_round_trip():
    img = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(img)), img, atol=1e-3)


def test_ssd_augment_keeps_boxes_valid_and_is_seeded():
    img = torch.rand(3, 60, 90) * 255
    boxes = torch.tensor([[10.0, 5.0, 40.0, 50.0], [50.0, 20.0, 85.0, 58.0]])
    labels, diff = torch.tensor([0, 1]), torch.tensor([False, False])
    for seed in range(30):
        a = ssd_augment(img, boxes, labels, diff, (120, 110, 100), torch.Generator().manual_seed(seed))
        b = ssd_augment(img, boxes, labels, diff, (120, 110, 100), torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        out, ob = a[0], a[1]
        assert 0 <= out.min() and out.max() <= 255 and len(ob) == len(a[2]) >= 1
        assert (ob[:, 2] >= ob[:, 0]).all() and (ob[:, 3] >= ob[:, 1]).all()
        assert ob.min() >= 0 and (ob[:, 2] <= out.shape[2]).all() and (ob[:, 3] <= out.shape[1]).all()


@pytest.mark.parametrize("min_iou", [0.3, 0.7])
def test_random_crop_honours_the_min_iou(min_iou):
    """Unlike the reference sampler (which never rejects), a constrained patch overlaps every box enough."""
    img = torch.zeros(3, 100, 100)
    box = torch.tensor([[10.0, 10.0, 70.0, 70.0]])
    for seed in range(20):
        out, b, _, _ = random_crop(img, box, torch.tensor([0]), torch.tensor([False]),
                                   torch.Generator().manual_seed(seed), modes=(min_iou,))
        inter = float((b[0, 2] - b[0, 0]) * (b[0, 3] - b[0, 1]))  # the box clipped to the patch
        iou = inter / (out.shape[1] * out.shape[2] + 3600.0 - inter)
        assert iou >= min_iou - 1e-6


def test_resize_stays_in_pixel_range():
    """Bilinear resizing is a convex combination, but float rounding overshoots 255 for some sizes (17x23 -> 300
    gives 255.0000153 here; an H200 machine's test images failed the evaluator's [0, 255] check this way)."""
    out, _ = resize(torch.full((3, 17, 23), 255.0), torch.zeros(0, 4), 300)
    assert out.max() <= 255 and out.min() >= 0
