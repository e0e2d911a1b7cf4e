"""Visualise a label map: class colours blended over the photo, boundaries, and a legend panel.

numpy + OpenCV only (no torch). Images are RGB uint8 (H, W, 3); label maps are (H, W) integer class
indices into ``class_names``. The legend is attached to the right of the photo rather than drawn
over it, so every photo pixel stays visible.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from .errors import UserError

_FONT = cv2.FONT_HERSHEY_SIMPLEX
# Legend colours: light background, dark text. Both are greys, and anti-aliased text only mixes
# the two, so the legend's only saturated pixels are the class swatches.
_LEGEND_BG = (255, 255, 255)
_LEGEND_TEXT = (20, 20, 20)
# Row height ~ 1/30 of the image height keeps the legend legible when a 4000 px image is shown
# scaled to a screen; the floor keeps it legible on 200 px images (where that allows ~10 rows).
_ROW_FRACTION = 1 / 30
_MIN_ROW_PX = 18
# Cap height of the text within its row.
_TEXT_FRACTION = 0.6
# Longest row text, in row heights (~25 characters); longer names are truncated.
_MAX_TEXT_ROWS = 14
_ELLIPSIS = "..."  # Hershey fonts have no "…" glyph.
_VOC_COLOURS = 256


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours, all distinct, the same on every call.

    The first 256 are the PASCAL VOC palette (class 0 black), which users of segmentation tools
    recognise. Beyond that, hues step by the golden ratio with cycling saturation/value (well
    spread, though thousands of colours cannot all be far apart), skipping repeats. Prefix-stable:
    ``palette(n)[:m] == palette(m)`` for m <= n, so a class keeps its colour as vocabularies grow.
    """
    if num_classes < 0:
        raise UserError(f"palette: num_classes must be >= 0, got {num_classes}")
    voc = _voc_palette(min(num_classes, _VOC_COLOURS))
    if num_classes <= _VOC_COLOURS:
        return voc
    return np.concatenate([voc, _extra_colours(num_classes - _VOC_COLOURS)])


def _voc_palette(n: int) -> np.ndarray:
    """(n, 3) uint8: the VOC bit-interleaving palette, n <= 256."""
    idx = np.arange(n)
    out = np.zeros((n, 3), dtype=np.int64)
    # Bit 3j + c of the index becomes bit 7 - j of channel c: low bits vary the brightest bit,
    # so neighbouring indices differ strongly.
    for j in range(8):
        for c in range(3):
            out[:, c] |= ((idx >> (3 * j + c)) & 1) << (7 - j)
    return out.astype(np.uint8)


def _extra_colours(n: int) -> np.ndarray:
    """(n, 3) uint8: the first n golden-walk colours that repeat neither the VOC palette nor
    themselves. Candidates are taken in walk order, so the result only ever grows at the end."""
    taken = set(_pack(_voc_palette(_VOC_COLOURS)).tolist())
    budget = 2 * n + 64
    while True:
        cand = _golden_palette(_VOC_COLOURS, _VOC_COLOURS + budget)
        keys = _pack(cand)
        _, first = np.unique(keys, return_index=True)
        first = np.sort(first)  # first occurrence of each colour, in walk order
        first = first[[k not in taken for k in keys[first].tolist()]]
        if len(first) >= n:
            return cand[first[:n]]
        budget *= 2  # more repeats than expected: walk further (same prefix, so still stable)


def _pack(rgb: np.ndarray) -> np.ndarray:
    return (rgb[:, 0].astype(np.int64) << 16) | (rgb[:, 1].astype(np.int64) << 8) | rgb[:, 2]


def _golden_palette(start: int, stop: int) -> np.ndarray:
    """(stop - start, 3) uint8 RGB for indices start..stop-1 from an HSV golden-ratio walk."""
    i = np.arange(start, stop, dtype=np.float64)
    h = np.mod(i * 0.6180339887498949, 1.0) * 6.0
    # Cycle lengths 3 and 4 are co-prime, so (s, v) pairs repeat only every 12 indices.
    s = np.array([0.95, 0.75, 0.55])[np.arange(start, stop) % 3]
    v = np.array([0.95, 0.80, 0.65, 0.50])[np.arange(start, stop) % 4]
    sector = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros((len(i), 3))
    for k, (r, g, b) in enumerate(choices):
        sel = sector == k
        rgb[sel] = np.stack([r[sel], g[sel], b[sel]], axis=1)
    return np.rint(rgb * 255).astype(np.uint8)


