"""Readers for users' own PASCAL VOC (XML) and COCO (JSON) copies (cwat.md 8.3, 8.4). Only annotations are
read here; images are decoded per batch. Every malformed file gets an error naming the file and the field."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from robustlab.errors import DataError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


@dataclass
class Record:
    """One annotated image file: boxes in original pixels (corner form), labels 0..K-1, difficult flags."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray
    image_id: Any = None


def _voc_object(obj: ET.Element, xml_path: Path, width: int, height: int):
    name = (obj.findtext("name") or "").strip()
    if name not in VOC_CLASSES:
        raise DataError(f"{xml_path}: unknown VOC class {name!r}")
    bb = obj.find("bndbox")
    if bb is None:
        raise DataError(f"{xml_path}: object {name!r} has no <bndbox>")
    try:
        # 1-based inclusive pixel coordinates -> 0-based continuous corners (the SSD reference subtracts 1)
        x1, y1, x2, y2 = (float(bb.findtext(k) or "") - 1 for k in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, ValueError):
        raise DataError(f"{xml_path}: object {name!r} has a missing or non-numeric box coordinate") from None
    if x2 < x1 or y2 < y1:
        raise DataError(f"{xml_path}: object {name!r} has xmax < xmin or ymax < ymin")
    if x1 < -1 or y1 < -1 or x2 > width or y2 > height:
        raise DataError(f"{xml_path}: object {name!r} box {[x1, y1, x2, y2]} lies outside the {width}x{height} image")
    difficult = (obj.findtext("difficult") or "0").strip() == "1"
    return [max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height)], VOC_CLASSES.index(name), difficult


def read_voc(root: str | Path, image_set: str, keep_difficult: bool = True) -> list[Record]:
    """image_set '2007/trainval' reads root/VOC2007/ImageSets/Main/trainval.txt and the listed annotations."""
    root = Path(root)
    year, _, split = image_set.partition("/")
    base = root / f"VOC{year}"
    ids_file = base / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise DataError(f"VOC image set {ids_file} does not exist (expected ROOT/VOC{year}/ImageSets/Main/{split}.txt)")
    ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"VOC image set {ids_file} is empty")
    records = []
    for image_id in ids:
        xml_path = base / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            raise DataError(f"VOC annotation {xml_path} is missing")
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as e:
            raise DataError(f"VOC annotation {xml_path} is not valid XML: {e}") from None
        try:
            width, height = int(tree.findtext("size/width") or ""), int(tree.findtext("size/height") or "")
        except (TypeError, ValueError):
            raise DataError(f"{xml_path}: missing or bad <size><width>/<height>") from None
        boxes, labels, diffs = [], [], []
        for obj in tree.findall("object"):
            b, lab, d = _voc_object(obj, xml_path, width, height)
            if d and not keep_difficult:
                continue
            boxes.append(b)
            labels.append(lab)
            diffs.append(d)
        img = base / "JPEGImages" / f"{image_id}.jpg"
        records.append(Record(img, width, height, np.asarray(boxes, np.float32).reshape(-1, 4),
                              np.asarray(labels, np.int64), np.asarray(diffs, bool), image_id))
    return records


def read_coco(root: str | Path, split: str, training: bool) -> tuple[list[Record], list[str], list[int]]:
    """Records of root/<split>/ from root/annotations/instances_<split>.json, category names and original ids
    (contiguous labels 0..K-1 in increasing id order). Crowd boxes and boxes under 1 px are skipped; training
    also skips images left without boxes (evaluation keeps every image)."""
    root = Path(root)
    ann_file = root / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise DataError(f"COCO annotation file {ann_file} does not exist")
    try:
        d = json.loads(ann_file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"COCO annotation file {ann_file} is not valid JSON: {e}") from None
    for key in ("images", "annotations", "categories"):
        if key not in d:
            raise DataError(f"COCO annotation file {ann_file} has no {key!r} list")
    cats = sorted(d["categories"], key=lambda c: c["id"])
    if not cats:
        raise DataError(f"COCO annotation file {ann_file} lists no categories")
    ids = [int(c["id"]) for c in cats]
    label_of = {cid: i for i, cid in enumerate(ids)}
    per_image: dict[int, list] = {int(im["id"]): [] for im in d["images"]}
    for a in d["annotations"]:
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        if w < 1 or h < 1:
            continue
        if a["category_id"] not in label_of:
            raise DataError(f"{ann_file}: annotation {a.get('id')} has unknown category_id {a['category_id']}")
        if a["image_id"] not in per_image:
            raise DataError(f"{ann_file}: annotation {a.get('id')} refers to unknown image_id {a['image_id']}")
        per_image[a["image_id"]].append(([x, y, x + w, y + h], label_of[a["category_id"]]))
    records = []
    for im in d["images"]:
        objs = per_image[int(im["id"])]
        if training and not objs:
            continue
        boxes = np.asarray([o[0] for o in objs], np.float32).reshape(-1, 4)
        w, h = int(im["width"]), int(im["height"])
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        records.append(Record(root / split / im["file_name"], w, h, boxes, np.asarray([o[1] for o in objs], np.int64),
                              np.zeros(len(objs), bool), int(im["id"])))
    if not records:
        raise DataError(f"COCO split {split} has no usable images")
    return records, [str(c["name"]) for c in cats], ids
