"""The eight benchmarks in the folder layouts mmsegmentation's data preparation produces.

Each layout is what the authors' configs read (``configs/cfg_<name>.py``): the images and label
folders under the dataset root, the split file (or every image of the folder, sorted, as mmseg
lists them), the suffixes, and whether the label's zero is dropped (reduce_zero_label).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from .errors import UserError
from .io import quiet_imdecode

MMSEG_PREPARE = ("https://github.com/open-mmlab/mmsegmentation/blob/main/docs/en/user_guides/"
                 "2_dataset_prepare.md")


@dataclass(frozen=True)
class DatasetLayout:
    name: str                   # = the preset of the same name
    title: str
    root_example: str           # mmseg's data_root for it
    images: str                 # folders relative to the root
    labels: str
    split: Optional[str]        # image ids, one per line; None: every image under `images`
    image_suffix: str
    label_suffix: str
    reduce_zero_label: bool
    num_classes: int
    prepare: str                # the preparation step that makes the label folder
    paper_miou: Optional[float]  # ResCLIP on NACLIP, ViT-B/16, the paper's table


_VOC_PREP = ("download VOCtrainval_11-May-2012.tar and extract it (SegmentationClass is part "
             "of it; " + MMSEG_PREPARE + ")")
_CONTEXT_PREP = ("extract VOCtrainval_03-May-2010.tar, then run mmseg's "
                 "'python tools/dataset_converters/pascal_context.py data/VOCdevkit "
                 "data/VOCdevkit/VOC2010/trainval_merged.json' (makes SegmentationClassContext "
                 "and ImageSets/SegmentationContext)")
_STUFF_PREP = ("extract val2017.zip and stuffthingmaps_trainval2017.zip, then run mmseg's "
               "'python tools/dataset_converters/coco_stuff164k.py data/coco_stuff164k' "
               "(makes the *_labelTrainIds.png maps)")

LAYOUTS: dict[str, DatasetLayout] = {d.name: d for d in [
    DatasetLayout("voc20", "PASCAL VOC 2012 val, 20 classes (background ignored)",
                  "data/VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass",
                  "ImageSets/Segmentation/val.txt", ".jpg", ".png", True, 20, _VOC_PREP, 86.0),
    DatasetLayout("voc21", "PASCAL VOC 2012 val, 21 classes (with background)",
                  "data/VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass",
                  "ImageSets/Segmentation/val.txt", ".jpg", ".png", False, 21, _VOC_PREP, None),
    DatasetLayout("context59", "PASCAL Context val, 59 classes (background ignored)",
                  "data/VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext",
                  "ImageSets/SegmentationContext/val.txt", ".jpg", ".png", True, 59,
                  _CONTEXT_PREP, 36.8),
    DatasetLayout("context60", "PASCAL Context val, 60 classes (with background)",
                  "data/VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext",
                  "ImageSets/SegmentationContext/val.txt", ".jpg", ".png", False, 60,
                  _CONTEXT_PREP, None),
    DatasetLayout("coco_object", "COCO-Object val2017, 80 things + background",
                  "data/coco_object", "images/val2017", "annotations/val2017", None, ".jpg",
                  "_instanceTrainIds.png", False, 81,
                  "prepare COCO-Stuff164k, then run the authors' 'python "
                  "datasets/cvt_coco_object.py data/coco_stuff164k -o data/coco_object' (makes "
                  "the *_instanceTrainIds.png maps)", None),
    DatasetLayout("coco_stuff164k", "COCO-Stuff164k val2017, 171 classes",
                  "data/coco_stuff164k", "images/val2017", "annotations/val2017", None, ".jpg",
                  "_labelTrainIds.png", False, 171, _STUFF_PREP, 24.7),
    DatasetLayout("city_scapes", "Cityscapes val, 19 classes", "data/cityscapes",
                  "leftImg8bit/val", "gtFine/val", None, "_leftImg8bit.png",
                  "_gtFine_labelTrainIds.png", False, 19,
                  "extract leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, then run "
                  "mmseg's 'python tools/dataset_converters/cityscapes.py data/cityscapes' "
                  "(makes the *_gtFine_labelTrainIds.png maps)", 35.9),
    DatasetLayout("ade20k", "ADE20K val (ADEChallengeData2016), 150 classes",
                  "data/ade/ADEChallengeData2016", "images/validation",
                  "annotations/validation", None, ".jpg", ".png", True, 150,
                  "download ADEChallengeData2016.zip and unzip it", 18.0),
]}


@dataclass(frozen=True)
class Sample:
    id: str                     # path of the image under the images folder, without suffix
    image: str
    label: Optional[str]        # None: the label file is missing


def layout(name: str) -> DatasetLayout:
    if name not in LAYOUTS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def _require(path: str, what: str, d: DatasetLayout, hint: str = "") -> None:
    if not os.path.exists(path):
        raise UserError(
            f"{d.name}: {what} {path} is missing.{hint} --root must be the dataset folder "
            f"mmseg's configs call data_root (e.g. {d.root_example}), holding {d.images}/ and "
            f"{d.labels}/{' and ' + d.split if d.split else ''}. Preparation: {d.prepare}.")


def _root_below(d: DatasetLayout, root: str, depth: int = 3) -> Optional[str]:
    """A folder at most ``depth`` levels below ``root`` that holds the layout's image folder:
    users often pass the download's top folder (data/VOCdevkit for VOCdevkit/VOC2012)."""
    if not os.path.isdir(root):
        return None
    for parent, dirs, _ in os.walk(root):
        rel = os.path.relpath(parent, root)
        if (0 if rel == "." else rel.count(os.sep) + 1) >= depth:
            dirs.clear()
            continue
        dirs.sort()
        if parent != root and os.path.isdir(os.path.join(parent, d.images)):
            return parent
    return None


