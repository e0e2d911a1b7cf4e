"""Tests for resclip_deploy/geometry.py and resclip_deploy/postprocess.py (docs/method.md §2).

Parity cases come from tests/fixtures/parity (reference outputs of the official code; never edit).
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import pytest

from conftest import CASES, PARITY, load_case
from resclip_deploy import geometry, postprocess

CASE_BY_NAME = {c["name"]: c for c in CASES}
CASE_NAMES = [c["name"] for c in CASES]


def _npz(name: str, key: str) -> np.ndarray:
    return load_case(CASE_BY_NAME[name])[key]


@lru_cache(maxsize=None)
def _rgb(image: str) -> np.ndarray:
    path = PARITY / image
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, f"cannot read {path}"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _mode(case: dict) -> tuple[str, int, int]:
    m = case["mode"]
    # whole mode has crop/stride null; window_boxes ignores them there
    return m["type"], m["crop"] or 224, m["stride"] or 112


def test_fixture_cases_present():
    assert len(CASES) >= 5
    assert {c["mode"]["type"] for c in CASES} == {"slide", "whole"}


# ---------------------------------------------------------------------------------------------
# keep_ratio_size / window_boxes / preprocess against the fixtures

@pytest.mark.parametrize("name", CASE_NAMES)
def test_keep_ratio_size_matches_fixture(name):
    case = CASE_BY_NAME[name]
    hw = geometry.keep_ratio_size(*case["image_hw"], case["short_side"], case["long_side_max"])
    assert hw == tuple(int(v) for v in _npz(name, "input_hw"))
    assert hw == tuple(case["input_hw"])


@pytest.mark.parametrize("h,w,short,long_max,want", [
    (300, 451, 336, 2048, (336, 505)),
    (512, 512, 336, 2048, (336, 336)),
    (1024, 2048, 560, 2048, (560, 1120)),
    (100, 10000, 336, 2048, (20, 2048)),      # long side cap wins
    (10000, 100, 336, 2048, (2048, 20)),
    (336, 500, 336, 2048, (336, 500)),        # f = 1
    (672, 673, 336, 2048, (336, 337)),        # 336.5 rounds half up (mmcv), not half-even
])
def test_keep_ratio_size_rule(h, w, short, long_max, want):
    assert geometry.keep_ratio_size(h, w, short, long_max) == want


@pytest.mark.parametrize("name", CASE_NAMES)
def test_window_boxes_match_fixture(name):
    case = CASE_BY_NAME[name]
    mode, crop, stride = _mode(case)
    boxes = geometry.window_boxes(*case["input_hw"], mode, crop, stride)
    want = _npz(name, "crop_boxes")
    assert boxes.shape == want.shape == (case["n_crops"], 4)
    np.testing.assert_array_equal(boxes, want)   # order included


def _spec_axis(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    n = max(size - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(n):
        a = i * stride
        b = min(a + crop, size)
        out.append((max(b - crop, 0), b))
    return out


@pytest.mark.parametrize("h,w", [(100, 100), (100, 500), (500, 100), (224, 224), (225, 225),
                                 (223, 400), (16, 16), (1, 1), (336, 505), (113, 224),
                                 (224, 113), (800, 17)])
@pytest.mark.parametrize("crop,stride", [(224, 112), (224, 224), (96, 40)])
def test_window_boxes_cover_image_one_size(h, w, crop, stride):
    boxes = geometry.window_boxes(h, w, "slide", crop, stride)
    assert boxes.ndim == 2 and boxes.shape[1] == 4
    sizes = {(int(y2 - y1), int(x2 - x1)) for y1, y2, x1, x2 in boxes}
    assert sizes == {(min(crop, h), min(crop, w))}
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] <= h).all()
    assert (boxes[:, 2] >= 0).all() and (boxes[:, 3] <= w).all()
    count = np.zeros((h, w), dtype=int)
    for y1, y2, x1, x2 in boxes:
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1
    # row-major visiting order, per-axis windows as docs/method.md §2.2 writes them
    want = [(y1, y2, x1, x2) for y1, y2 in _spec_axis(h, crop, stride)
            for x1, x2 in _spec_axis(w, crop, stride)]
    assert [tuple(int(v) for v in b) for b in boxes] == want


def test_window_boxes_whole():
    np.testing.assert_array_equal(geometry.window_boxes(336, 505, "whole", 224, 112),
                                  [[0, 336, 0, 505]])


@pytest.mark.parametrize("name", CASE_NAMES)
def test_preprocess_matches_fixture_crop0(name):
    case = CASE_BY_NAME[name]
    rgb = _rgb(case["image"])
    assert rgb.shape[:2] == tuple(case["image_hw"])
    x = geometry.preprocess(rgb, case["short_side"], case["long_side_max"],
                            geometry.CLIP_PIXEL_NORM)
    assert x.dtype == np.float32 and x.shape == (3, *case["input_hw"])
    y1, y2, x1, x2 = (int(v) for v in _npz(name, "crop_boxes")[0])
    want = _npz(name, "crop0_input")[0]
    got = geometry.crop_batch(x, np.array([[y1, y2, x1, x2]]))[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# resize_bilinear_hwc vs torch (checked channel-first, as torch lays it out)

def resize_chw(x, out_hw):
    """(C, h, w) -> (C, H, W) through the package's channel-last resize."""
    out = geometry.resize_bilinear_hwc(x.transpose(1, 2, 0), out_hw)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


