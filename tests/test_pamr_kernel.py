"""PAMR's compiled kernel gives scipy's numbers bit for bit (scipy's product is checked against
the reference code's formula in test_reference.py), on any window size, query count, iteration
count and task split; and where numba is missing, refine() runs scipy."""

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from resclip_deploy import pamr_kernel
from resclip_deploy.pamr import OFFSETS, affinities, as_matrix, pamr, refine

DILATIONS = (8, 16)


def case(h, w, q, seed=0):
    rng = np.random.default_rng(seed)
    # a smooth guide, so that the affinities are far from uniform
    image = np.cumsum(np.cumsum(rng.standard_normal((3, h, w)), 1), 2).astype(np.float32) / 8
    return rng.standard_normal((h * w, q)).astype(np.float32), image


@pytest.mark.parametrize("h,w,q,iterations", [(224, 224, 150, 10), (40, 56, 5, 10),
                                               (12, 70, 16, 3), (33, 17, 17, 1), (1, 1, 2, 2),
                                               (200, 173, 33, 10), (5, 40, 31, 0)])
def test_kernel_equals_scipy_exactly(h, w, q, iterations):
    mask, image = case(h, w, q)
    aff = affinities(image, DILATIONS)
    want = pamr(mask, as_matrix(aff, DILATIONS), iterations)
    got = pamr_kernel.pamr(mask.copy(), aff, iterations, DILATIONS, OFFSETS)
    np.testing.assert_array_equal(got, want)
    with ThreadPoolExecutor(3) as pool:          # blocks of queries on threads: same numbers
        np.testing.assert_array_equal(
            pamr_kernel.pamr(mask.copy(), aff, iterations, DILATIONS, OFFSETS, pool, 3), want)


def test_refine_runs_scipy_without_numba(monkeypatch):
    mask, image = case(48, 64, 20, seed=1)
    with_kernel = refine(mask.copy(), image, DILATIONS, 10)
    monkeypatch.setitem(sys.modules, "resclip_deploy.pamr_kernel", None)   # import fails
    without = refine(mask.copy(), image, DILATIONS, 10)
    np.testing.assert_array_equal(without, with_kernel)
    assert not np.array_equal(with_kernel, mask)


def test_layout_covers_every_pixel_once():
    t = pamr_kernel.layout(37, 29, DILATIONS, OFFSETS)
    assert sorted(t["cell_pixel"][t["pixel_cell"]]) == list(range(37 * 29))
    assert t["runs"][:, 1].sum() == 37 * 29
    # every cell a pixel reads is a pixel's cell or a halo cell
    reads = (np.concatenate([np.arange(s, s + n) for s, n in t["runs"]])[:, None]
             + t["neighbours"][None, :]).ravel()
    assert np.isin(reads, np.concatenate([t["pixel_cell"], t["halo"]])).all()


def test_layout_refuses_other_dilations():
    with pytest.raises(ValueError, match="multiples of 8"):
        pamr_kernel.layout(32, 32, (4, 8), OFFSETS)