def class_fractions(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Pixel share of each class present in ``labels`` (H, W) int, as {class: fraction}.

    Only classes with at least one pixel appear, in ascending class order; the values sum to 1.
    Raises UserError for an empty map or labels outside [0, num_classes).
    """
    flat = np.asarray(labels).ravel()
    if flat.size == 0:
        raise UserError("class_fractions: the label map is empty")
    _check_label_range(flat, num_classes)
    counts = np.bincount(flat.astype(np.intp, copy=False), minlength=num_classes)
    present = np.flatnonzero(counts)
    return {int(c): float(counts[c] / flat.size) for c in present}


def _check_label_range(labels: np.ndarray, num_classes: int) -> None:
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"labels must be integer class indices, got dtype {labels.dtype}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise UserError(f"labels range [{lo}, {hi}] is outside [0, {num_classes}) "
                        f"(one class name per index is needed)")


def overlay(rgb: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
            alpha: float = 0.5) -> np.ndarray:
    """Photo blended with class colours, boundaries darkened, legend panel on the right.

    rgb: (H, W, 3) uint8; labels: (H, W) int in [0, len(class_names)); alpha: colour weight in
    [0, 1]. Returns (H, W + legend_width, 3) uint8 RGB. Away from boundaries the left part is
    ``(1 - alpha) * rgb + alpha * palette[label]``, rounded. The legend lists only classes present,
    largest pixel share first, as "name  12.3%"; when they do not all fit the height, the last row
    reads "+N more".
    """
    rgb, labels = _check_inputs(rgb, labels, class_names, alpha)
    colours = palette(len(class_names))
    photo = colourise(rgb, labels, colours, alpha)
    fractions = class_fractions(labels, len(class_names))
    panel = legend_panel(rgb.shape[0], fractions, class_names, colours)
    return np.ascontiguousarray(np.concatenate([photo, panel], axis=1))


def colourise(rgb: np.ndarray, labels: np.ndarray, colours: np.ndarray,
              alpha: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB: the photo blended with class colours and class boundaries drawn,
    same size (what video frames get; :func:`overlay` adds the legend)."""
    photo = blend(rgb, labels, colours, alpha)
    mask = boundary_mask(labels)
    # The darkened class colour (not the photo) so lines stay visible on any background.
    photo[mask] = colours[labels[mask]] // 2
    return photo


def _check_inputs(rgb, labels, class_names, alpha):
    rgb = np.asarray(rgb)
    labels = np.asarray(labels)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise UserError(f"overlay: rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if labels.shape != rgb.shape[:2]:
        raise UserError(f"overlay: labels shape {labels.shape} != image shape {rgb.shape[:2]}")
    if labels.size == 0:
        raise UserError("overlay: the image is empty")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"overlay: alpha must be in [0, 1], got {alpha}")
    _check_label_range(labels, len(class_names))
    return rgb, labels


def blend(rgb: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    """(H, W, 3) uint8: ``(1 - alpha) * rgb + alpha * colours[labels]``, rounded and saturated."""
    # addWeighted works in place on uint8, avoiding float copies of a multi-megapixel image.
    # np.take: the same gather as colours[labels], ~3x faster on a video frame
    return cv2.addWeighted(rgb, 1.0 - alpha, np.take(colours, labels, axis=0), alpha, 0.0)


def boundary_mask(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels whose label differs from a 4-neighbour (both sides of each edge).

    Lines are widened on large images (about 1 px per 1500 px of the longer side) so they stay
    visible when the image is shown scaled down.
    """
    mask = np.zeros(labels.shape, dtype=bool)
    dy = labels[1:, :] != labels[:-1, :]
    dx = labels[:, 1:] != labels[:, :-1]
    mask[1:, :] |= dy
    mask[:-1, :] |= dy
    mask[:, 1:] |= dx
    mask[:, :-1] |= dx
    k = max(1, round(max(labels.shape) / 1500))
    if k > 1:
        mask = cv2.dilate(mask.view(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
    return mask


def legend_layout(height: int) -> tuple[int, int, int]:
    """(row_height, pad, max_rows) of a legend for an image ``height`` px tall.

    pad is the top/bottom margin; pad + max_rows * row_height <= height always holds (a tiny
    image gets one squashed row rather than an overflowing one).
    """
    row = max(_MIN_ROW_PX, round(height * _ROW_FRACTION))
    row = max(1, min(row, height))
    pad = row // 4
    if row + 2 * pad > height:
        pad = 0
    return row, pad, max(1, (height - 2 * pad) // row)


def legend_entries(fractions: dict[int, float], max_rows: int) -> tuple[list[int], int]:
    """(classes shown, largest share first; number hidden behind a "+N more" row).

    Ties are broken by class index so the order is deterministic. When everything does not fit,
    one row is given up for the "+N more" line.
    """
    order = sorted(fractions, key=lambda c: (-fractions[c], c))
    if len(order) <= max_rows:
        return order, 0
    shown = order[:max_rows - 1]
    return shown, len(order) - len(shown)


def ascii_label(name: str) -> str:
    """Hershey fonts draw printable ASCII only: anything else becomes '?'."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in str(name))


def format_percent(fraction: float) -> str:
    """"12.3%"; a present class too small to round above zero shows "<0.1%" rather than 0.0%."""
    pct = 100.0 * fraction
    return "<0.1%" if 0 < pct < 0.05 else f"{pct:.1f}%"


def fit_text(name: str, suffix: str, max_width: int, scale: float, thickness: int) -> str:
    """``name + suffix``, with the name cut and "..." appended until it is <= max_width px wide.

    The suffix (the percentage) is always kept whole: it is the part the reader needs.
    """
    def width(s: str) -> int:
        return cv2.getTextSize(s, _FONT, scale, thickness)[0][0]

    text = name + suffix
    if width(text) <= max_width:
        return text
    lo, hi = 0, len(name)  # binary search the longest prefix that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if width(name[:mid] + _ELLIPSIS + suffix) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return name[:lo] + _ELLIPSIS + suffix


def legend_panel(height: int, fractions: dict[int, float], class_names: Sequence[str],
                 colours: np.ndarray) -> np.ndarray:
    """(height, legend_width, 3) uint8 RGB panel: one swatch + "name  12.3%" row per class."""
    row, pad, max_rows = legend_layout(height)
    shown, hidden = legend_entries(fractions, max_rows)
    thickness = max(1, round(row / 24))
    scale = cv2.getFontScaleFromHeight(_FONT, max(1, round(row * _TEXT_FRACTION)), thickness)
    margin = max(1, row // 6)  # swatch inset within its row
    swatch = max(1, row - 2 * margin)
    left = max(1, row // 4)
    gap = max(1, row // 3)
    max_text = _MAX_TEXT_ROWS * row

    texts = [fit_text(ascii_label(class_names[c]), "  " + format_percent(fractions[c]),
                      max_text, scale, thickness) for c in shown]
    if hidden:
        texts.append(f"+{hidden} more")
    text_w = max(cv2.getTextSize(t, _FONT, scale, thickness)[0][0] for t in texts)
    width = left + swatch + gap + text_w + left

    panel = np.empty((height, width, 3), dtype=np.uint8)
    panel[:] = _LEGEND_BG
    for i, text in enumerate(texts):
        top = pad + i * row
        if i < len(shown):
            y0 = top + margin
            panel[y0:y0 + swatch, left:left + swatch] = colours[shown[i]]
        (_, text_h), _ = cv2.getTextSize(text, _FONT, scale, thickness)
        baseline_y = top + (row + text_h) // 2  # centre the cap height in the row
        cv2.putText(panel, text, (left + swatch + gap, baseline_y), _FONT, scale, _LEGEND_TEXT,
                    thickness, cv2.LINE_AA)
    return panel