# Values in [-1, 1] like the cosine logits this function resizes: torch's own float32 source
# coordinates are off by ~1e-6 relative for non-dyadic ratios, so wider data would test torch.
@pytest.mark.parametrize("c,h,w,out_h,out_w", [
    (3, 14, 14, 224, 224),      # up, square
    (5, 14, 21, 224, 336),      # up, non-square
    (300, 21, 31, 336, 505),    # up, > 128 channels, non-multiple
    (300, 40, 30, 17, 9),       # down, > 128 channels
    (7, 224, 336, 14, 21),      # down, non-square
    (129, 3, 4, 5, 6),          # 128 + 1 channels
    (256, 6, 9, 12, 4),         # exactly 2 chunks, mixed up/down
    (1, 4, 4, 8, 8),
    (2, 3, 50, 7, 20),
    (4, 9, 9, 9, 9),            # identity
])
def test_resize_bilinear_matches_torch(c, h, w, out_h, out_w):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(c * 7 + h * 3 + w)
    x = rng.uniform(-1, 1, (c, h, w)).astype(np.float32)
    got = resize_chw(x, (out_h, out_w))
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=(out_h, out_w),
                                           mode="bilinear", align_corners=False)[0].numpy()
    assert got.shape == (c, out_h, out_w) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # every channel resized on its own (chunking across the 128-channel limit keeps the order)
    if c > 128:
        np.testing.assert_allclose(got[200 % c], want[200 % c], rtol=0, atol=1e-5)


def test_resize_bilinear_does_not_alias_input():
    x = np.ones((2, 3, 3), dtype=np.float32)
    y = resize_chw(x, (3, 3))
    y[:] = 5
    assert (x == 1).all()


# ---------------------------------------------------------------------------------------------
# merge_windows: (K, gh, gw, Q) grids, each resized to its box, averaged -> (H, W, Q)

def merge_chw(logits, boxes, out_hw):
    """Channel-first helper: (K, Q, h, w) window logits at box size -> (Q, H, W)."""
    return geometry.merge_windows(logits.transpose(0, 2, 3, 1), boxes, out_hw).transpose(2, 0, 1)


