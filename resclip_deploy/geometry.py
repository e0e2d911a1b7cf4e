"""Image geometry shared by the torch reference and the ONNX runtime: resize, windows, merge.

numpy + OpenCV only (no torch). Arrays are channel-first float32 unless stated.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .errors import UserError


@dataclass(frozen=True)
class PixelNorm:
    """Per-channel RGB normalisation in 0..255 units: (x − mean) / std (docs/method.md §2.1)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# OpenAI CLIP's normalisation as the authors' configs write it: open_clip's mean and std × 255,
# rounded to three decimals. Bundles record the model's own (manifest ``preprocess``).
CLIP_PIXEL_NORM = PixelNorm((122.771, 116.746, 104.094), (68.501, 66.632, 70.323))

# cv2.resize takes at most 128 channels per call in OpenCV 5 (512 in 4.x).
_CV_MAX_CHANNELS = 128


def keep_ratio_size(h: int, w: int, short_side: int, long_side_max: int) -> tuple[int, int]:
    """Network input size (H, W): f = min(long_max/long, short/short), int(x·f + 0.5) (mmcv)."""
    f = min(long_side_max / max(h, w), short_side / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def resize_input(rgb: np.ndarray, short_side: int, long_side_max: int) -> np.ndarray:
    """RGB uint8 (H0, W0, 3) -> the network input size (H, W, 3) uint8, keeping the aspect, with
    bilinear interpolation on the uint8 image as the reference does."""
    h, w = keep_ratio_size(rgb.shape[0], rgb.shape[1], short_side, long_side_max)
    return cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)


def normalise(resized: np.ndarray, norm: PixelNorm) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 (x − mean) / std."""
    mean, std = np.float32(norm.mean), np.float32(norm.std)
    x = (resized.astype(np.float32) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess(rgb: np.ndarray, short_side: int, long_side_max: int,
               norm: PixelNorm) -> np.ndarray:
    """RGB uint8 (H0, W0, 3) -> normalised network input (3, H, W) float32."""
    return normalise(resize_input(rgb, short_side, long_side_max), norm)


def window_boxes(h: int, w: int, mode: str, crop: int, stride: int) -> np.ndarray:
    """(K, 4) int boxes (y1, y2, x1, x2) in visiting order (row-major).

    Slide: n = max(size - crop + stride - 1, 0) // stride + 1 per axis; the last window is pushed
    back inside the image. Windows are min(crop, size) wide, so all have one shape. Whole: one box.
    """
    if mode == "whole":
        return np.array([[0, h, 0, w]], dtype=np.int64)
    ys = _axis_windows(h, crop, stride)
    xs = _axis_windows(w, crop, stride)
    return np.array([(y1, y2, x1, x2) for y1, y2 in ys for x1, x2 in xs], dtype=np.int64)


def _axis_windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    n = max(size - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(n):
        end = min(i * stride + crop, size)
        out.append((max(end - crop, 0), end))
    return out


def crop_batch(x: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(3, H, W) input, (K, 4) boxes -> (K, 3, h, w) crops (all boxes have one size)."""
    return np.stack([x[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])


def resize_bilinear_hwc(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(h, w, C) float32 -> (H, W, C) bilinear, half-pixel centres (torch align_corners=False).

    OpenCV, at most 128 channels per call.
    """
    out_h, out_w = out_hw
    c = x.shape[2]
    out = np.empty((out_h, out_w, c), dtype=np.float32)
    for c0 in range(0, c, _CV_MAX_CHANNELS):
        part = np.ascontiguousarray(x[:, :, c0:c0 + _CV_MAX_CHANNELS], dtype=np.float32)
        r = cv2.resize(part, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
        out[:, :, c0:c0 + part.shape[2]] = r.reshape(out_h, out_w, -1)
    return out


def merge_windows(grids: np.ndarray, boxes: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """(K, gh, gw, Q) per-window patch logits -> (H, W, Q) per-pixel mean over windows.

    Each window's grid is first resized bilinearly to its own box size (docs/method.md §2.5).
    """
    canvas = np.zeros((*out_hw, grids.shape[3]), dtype=np.float32)
    count = np.zeros(out_hw, dtype=np.float32)
    for grid, (y1, y2, x1, x2) in zip(grids, boxes):
        canvas[y1:y2, x1:x2] += resize_bilinear_hwc(grid, (int(y2 - y1), int(x2 - x1)))
        count[y1:y2, x1:x2] += 1
    assert count.min() > 0, "windows must cover the image"
    if count.max() > 1:             # whole mode: one window, nothing to average
        canvas /= count[:, :, None]
    return canvas


def check_input_size(hw: tuple[int, int], patch: int) -> None:
    """The network input must hold at least one patch per side."""
    if min(hw) < patch:
        raise UserError(f"the image is {hw[0]}x{hw[1]} pixels after the keep-ratio resize, "
                        f"thinner than one {patch}x{patch} patch; crop it to a less extreme "
                        "aspect ratio or raise the short side")


def interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of a 1-D bilinear resize, OpenCV's own (an identity resized
    by :func:`resize_bilinear_hwc`): resizing is then a matrix product."""
    eye = np.eye(n_in, dtype=np.float32)[:, None, :]                 # height n_in, width 1
    return resize_bilinear_hwc(eye, (n_out, 1))[:, 0, :]


def _axis_merge(spans: np.ndarray, size: int, grid: int, out: int) -> np.ndarray:
    """One axis of :func:`merge_matrices`: (out, windows, grid)."""
    weights = interp_matrix(grid, int(spans[0, 1] - spans[0, 0]))
    m = np.zeros((size, len(spans), grid), dtype=np.float32)
    for i, (start, end) in enumerate(spans):
        m[start:end, i] = weights
    count = np.zeros(size, dtype=np.float32)
    for start, end in spans:
        count[start:end] += 1
    if count.max() > 1:
        m /= count[:, None, None]
    if out != size:
        m = (interp_matrix(size, out) @ m.reshape(size, -1)).reshape(out, len(spans), grid)
    return m


def merge_matrices(boxes: np.ndarray, input_hw: tuple[int, int], out_hw: tuple[int, int],
                   grid_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The window merge and the output resize as two matrices (the output graph's inputs).

    :func:`merge_windows` then the bilinear resize to ``out_hw`` are linear and separable, and
    the window count at a pixel is (windows over its row) x (windows over its column), so
    out_q = rows · G_q · colsᵀ with G_q the (ny·gh, nx·gw) tiling of the window grids of query q.
    Returns rows (H0, ny, gh) and cols (W0, nx, gw) float32; boxes row-major as
    :func:`window_boxes` makes them.
    """
    ys = np.unique(boxes[:, 0:2], axis=0)
    xs = np.unique(boxes[:, 2:4], axis=0)
    assert len(ys) * len(xs) == len(boxes), "boxes must form a grid"
    return (_axis_merge(ys, input_hw[0], grid_hw[0], out_hw[0]),
            _axis_merge(xs, input_hw[1], grid_hw[1], out_hw[1]))
