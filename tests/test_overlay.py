import subprocess
import sys

import numpy as np
import pytest

from resclip_deploy.errors import UserError
from resclip_deploy.overlay import (class_fractions, legend_entries, legend_layout, overlay,
                                    palette)

# VOC colours of classes 1, 2, 3, 4, 5: saturated, so anti-aliased grey legend text never
# produces them by accident.
RED, GREEN, OLIVE, NAVY, PURPLE = 1, 2, 3, 4, 5


def _legend(out, width):
    return out[:, width:]


def _rows_with(region, colour):
    """Row indices of region (H, W, 3) containing the exact colour."""
    return np.flatnonzero(np.all(region == np.asarray(colour, np.uint8), axis=-1).any(axis=1))


# --- palette ---------------------------------------------------------------------------------

def test_palette_shape_dtype_voc_and_distinct():
    p = palette(256)
    assert p.shape == (256, 3) and p.dtype == np.uint8
    assert len(np.unique(p, axis=0)) == 256
    # Known PASCAL VOC entries: background, aeroplane, bicycle, person (15).
    assert p[0].tolist() == [0, 0, 0]
    assert p[1].tolist() == [128, 0, 0]
    assert p[2].tolist() == [0, 128, 0]
    assert p[15].tolist() == [192, 128, 128]


def test_palette_deterministic_prefix_stable_and_large():
    big = palette(10000)
    assert big.shape == (10000, 3) and big.dtype == np.uint8
    np.testing.assert_array_equal(big, palette(10000))
    for n in (1, 21, 256, 257, 300, 4321):
        np.testing.assert_array_equal(palette(n), big[:n])
    assert len(np.unique(big, axis=0)) == 10000


def test_palette_zero_and_negative():
    assert palette(0).shape == (0, 3)
    with pytest.raises(ValueError):
        palette(-1)


# --- class_fractions -------------------------------------------------------------------------

def test_class_fractions_only_present_and_sum_to_one():
    labels = np.zeros((10, 10), np.int32)
    labels[:, :3] = 4
    labels[0, 9] = 7
    f = class_fractions(labels, 10)
    assert set(f) == {0, 4, 7}
    assert f[4] == pytest.approx(0.30)
    assert f[7] == pytest.approx(0.01)
    assert f[0] == pytest.approx(0.69)
    assert sum(f.values()) == pytest.approx(1.0)


def test_class_fractions_random_sum_to_one():
    labels = np.random.default_rng(0).integers(0, 50, (37, 53))
    f = class_fractions(labels, 60)
    assert sum(f.values()) == pytest.approx(1.0, abs=1e-12)
    assert set(f) == set(np.unique(labels).tolist())


def test_class_fractions_rejects_out_of_range():
    with pytest.raises(ValueError):
        class_fractions(np.array([[0, 5]]), 5)
    with pytest.raises(ValueError):
        class_fractions(np.array([[-1, 0]]), 5)


# --- overlay ---------------------------------------------------------------------------------