def test_merge_windows_two_overlapping_columns():
    boxes = np.array([[0, 3, 0, 3], [0, 3, 2, 5]])
    logits = np.zeros((2, 2, 3, 3), dtype=np.float32)
    logits[0, 0], logits[0, 1] = 1.0, -2.0
    logits[1, 0], logits[1, 1] = 3.0, 4.0
    out = merge_chw(logits, boxes, (3, 5))
    want0 = np.array([[1, 1, 2, 3, 3]] * 3, dtype=np.float32)
    want1 = np.array([[-2, -2, 1, 4, 4]] * 3, dtype=np.float32)
    assert out.shape == (2, 3, 5)
    np.testing.assert_allclose(out[0], want0)
    np.testing.assert_allclose(out[1], want1)


def test_merge_windows_grid_of_four():
    # 2x2 windows of 3x3 over a 4x4 image: the centre 2x2 is seen by all four windows
    boxes = np.array([[0, 3, 0, 3], [0, 3, 1, 4], [1, 4, 0, 3], [1, 4, 1, 4]])
    vals = np.array([1.0, 2.0, 4.0, 8.0], dtype=np.float32)
    logits = np.broadcast_to(vals[:, None, None, None], (4, 1, 3, 3)).copy()
    out = merge_chw(logits, boxes, (4, 4))[0]
    want = np.array([[1, 1.5, 1.5, 2],
                     [2.5, 3.75, 3.75, 5],
                     [2.5, 3.75, 3.75, 5],
                     [4, 6, 6, 8]], dtype=np.float32)
    np.testing.assert_allclose(out, want, rtol=1e-6)


def test_merge_windows_with_pixel_varying_logits():
    rng = np.random.default_rng(0)
    h, w, crop, stride = 7, 11, 5, 3
    boxes = geometry.window_boxes(h, w, "slide", crop, stride)
    logits = rng.standard_normal((len(boxes), 3, crop, crop)).astype(np.float32)
    out = merge_chw(logits, boxes, (h, w))
    total = np.zeros((3, h, w))
    count = np.zeros((h, w))
    for lg, (y1, y2, x1, x2) in zip(logits, boxes):
        for yy in range(y1, y2):
            for xx in range(x1, x2):
                total[:, yy, xx] += lg[:, yy - y1, xx - x1]
                count[yy, xx] += 1
    np.testing.assert_allclose(out, total / count, rtol=1e-5, atol=1e-6)


