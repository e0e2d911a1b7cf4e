"""Segmentation metrics with mmsegmentation's IoUMetric definitions (numpy only).

Per image, pixels whose ground truth is the ignore index (255) are dropped; the rest add to
per-class intersection, prediction and label areas (values outside 0..C-1 count in no class,
like mmseg's ``histc``). Over a dataset the areas are summed, then IoU = I / (P + L − I),
Acc = I / L per class; mIoU and mAcc are means over classes with a defined value (NaN where the
denominator is 0, i.e. the class is in neither the labels nor the predictions); aAcc = ΣI / ΣL.
mmseg sums float32 areas; ours are exact int64 counts (the two differ by ~1e-7 relative).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 (background / "other") -> ignore, every other class − 1.

    The same steps as mmseg on an unsigned array (8- or 16-bit), so 255 stays ignored.
    """
    if label.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"label maps are 8- or 16-bit unsigned, not {label.dtype}")
    out = label.copy()
    out[out == 0] = 255
    out -= 1
    out[out == 254] = 255
    return out


def _counts(values: np.ndarray, num_classes: int) -> np.ndarray:
    values = values[values < num_classes]
    return np.bincount(values.astype(np.int64), minlength=num_classes)


def areas(pred: np.ndarray, label: np.ndarray, num_classes: int,
          ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) predicted classes, (H, W) ground truth -> (3, C) int64 intersection, prediction and
    label areas over the pixels whose label is not ``ignore_index``."""
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
    keep = label != ignore_index
    p, t = pred[keep], label[keep]
    return np.stack([_counts(t[p == t], num_classes), _counts(p, num_classes),
                     _counts(t, num_classes)])


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


@dataclass
class IoUAccumulator:
    """Sums per-image areas; :meth:`summary` gives the dataset's metrics."""

    num_classes: int
    ignore_index: int = IGNORE_INDEX
    totals: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.totals = np.zeros((3, self.num_classes), dtype=np.int64)

    def add(self, pred: np.ndarray, label: np.ndarray) -> None:
        self.add_areas(areas(pred, label, self.num_classes, self.ignore_index))

    def add_areas(self, counts: np.ndarray) -> None:
        """One image's (3, C) areas from :func:`areas`."""
        self.totals += counts

    def summary(self, class_names: list[str]) -> dict:
        """Percentages: aAcc, mIoU, mAcc and per-class IoU / Acc (None where undefined)."""
        return summarize(self.totals, class_names)


def summarize(totals: np.ndarray, class_names: list[str]) -> dict:
    """(3, C) summed intersection / prediction / label areas -> metrics in percent."""
    intersect, pred_area, label_area = totals
    iou = _ratio(intersect, pred_area + label_area - intersect)
    acc = _ratio(intersect, label_area)

    def mean(x: np.ndarray) -> float | None:
        return None if np.isnan(x).all() else float(100 * np.nanmean(x))

    def pct(x: float) -> float | None:
        return None if np.isnan(x) else float(100 * x)

    labelled = int(label_area.sum())
    return {
        "aAcc": float(100 * intersect.sum() / labelled) if labelled else None,
        "mIoU": mean(iou),
        "mAcc": mean(acc),
        "per_class": [{"class": name, "IoU": pct(i), "Acc": pct(a), "pixels": int(n)}
                      for name, i, a, n in zip(class_names, iou, acc, label_area)],
        "labelled_pixels": labelled,
    }