def _scene(h=120, w=160):
    """Three horizontal bands: RED 50 %, GREEN 30 %, OLIVE 20 %; classes 0, 4, 5 absent."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    labels = np.full((h, w), RED, np.int64)
    labels[int(h * 0.5):int(h * 0.8)] = GREEN
    labels[int(h * 0.8):] = OLIVE
    names = ["background", "red", "green", "olive", "navy", "purple"]
    return rgb, labels, names


def test_overlay_shape_dtype():
    rgb, labels, names = _scene()
    out = overlay(rgb, labels, names)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[0] == rgb.shape[0]
    assert out.shape[1] > rgb.shape[1]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_overlay_blend_formula_away_from_boundaries(alpha):
    rgb, labels, names = _scene()
    out = overlay(rgb, labels, names, alpha=alpha)
    pal = palette(len(names)).astype(np.float64)
    for y, x in [(10, 20), (70, 80), (110, 150)]:
        expected = (1 - alpha) * rgb[y, x].astype(np.float64) + alpha * pal[labels[y, x]]
        np.testing.assert_allclose(out[y, x].astype(np.float64), expected, atol=1.0)
    # Away from boundaries the whole photo part follows the formula.
    expected = np.rint((1 - alpha) * rgb[:55] + alpha * pal[labels[:55]])
    assert np.abs(out[:55, :rgb.shape[1]].astype(np.float64) - expected).max() <= 1


def test_overlay_draws_boundaries():
    rgb, labels, names = _scene()
    out = overlay(rgb, labels, names, alpha=0.5)
    pal = palette(len(names))
    y = int(120 * 0.5)  # first GREEN row, just under the RED band
    np.testing.assert_array_equal(out[y, 40], pal[GREEN] // 2)
    np.testing.assert_array_equal(out[y - 1, 40], pal[RED] // 2)


def test_legend_lists_present_classes_in_share_order():
    rgb, labels, names = _scene()
    w = rgb.shape[1]
    out = overlay(rgb, labels, names)
    legend = _legend(out, w)
    pal = palette(len(names))
    f = class_fractions(labels, len(names))
    assert list(f) == [RED, GREEN, OLIVE]
    first_row = {}
    for c in f:
        rows = _rows_with(legend, pal[c])
        assert rows.size, f"swatch of present class {c} missing from the legend"
        first_row[c] = rows[0]
    # Higher share -> higher up.
    by_position = sorted(first_row, key=first_row.get)
    by_share = sorted(f, key=lambda c: -f[c])
    assert by_position == by_share == [RED, GREEN, OLIVE]
    for absent in (NAVY, PURPLE):
        assert _rows_with(legend, pal[absent]).size == 0, f"absent class {absent} in legend"


def test_legend_order_follows_share_not_class_index():
    rgb, labels, names = _scene()
    labels = np.full(labels.shape, PURPLE, np.int64)
    labels[:10] = NAVY
    labels[10:40] = RED
    out = overlay(rgb, labels, names)
    legend = _legend(out, rgb.shape[1])
    pal = palette(len(names))
    ys = [_rows_with(legend, pal[c])[0] for c in (PURPLE, RED, NAVY)]
    assert ys == sorted(ys)
    assert _rows_with(legend, pal[GREEN]).size == 0


def test_legend_entries_more_row():
    f = {c: v for c, v in zip(range(10), np.linspace(0.01, 0.19, 10))}
    shown, hidden = legend_entries(f, 4)
    assert shown == [9, 8, 7] and hidden == 7
    shown, hidden = legend_entries(f, 10)
    assert shown == list(range(9, -1, -1)) and hidden == 0


@pytest.mark.parametrize("h", [1, 2, 5, 17, 64, 200, 4000])
def test_legend_layout_fits_height(h):
    row, pad, n = legend_layout(h)
    assert n >= 1 and row >= 1
    assert pad + n * row <= h


def test_many_classes_more_row_and_height():
    rng = np.random.default_rng(2)
    n_cls = 300
    # All 300 classes present with strictly decreasing shares, so the shown set is known.
    weights = np.arange(n_cls, 0, -1) + 5.0
    counts = np.floor(weights / weights.sum() * (64 * 64 - n_cls)).astype(int) + 1
    counts[0] += 64 * 64 - counts.sum()
    labels = rng.permutation(np.repeat(np.arange(n_cls), counts)).reshape(64, 64)
    rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    names = [f"class {i}" for i in range(n_cls)]
    out = overlay(rgb, labels, names)
    assert out.shape[0] == 64 and out.dtype == np.uint8
    _, _, max_rows = legend_layout(64)
    shown, hidden = legend_entries(class_fractions(labels, n_cls), max_rows)
    assert hidden > 0 and len(shown) + hidden == n_cls and len(shown) + 1 <= max_rows
    legend = _legend(out, 64)
    pal = palette(n_cls)
    assert _rows_with(legend, pal[shown[0]]).size  # the largest class is listed
    assert _rows_with(legend, pal[RED]).size  # class 1: the second largest
    assert _rows_with(legend, pal[250]).size == 0  # a small one is folded into "+N more"


@pytest.mark.parametrize("shape", [(1, 1), (5, 300), (300, 5), (2, 3), (1, 50), (50, 1)])
def test_tiny_images(shape):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    labels = rng.integers(0, 4, shape)
    out = overlay(rgb, labels, ["a", "b", "c", "d"])
    assert out.dtype == np.uint8 and out.shape[0] == shape[0] and out.shape[1] > shape[1]


def test_non_ascii_and_long_names():
    rgb, labels, _ = _scene(200, 200)
    names = ["", "café ☕ 東京", "x" * 500, "tab\tnew\nline", "navy", "purple"]
    out = overlay(rgb, labels, names)
    assert out.shape[0] == 200 and out.dtype == np.uint8
    # A 500-character name is truncated, not allowed to make a huge legend.
    assert out.shape[1] - 200 < 20 * 200


def test_large_image_font_scales():
    rgb = np.zeros((2000, 300, 3), np.uint8)
    labels = np.zeros((2000, 300), np.int64)
    labels[1000:] = 1
    small = overlay(rgb[:200], labels[:200], ["a", "b"])
    large = overlay(rgb, labels, ["a", "b"])
    # Rows and text grow with the image height.
    assert large.shape[1] - 300 > 3 * (small.shape[1] - 300)


def test_overlay_rejects_bad_inputs():
    rgb, labels, names = _scene()
    with pytest.raises(ValueError):
        overlay(rgb, labels[:-1], names)
    with pytest.raises(ValueError):
        overlay(rgb.astype(np.float32), labels, names)
    with pytest.raises(ValueError):
        overlay(rgb, labels, names[:2])  # label 3 has no name
    with pytest.raises(ValueError):
        overlay(rgb, labels, names, alpha=1.5)
    with pytest.raises(UserError):
        overlay(rgb, labels.astype(np.float32), names)


def test_module_does_not_import_torch():
    code = "import sys, resclip_deploy.overlay; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