def test_merge_windows_resizes_each_grid_to_its_box():
    rng = np.random.default_rng(1)
    grids = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    out = geometry.merge_windows(grids, np.array([[0, 8, 0, 12]]), (8, 12))
    np.testing.assert_allclose(out, geometry.resize_bilinear_hwc(grids[0], (8, 12)), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# postprocess.finalize: (H, W, Q) logits -> labels, probs at the original size

def reference_output(logits_chw, out_hw, q2c, num_classes, prob_thd):
    """docs/method.md §2's output steps in float64, channel-first."""
    full = resize_chw(logits_chw, out_hw).astype(np.float64) * 40
    e = np.exp(full - full.max(axis=0))
    e /= e.sum(axis=0)
    cp = np.stack([e[q2c == c].max(axis=0) for c in range(num_classes)])
    labels = cp.argmax(axis=0)
    labels[cp.max(axis=0) < prob_thd] = 0
    return labels, cp / cp.sum(axis=0)


def finalize_chw(logits, out_hw, q2c, names, prob_thd, **kw):
    return postprocess.finalize(logits.transpose(1, 2, 0), out_hw, q2c, names, 40.0, prob_thd,
                                **kw)


@pytest.mark.parametrize("budget", [postprocess.OUTPUT_BUDGET_BYTES, 20 * 31 * 4 * 2 * 2])
def test_finalize_shapes_normalisation_and_chunking(budget):
    rng = np.random.default_rng(4)
    q2c = np.array([0, 0, 1, 2, 2, 2, 3])
    names = ("background", "cat", "dog", "sky")
    logits = rng.uniform(-0.3, 0.3, (len(q2c), 9, 13)).astype(np.float32)
    seg = finalize_chw(logits, (20, 31), q2c, names, 0.0, budget=budget)
    assert seg.labels.shape == (20, 31) and seg.labels.dtype == np.int32
    assert seg.probs.shape == (4, 20, 31) and seg.probs.dtype == np.float32
    assert seg.class_names == names
    np.testing.assert_allclose(seg.probs.sum(axis=0), 1.0, rtol=0, atol=1e-5)
    labels, probs = reference_output(logits, (20, 31), q2c, 4, 0.0)
    np.testing.assert_array_equal(seg.labels, labels)
    np.testing.assert_allclose(seg.probs, probs, rtol=1e-4, atol=1e-6)
    labels_only = finalize_chw(logits, (20, 31), q2c, names, 0.0, with_probs=False, budget=budget)
    assert labels_only.probs is None
    np.testing.assert_array_equal(labels_only.labels, labels)


def test_query_chunks_follow_class_boundaries():
    starts = np.array([0, 2, 3, 6])
    assert postprocess.query_chunks(starts, 7, 100) == [(0, 7)]
    assert postprocess.query_chunks(starts, 7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert postprocess.query_chunks(starts, 7, 1) == [(0, 2), (2, 3), (3, 6), (6, 7)]


def test_finalize_prob_thd():
    # uniform logits over 4 single-synonym classes -> every class prob 0.25
    logits = np.zeros((4, 3, 3), dtype=np.float32)
    names = ("a", "b", "c", "d")
    seg = finalize_chw(logits, (5, 4), np.arange(4), names, 0.3)
    assert (seg.labels == 0).all()
    logits[2] = 0.1   # class 2 wins clearly
    seg = finalize_chw(logits, (5, 4), np.arange(4), names, 0.3)
    assert (seg.labels == 2).all()
    np.testing.assert_allclose(seg.probs.sum(axis=0), 1.0, atol=1e-5)
    # the threshold applies to the synonym-max probabilities BEFORE renormalisation:
    # queries a, b, c (class 0) at 0.24 each, d (class 1) at 0.28 -> class 1 has 0.28 < 0.3
    # and is background, although its renormalised probability is 0.28 / 0.52 = 0.54
    logits = np.zeros((4, 2, 2), dtype=np.float32)
    logits[3] = np.log(7 / 6) / 40
    for with_probs in (True, False):
        seg = finalize_chw(logits, (2, 3), np.array([0, 0, 0, 1]), ("x", "y"), 0.3,
                           with_probs=with_probs)
        assert (seg.labels == 0).all()
    np.testing.assert_allclose(
        finalize_chw(logits, (2, 3), np.array([0, 0, 0, 1]), ("x", "y"), 0.3).probs[1],
        0.28 / 0.52, rtol=1e-4)
    seg = finalize_chw(logits, (2, 3), np.array([0, 0, 0, 1]), ("x", "y"), 0.27)
    assert (seg.labels == 1).all()


def test_finalize_first_argmax_on_ties():
    logits = np.zeros((3, 2, 2), dtype=np.float32)
    logits[1] = logits[2] = 0.5
    for with_probs in (True, False):
        seg = finalize_chw(logits, (2, 2), np.arange(3), ("a", "b", "c"), 0.0,
                           with_probs=with_probs)
        assert (seg.labels == 1).all()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_postprocess_matches_fixture_samples(name):
    # probs_at / labels at the sampled pixels follow from logits_at pointwise (docs/method.md §2.6)
    case = CASE_BY_NAME[name]
    logits_at = _npz(name, "logits_at")                       # (S, Q)
    q2c = _npz(name, "query_idx").astype(np.int64)
    names = tuple(str(i) for i in range(case["num_classes"]))
    seg = postprocess.finalize(logits_at[None], (1, len(logits_at)), q2c, names,
                               case["logit_scale"], case["prob_thd"])
    yx = _npz(name, "sample_yx")
    want_labels = _npz(name, "labels")[yx[:, 0], yx[:, 1]]
    np.testing.assert_array_equal(seg.labels[0], want_labels)
    np.testing.assert_allclose(seg.probs[:, 0].T, _npz(name, "probs_at"), rtol=0, atol=1e-5)
