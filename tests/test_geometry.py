"""Tests for resclip_deploy/geometry.py and resclip_deploy/postprocess.py (SPEC §2).

Parity cases come from tests/fixtures/parity (reference outputs of the official code; never edit).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pytest

from resclip_deploy import geometry, postprocess

PARITY = Path(__file__).parent / "fixtures" / "parity"
CASES = json.loads((PARITY / "cases.json").read_text())["cases"]
CASE_BY_NAME = {c["name"]: c for c in CASES}
CASE_NAMES = [c["name"] for c in CASES]


@lru_cache(maxsize=None)
def _npz(name: str, key: str) -> np.ndarray:
    with np.load(PARITY / CASE_BY_NAME[name]["file"], allow_pickle=False) as z:
        return z[key]


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
    # row-major visiting order, per-axis windows as written in SPEC §2
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
    x = geometry.preprocess(rgb, case["short_side"], case["long_side_max"])
    assert x.dtype == np.float32 and x.shape == (3, *case["input_hw"])
    y1, y2, x1, x2 = (int(v) for v in _npz(name, "crop_boxes")[0])
    want = _npz(name, "crop0_input")[0]
    got = geometry.crop_batch(x, np.array([[y1, y2, x1, x2]]))[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# resize_bilinear vs torch

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
    got = geometry.resize_bilinear(x, (out_h, out_w))
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=(out_h, out_w),
                                           mode="bilinear", align_corners=False)[0].numpy()
    assert got.shape == (c, out_h, out_w) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # every channel resized on its own (chunking across the 128-channel limit keeps the order)
    if c > 128:
        np.testing.assert_allclose(got[200 % c], want[200 % c], rtol=0, atol=1e-5)


def test_resize_bilinear_does_not_alias_input():
    x = np.ones((2, 3, 3), dtype=np.float32)
    y = geometry.resize_bilinear(x, (3, 3))
    y[:] = 5
    assert (x == 1).all()


# ---------------------------------------------------------------------------------------------
# merge_windows

def test_merge_windows_two_overlapping_columns():
    boxes = np.array([[0, 3, 0, 3], [0, 3, 2, 5]])
    logits = np.zeros((2, 2, 3, 3), dtype=np.float32)
    logits[0, 0], logits[0, 1] = 1.0, -2.0
    logits[1, 0], logits[1, 1] = 3.0, 4.0
    out = geometry.merge_windows(logits, boxes, (3, 5))
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
    out = geometry.merge_windows(logits, boxes, (4, 4))[0]
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
    out = geometry.merge_windows(logits, boxes, (h, w))
    total = np.zeros((3, h, w))
    count = np.zeros((h, w))
    for lg, (y1, y2, x1, x2) in zip(logits, boxes):
        for yy in range(y1, y2):
            for xx in range(x1, x2):
                total[:, yy, xx] += lg[:, yy - y1, xx - x1]
                count[yy, xx] += 1
    np.testing.assert_allclose(out, total / count, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# postprocess

def test_class_probs_max_over_synonyms():
    q = np.array([[0.1, 0.5], [0.4, 0.2], [0.3, 0.1], [0.2, 0.2]], dtype=np.float32)[:, :, None]
    out = postprocess.class_probs(q, np.array([0, 0, 1, 0]), 2)
    assert out.shape == (2, 2, 1)
    np.testing.assert_array_equal(out[:, :, 0],
                                  np.array([[0.4, 0.5], [0.3, 0.1]], dtype=np.float32))
    assert out.dtype == np.float32
    # query_to_class as the tuple a Vocabulary gives
    out2 = postprocess.class_probs(q, (0, 0, 1, 0), 2)
    np.testing.assert_array_equal(out, out2)


def test_labels_from_probs_first_argmax_and_strict_threshold():
    p = np.array([[0.3, 0.1, 0.2, 0.05],
                  [0.3, 0.1, 0.5, 0.05],
                  [0.4, 0.1, 0.3, 0.05]], dtype=np.float32)[:, None, :]   # (C=3, 1, 4)
    # column 0: 0.3/0.3/0.4 -> 2; column 1: three-way tie -> first (0); column 2 -> 1
    np.testing.assert_array_equal(postprocess.labels_from_probs(p, 0.0)[0], [2, 0, 1, 0])
    # prob_thd = 0.1, strict rule: a max exactly equal to the threshold keeps its (non-zero) label
    q = np.array([[0.05, 0.0], [np.float32(0.1), 0.0999], [0.02, 0.09]], dtype=np.float32)
    q = q[:, :, None]                                            # (3, 2, 1)
    labels = postprocess.labels_from_probs(q, 0.1)
    assert labels.dtype == np.int32 and labels.shape == (2, 1)
    assert labels[0, 0] == 1          # max == prob_thd (float32 0.1): not < thd, kept
    assert labels[1, 0] == 0          # max 0.0999 < 0.1: background
    # float64 input, exact 0.1
    q64 = q.astype(np.float64)
    q64[1, 0, 0] = 0.1
    assert postprocess.labels_from_probs(q64, 0.1)[0, 0] == 1
    # above threshold everywhere -> plain argmax
    np.testing.assert_array_equal(postprocess.labels_from_probs(p, 0.25)[0], [2, 0, 1, 0])


def test_finalize_shapes_and_normalisation():
    rng = np.random.default_rng(4)
    q2c = np.array([0, 0, 1, 2, 2, 2, 3])
    names = ("background", "cat", "dog", "sky")
    logits = rng.uniform(-0.3, 0.3, (len(q2c), 9, 13)).astype(np.float32)
    seg = postprocess.finalize(logits, (20, 31), q2c, names, 40.0, 0.0)
    assert seg.labels.shape == (20, 31) and seg.labels.dtype == np.int32
    assert seg.probs.shape == (4, 20, 31) and seg.probs.dtype == np.float32
    assert seg.class_names == names
    np.testing.assert_allclose(seg.probs.sum(axis=0), 1.0, rtol=0, atol=1e-5)
    assert (seg.probs >= 0).all()
    # independent recomputation
    full = geometry.resize_bilinear(logits, (20, 31)).astype(np.float64) * 40
    e = np.exp(full - full.max(axis=0))
    e /= e.sum(axis=0)
    cp = np.stack([e[q2c == c].max(axis=0) for c in range(4)])
    np.testing.assert_array_equal(seg.labels, cp.argmax(axis=0))
    np.testing.assert_allclose(seg.probs, cp / cp.sum(axis=0), rtol=1e-4, atol=1e-6)


def test_finalize_prob_thd():
    # uniform logits over 4 single-synonym classes -> every class prob 0.25
    logits = np.zeros((4, 3, 3), dtype=np.float32)
    names = ("a", "b", "c", "d")
    seg = postprocess.finalize(logits, (5, 4), np.arange(4), names, 40.0, 0.3)
    assert (seg.labels == 0).all()
    logits[2] = 0.1   # class 2 wins clearly
    seg = postprocess.finalize(logits, (5, 4), np.arange(4), names, 40.0, 0.3)
    assert (seg.labels == 2).all()
    np.testing.assert_allclose(seg.probs.sum(axis=0), 1.0, atol=1e-5)
    # the threshold applies to the synonym-max probabilities BEFORE renormalisation:
    # queries a, b, c (class 0) at 0.24 each, d (class 1) at 0.28 -> class 1 has 0.28 < 0.3
    # and is background, although its renormalised probability is 0.28 / 0.52 = 0.54
    logits = np.zeros((4, 2, 2), dtype=np.float32)
    logits[3] = np.log(7 / 6) / 40
    seg = postprocess.finalize(logits, (2, 3), np.array([0, 0, 0, 1]), ("x", "y"), 40.0, 0.3)
    assert (seg.labels == 0).all()
    np.testing.assert_allclose(seg.probs[1], 0.28 / 0.52, rtol=1e-4)
    seg = postprocess.finalize(logits, (2, 3), np.array([0, 0, 0, 1]), ("x", "y"), 40.0, 0.27)
    assert (seg.labels == 1).all()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_postprocess_matches_fixture_samples(name):
    # probs_at / labels at the sampled pixels follow from logits_at pointwise (SPEC §2, output)
    case = CASE_BY_NAME[name]
    logits_at = _npz(name, "logits_at")                       # (S, Q)
    q2c = _npz(name, "query_idx").astype(np.int64)
    probs = postprocess.class_probs(postprocess.softmax(
        np.float32(case["logit_scale"]) * logits_at.T, axis=0), q2c, case["num_classes"])
    labels = postprocess.labels_from_probs(probs, case["prob_thd"])
    yx = _npz(name, "sample_yx")
    want_labels = _npz(name, "labels")[yx[:, 0], yx[:, 1]]
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose((probs / probs.sum(axis=0)).T, _npz(name, "probs_at"),
                               rtol=0, atol=1e-5)
