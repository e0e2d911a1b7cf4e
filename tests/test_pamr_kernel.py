"""The pre-pass's compiled kernel gives scipy's numbers bit for bit (scipy's product is checked
against the reference code's formula in test_reference.py), on any window size, query count,
iteration count and task split; and where numba is missing, or for other dilations, scipy runs
it."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from resclip_deploy import pamr_kernel
from resclip_deploy import prepass
from resclip_deploy.prepass import refined_scores

DILATIONS = (8, 16)


def case(h, w, q, seed=0):
    rng = np.random.default_rng(seed)
    # a smooth guide, so that the affinities are far from uniform
    image = np.cumsum(np.cumsum(rng.standard_normal((3, h, w)), 1), 2).astype(np.float32) / 8
    grid = rng.standard_normal((max(1, h // 16), max(1, w // 16), q)).astype(np.float32)
    return grid, image


def scipy_scores(grid, image, dilations, iterations, scale, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(prepass, "compiled_kernel", lambda: None)
        return refined_scores(grid, image, dilations, iterations, scale)


@pytest.mark.parametrize("h,w,q,iterations", [(224, 224, 150, 10), (40, 56, 5, 10),
                                               (12, 70, 16, 3), (33, 17, 17, 1), (1, 1, 2, 2),
                                               (30, 30, 3, 10), (200, 173, 33, 10),
                                               (5, 40, 31, 0)])
def test_kernel_equals_scipy_exactly(h, w, q, iterations, monkeypatch):
    grid, image = case(h, w, q)
    want_best, want_z = scipy_scores(grid, image, DILATIONS, iterations, 40.0, monkeypatch)
    assert want_z.shape == (h * w, q) and (want_z <= 0).all()
    for pool, tasks in ((None, 1), (ThreadPoolExecutor(3), 3)):   # threads: same numbers
        best, z = refined_scores(grid, image, DILATIONS, iterations, 40.0, pool, tasks)
        np.testing.assert_array_equal(best, want_best)
        np.testing.assert_array_equal(z, want_z)
        if pool is not None:
            pool.shutdown()


def test_ties_and_nan_pick_as_numpy(monkeypatch):
    grid, image = case(64, 64, 20, seed=2)
    grid[..., 7] = grid[..., 3] = grid.max() + 1        # a tie everywhere: the first wins
    grid[0, 0, 11] = np.nan                              # NaN spreads; it counts as the maximum
    want_best, want_z = scipy_scores(grid, image, DILATIONS, 2, 40.0, monkeypatch)
    best, z = refined_scores(grid, image, DILATIONS, 2, 40.0)
    assert (want_best == 3).any() and (want_best == 11).any() and not (want_best == 7).any()
    np.testing.assert_array_equal(best, want_best)
    np.testing.assert_array_equal(z, want_z)


def test_other_dilations_run_scipy(monkeypatch):
    grid, image = case(48, 64, 20, seed=1)
    got = refined_scores(grid, image, (8,), 10, 40.0)
    want = scipy_scores(grid, image, (8,), 10, 40.0, monkeypatch)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(got[1], refined_scores(grid, image, DILATIONS, 10, 40.0)[1])


def test_layout_covers_every_pixel_once():
    t = pamr_kernel.layout(37, 29)
    assert sorted(t["cell_pixel"][t["pixel_cell"]]) == list(range(37 * 29))
    assert t["runs"][:, 1].sum() == 37 * 29
    # every cell a pixel reads is a pixel's cell or a halo cell
    offsets = np.array([dy * t["cols"] + dx for dy, dx in pamr_kernel.NEIGHBOURS])
    reads = (np.concatenate([np.arange(s, s + n) for s, n in t["runs"]])[:, None]
             + offsets[None, :]).ravel()
    assert np.isin(reads, np.concatenate([t["pixel_cell"], t["halo"]])).all()


def test_without_numba_scipy_runs():
    code = ("import sys; sys.modules['numba'] = None\n"
            "from resclip_deploy import prepass\n"
            "assert prepass.compiled_kernel() is None\n"
            "assert 'resclip_deploy.pamr_kernel' not in sys.modules\n"
            "import numpy as np\n"
            "best, z = prepass.refined_scores(np.ones((2, 2, 3), np.float32), "
            "np.zeros((3, 32, 32), np.float32), (8, 16), 10, 40.0)\n"
            "assert best.shape == (1024,) and (z == 0).all()\n")
    subprocess.run([sys.executable, "-c", code], check=True)