def _ids_in(folder: str, suffix: str) -> list[str]:
    """Ids of the files ending in ``suffix`` under ``folder``, recursively (cities are
    sub-folders), sorted by path as mmseg sorts its data list."""
    ids = []
    for parent, _, files in os.walk(folder):
        rel = os.path.relpath(parent, folder)
        for f in files:
            if f.endswith(suffix):
                ids.append(os.path.normpath(os.path.join(rel, f[:-len(suffix)])))
    return sorted(ids, key=lambda i: os.path.join(folder, i + suffix))


def _read_split(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def list_samples(d: DatasetLayout, root: str, limit: Optional[int] = None) -> list[Sample]:
    """The evaluation images of ``d`` under ``root`` in mmseg's order (the first ``limit``)."""
    _require(root, "the dataset root", d)
    images, labels = os.path.join(root, d.images), os.path.join(root, d.labels)
    if not os.path.exists(images):
        found = _root_below(d, root)
        _require(images, "the image folder", d,
                 f" Found the layout under {found}: use --root {found}." if found else "")
    _require(labels, "the label folder", d)
    if d.split is not None:
        _require(os.path.join(root, d.split), "the split file", d)
        ids = _read_split(os.path.join(root, d.split))
    else:
        ids = _ids_in(images, d.image_suffix)
    if not ids:
        raise UserError(f"{d.name}: no images ending in {d.image_suffix} under {images}. "
                        f"Preparation: {d.prepare}.")
    samples = []
    for i in ids:
        label = os.path.join(labels, i + d.label_suffix)
        samples.append(Sample(i, os.path.join(images, i + d.image_suffix),
                              label if os.path.isfile(label) else None))
    if all(s.label is None for s in samples):
        # Not a few missing files: the labels were never converted (e.g. Cityscapes' gtFine
        # holds *_labelIds.png until mmseg's script writes *_labelTrainIds.png).
        raise UserError(f"{d.name}: none of the {len(samples)} images has a label map "
                        f"({os.path.join(labels, ids[0] + d.label_suffix)} and the others are "
                        f"missing). Preparation: {d.prepare}.")
    return samples[:limit] if limit is not None else samples


def _png_palette(data: bytes) -> Optional[np.ndarray]:
    """(N, 3) uint8 RGB palette of a palette-colour PNG, None for any other PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 26 or data[25] != 3:   # IHDR type 3
        return None
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"PLTE":
            chunk = data[pos + 8:pos + 8 + length]
            return np.frombuffer(chunk[:len(chunk) // 3 * 3], dtype=np.uint8).reshape(-1, 3)
        pos += 12 + length
    return None


def _rgb_keys(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (r.astype(np.int64) << 16) | (g.astype(np.int64) << 8) | b


def _palette_indices(bgr: np.ndarray, palette: np.ndarray, path: str) -> np.ndarray:
    """OpenCV decodes palette PNGs to colours; map each colour back to its palette index."""
    entries, first, repeats = np.unique(_rgb_keys(*palette.T), return_index=True,
                                        return_counts=True)
    colours, inverse = np.unique(_rgb_keys(bgr[..., 2], bgr[..., 1], bgr[..., 0]),
                                 return_inverse=True)
    pos = np.searchsorted(entries, colours).clip(0, len(entries) - 1)
    if np.any(entries[pos] != colours):
        raise UserError(f"label map {path}: a colour is not in its palette (corrupt file?)")
    if np.any(repeats[pos] > 1):
        raise UserError(f"label map {path}: its palette repeats a colour that is in use, so "
                        "the class indices cannot be recovered; save it as a grayscale PNG")
    return first[pos][inverse].reshape(bgr.shape[:2]).astype(np.uint8)


def read_label_map(path: str) -> np.ndarray:
    """A label PNG -> (H, W) class indices: 8/16-bit grayscale values, or the (uint8) palette
    indices of a palette PNG (what PIL's 'P' mode gives mmseg)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"label map {path}: cannot read it ({e.strerror})") from None
    array = quiet_imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED) \
        if data else None
    if array is None:
        raise UserError(f"label map {path}: not a readable image (corrupt or truncated?)")
    palette = _png_palette(data)
    if palette is not None:
        return _palette_indices(array[..., :3], palette, path)
    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise UserError(f"label map {path}: expected class indices (8/16-bit grayscale or "
                        f"palette PNG), got {array.dtype} with shape {array.shape}; run the "
                        "dataset's preparation step")
    return array
