"""Tests for resclip_deploy/sfr.py: patch labels, connectivity, the SFR matrix
(docs/method.md §5, §6).

Parity cases come from tests/fixtures/parity (reference outputs of the official code; never edit).
Independent checks use scipy.ndimage.label, plain-Python brute force, and torch (linspace only).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from conftest import CASES, load_case
from resclip_deploy import sfr

CASE_BY_NAME = {c["name"]: c for c in CASES}

SFR_KEYS = ("crop0_temp_argmax", "crop0_temp_maxprob", "crop0_sfr_patch_labels",
            "crop0_sfr_valid_paths", "crop0_sfr_attn")


def _cases_with(*keys: str) -> list[str]:
    return [c["name"] for c in CASES if all(k in c["keys"] for k in keys)]


def _npz(name: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in load_case(CASE_BY_NAME[name]).items() if k in SFR_KEYS}


def test_fixture_cases_present():
    # The parity tests below must not silently run on nothing.
    assert len(_cases_with("crop0_sfr_patch_labels", "crop0_sfr_valid_paths")) >= 3
    assert len(_cases_with("crop0_sfr_attn")) >= 3


# ---------------------------------------------------------------------------------------------
# independent helpers

def _scipy_connectivity(grid: np.ndarray) -> np.ndarray:
    """(N, N) bool: same label and same 8-connected component, via scipy.ndimage.label."""
    comp = np.full(grid.shape, -1, dtype=np.int64)
    offset = 0
    for value in np.unique(grid):
        mask = grid == value
        lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        comp[mask] = lab[mask] + offset
        offset += n + 1
    assert (comp >= 0).all()
    flat = comp.ravel()
    return flat[:, None] == flat[None, :]


def _random_grid(rng: np.random.Generator, shape: tuple[int, int], n_labels: int,
                 blobby: bool) -> np.ndarray:
    """Random label grid; label values are arbitrary non-contiguous ints (like query indices)."""
    values = rng.choice(200, size=n_labels, replace=False)
    if blobby:  # coarse random field upsampled: large regions with holes and bays
        coarse = rng.integers(0, n_labels, size=(max(1, shape[0] // 3 + 1),
                                                  max(1, shape[1] // 3 + 1)))
        idx = np.kron(coarse, np.ones((3, 3), dtype=np.int64))[:shape[0], :shape[1]]
    else:
        idx = rng.integers(0, n_labels, size=shape)
    return values[idx]


GRID_SHAPES = [(1, 1), (1, 2), (1, 7), (1, 30), (2, 1), (9, 1), (30, 1), (2, 2), (5, 8),
               (8, 5), (3, 17), (14, 14), (21, 31), (17, 6)]
LABEL_COUNTS = [1, 2, 3, 8, 40]


# ---------------------------------------------------------------------------------------------
# component_connectivity

@pytest.mark.parametrize("shape", GRID_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_component_connectivity_matches_scipy_label(shape):
    rng = np.random.default_rng(1000 + 37 * shape[0] + shape[1])
    for n_labels in LABEL_COUNTS:
        for blobby in (False, True):
            for _ in range(3):
                grid = _random_grid(rng, shape, n_labels, blobby)
                got = sfr.component_connectivity(grid)
                want = _scipy_connectivity(grid)
                assert got.shape == (grid.size, grid.size)
                assert got.dtype == bool
                np.testing.assert_array_equal(got, want, err_msg=f"grid=\n{grid}")


def test_component_connectivity_diagonal_touch_and_separation():
    # 8-connectivity: diagonal neighbours are connected; a gap separates.
    grid = np.array([[1, 0, 0, 1],
                     [0, 1, 0, 0],
                     [0, 0, 0, 1]])
    c = sfr.component_connectivity(grid)
    w = grid.shape[1]
    assert c[0 * w + 0, 1 * w + 1]          # diagonal touch
    assert not c[0 * w + 0, 0 * w + 3]      # same label, apart
    assert not c[0 * w + 3, 2 * w + 3]      # (0,3) and (2,3): a row of 0s between them
    assert c[0 * w + 1, 2 * w + 0]          # the zeros are one component
    assert not c[0 * w + 0, 0 * w + 1]      # different labels never connected
    assert np.array_equal(c, c.T)


# ---------------------------------------------------------------------------------------------
# reference_connectivity (the authors' line walk)

@pytest.mark.parametrize("name", _cases_with("crop0_sfr_patch_labels", "crop0_sfr_valid_paths"))
def test_reference_connectivity_matches_fixture(name):
    z = _npz(name)
    got = sfr.reference_connectivity(z["crop0_sfr_patch_labels"])
    want = z["crop0_sfr_valid_paths"]
    assert got.shape == want.shape and got.dtype == bool
    np.testing.assert_array_equal(got, want)


def test_reference_connectivity_not_symmetric_diagonal_true():
    names = _cases_with("crop0_sfr_patch_labels")
    asym = 0
    for name in names:
        v = sfr.reference_connectivity(_npz(name)["crop0_sfr_patch_labels"])
        assert v.diagonal().all()
        asym += int((v != v.T).sum())
    assert asym > 0
    # Hand grid, 1x3: D = 2, t = (0, 0.5, 1). The walk 0 -> 1 (d = 1) samples k = 0, 1:
    # rint(0.5) = 0 (half to even), so it never looks at cell 1 and passes; the walk 1 -> 0
    # samples rint(1 * 0.5) = 0, a cell of another label, and fails.
    v = sfr.reference_connectivity(np.array([[1, 2, 2]]))
    assert v.diagonal().all()
    assert v[0, 1] and not v[1, 0]
    assert v[1, 2] and v[2, 1]


def _brute_reference(grid: np.ndarray) -> np.ndarray:
    """Per ordered pair, scalar float32 walk, written from docs/method.md §6 (t from the
    package's linspace, checked against torch separately)."""
    h, w = grid.shape
    n = h * w
    big_d = max(h, w) - 1
    t = sfr.torch_linspace01_f32(big_d + 1)
    out = np.zeros((n, n), dtype=bool)
    for i in range(n):
        si = (np.float32(i // w), np.float32(i % w))
        for j in range(n):
            ej = (np.float32(j // w), np.float32(j % w))
            d = max(abs(i // w - j // w), abs(i % w - j % w))
            ok = True
            for k in range(d + 1):
                one_minus = np.float32(np.float32(1) - t[k])
                pr = int(np.rint(np.float32(si[0] * one_minus) + np.float32(ej[0] * t[k])))
                pc = int(np.rint(np.float32(si[1] * one_minus) + np.float32(ej[1] * t[k])))
                if grid[pr, pc] != grid[i // w, i % w]:
                    ok = False
                    break
            out[i, j] = ok
    return out


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (3, 5), (5, 3), (6, 6), (4, 9)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_reference_connectivity_matches_brute_force(shape):
    rng = np.random.default_rng(7 + shape[0] * 11 + shape[1])
    for n_labels in (1, 2, 3):
        for blobby in (False, True):
            grid = _random_grid(rng, shape, n_labels, blobby)
            np.testing.assert_array_equal(sfr.reference_connectivity(grid),
                                          _brute_reference(grid), err_msg=f"grid=\n{grid}")


def test_reference_connectivity_u_shape_fails_where_components_connect():
    grid = _u_grid()
    w = grid.shape[1]
    a, b = 0 * w + 0, 0 * w + 4        # the two tips of the U
    ref = sfr.reference_connectivity(grid)
    comp = sfr.component_connectivity(grid)
    assert not ref[a, b] and not ref[b, a]
    assert comp[a, b] and comp[b, a]


# ---------------------------------------------------------------------------------------------
# torch_linspace01_f32

def test_torch_linspace01_f32_bit_exact():
    torch = pytest.importorskip("torch")
    for n in range(1, 301):
        got = sfr.torch_linspace01_f32(n)
        want = torch.linspace(0, 1, n, dtype=torch.float32).numpy()
        assert got.dtype == np.float32 and got.shape == (n,)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"n={n}"


# ---------------------------------------------------------------------------------------------
# patch_labels

def _brute_patch_labels(labels: np.ndarray, patch: int) -> np.ndarray:
    gh, gw = labels.shape[0] // patch, labels.shape[1] // patch
    out = np.zeros((gh, gw), dtype=np.int64)
    for r in range(gh):
        for c in range(gw):
            cell = labels[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].ravel().tolist()
            counts = Counter(cell)
            best = max(counts.values())
            out[r, c] = min(v for v, k in counts.items() if k == best)
    return out


@pytest.mark.parametrize("hw,patch,nq", [((32, 48), 16, 5), ((37, 53), 16, 4), ((16, 16), 16, 2),
                                         ((15, 40), 4, 3), ((9, 9), 2, 2), ((7, 10), 3, 6),
                                         ((50, 31), 5, 1), ((20, 20), 4, 150)])
def test_patch_labels_brute_force(hw, patch, nq):
    rng = np.random.default_rng(hw[0] * 1000 + hw[1] + patch)
    for trial in range(5):
        # few distinct values -> many ties; also skewed distributions
        k = min(nq, 1 + trial)
        labels = rng.integers(0, k, size=hw) if trial % 2 else \
            rng.choice(nq, size=hw, p=None if nq == 1 else _skewed(nq, rng))
        got = sfr.patch_labels(labels, patch, nq)
        want = _brute_patch_labels(labels, patch)
        assert got.shape == (hw[0] // patch, hw[1] // patch)
        np.testing.assert_array_equal(got, want)


def _skewed(n: int, rng: np.random.Generator) -> np.ndarray:
    p = rng.random(n) ** 4
    return p / p.sum()


def test_patch_labels_tie_smallest_and_remainder_ignored():
    labels = np.array([[3, 1, 9, 9, 7],
                       [1, 3, 9, 2, 7],
                       [5, 5, 5, 5, 7]])
    # patch 2: one row of patches (row 2 ignored), two columns (column 4 ignored)
    got = sfr.patch_labels(labels, 2, 10)
    np.testing.assert_array_equal(got, [[1, 9]])


@pytest.mark.parametrize("name", _cases_with("crop0_temp_argmax", "crop0_temp_maxprob",
                                             "crop0_sfr_patch_labels"))
def test_patch_labels_match_fixture(name):
    case = CASE_BY_NAME[name]
    z = _npz(name)
    pixel = np.where(z["crop0_temp_maxprob"] >= case["temp_thd"], z["crop0_temp_argmax"], 0)
    got = sfr.patch_labels(pixel.astype(np.int64), 16, case["num_queries"])
    np.testing.assert_array_equal(got, z["crop0_sfr_patch_labels"])
    # the package's own pixel-label rule gives the same pixels
    np.testing.assert_array_equal(
        sfr.pixel_labels(z["crop0_temp_argmax"], z["crop0_temp_maxprob"], case["temp_thd"]),
        pixel)


# ---------------------------------------------------------------------------------------------
# sfr_matrix

@pytest.mark.parametrize("name", _cases_with("crop0_sfr_patch_labels", "crop0_sfr_attn"))
def test_sfr_matrix_reference_matches_fixture(name):
    case = CASE_BY_NAME[name]
    z = _npz(name)
    s = sfr.sfr_matrix(z["crop0_sfr_patch_labels"], "reference", case["gaussian_std"])
    want = z["crop0_sfr_attn"]
    assert s.shape == want.shape and s.dtype == np.float32
    np.testing.assert_allclose(s, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("connectivity", ["reference", "components"])
def test_sfr_matrix_rows_and_cls(connectivity):
    rng = np.random.default_rng(5)
    grids = [_npz(n)["crop0_sfr_patch_labels"] for n in _cases_with("crop0_sfr_patch_labels")]
    grids += [_random_grid(rng, s, k, True) for s in [(1, 1), (1, 9), (7, 1), (6, 11), (14, 14)]
              for k in (1, 3)]
    for grid in grids:
        s = sfr.sfr_matrix(grid, connectivity, 5.0)
        n = grid.size
        assert s.shape == (n + 1, n + 1)
        assert np.all(s[0, :] == 0) and np.all(s[:, 0] == 0)
        assert (s >= 0).all()
        np.testing.assert_allclose(s[1:, 1:].sum(axis=1), 1.0, rtol=0, atol=1e-5)


def _brute_sfr(grid: np.ndarray, std: float) -> np.ndarray:
    """docs/method.md §6 with scipy components, written out with explicit loops (float64)."""
    h, w = grid.shape
    n = h * w
    flat = grid.ravel()
    conn = _scipy_connectivity(grid)
    big_d = max(h, w) - 1
    m = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if flat[i] != flat[j]:
                continue
            d = max(abs(i // w - j // w), abs(i % w - j % w))
            m[i, j] = 1.0 if conn[i, j] else np.exp(-d / big_d)
    size = min(n, int(6 * std + 1))
    size += 1 - size % 2
    x = np.arange(size) - size // 2
    k = np.exp(-x ** 2 / (2 * std ** 2))
    k /= k.sum()
    blurred = np.zeros((n, n))
    for j in range(n):
        for o in range(size):
            src = j + o - size // 2
            if 0 <= src < n:
                blurred[:, j] += k[o] * m[:, src]
    blurred = np.maximum(blurred, 0)
    blurred /= blurred.sum(axis=1, keepdims=True) + 1e-8
    s = np.zeros((n + 1, n + 1))
    s[1:, 1:] = blurred
    return s


@pytest.mark.parametrize("shape,std", [((4, 6), 5.0), ((6, 4), 1.0), ((1, 8), 5.0),
                                       ((8, 1), 2.0), ((9, 9), 5.0), ((5, 7), 0.7)])
def test_sfr_matrix_components_brute_force(shape, std):
    rng = np.random.default_rng(shape[0] * 31 + shape[1])
    for n_labels in (1, 2, 4):
        grid = _random_grid(rng, shape, n_labels, blobby=True)
        np.testing.assert_allclose(sfr.sfr_matrix(grid, "components", std),
                                   _brute_sfr(grid, std), rtol=0, atol=1e-6)


def _u_grid() -> np.ndarray:
    return np.array([[1, 0, 0, 0, 1],
                     [1, 0, 0, 0, 1],
                     [1, 0, 0, 0, 1],
                     [1, 1, 1, 1, 1],
                     [0, 0, 0, 0, 0]])


def test_sfr_matrix_components_differs_from_reference():
    # U-shaped region: the straight walk between the tips leaves the label, the component doesn't.
    grid = _u_grid()
    ref = sfr.sfr_matrix(grid, "reference", 5.0)
    comp = sfr.sfr_matrix(grid, "components", 5.0)
    assert np.abs(ref - comp).max() > 1e-3
    # and on the fixture grids, wherever the two tests disagree on a same-label pair
    found = False
    for name in _cases_with("crop0_sfr_patch_labels"):
        g = _npz(name)["crop0_sfr_patch_labels"]
        flat = g.ravel()
        same = flat[:, None] == flat[None, :]
        disagree = same & (sfr.reference_connectivity(g) != sfr.component_connectivity(g))
        if disagree.any():
            found = True
            a = sfr.sfr_matrix(g, "reference", 5.0)
            b = sfr.sfr_matrix(g, "components", 5.0)
            assert np.abs(a - b).max() > 1e-4, name
    assert found


def test_sfr_matrix_unknown_connectivity():
    with pytest.raises(ValueError):
        sfr.sfr_matrix(np.zeros((2, 2), dtype=int), "bogus", 5.0)


# ---------------------------------------------------------------------------------------------
# sfr_bias

def test_sfr_bias_fp16_exact_and_max_one():
    rng = np.random.default_rng(3)
    mats = [sfr.sfr_matrix(_npz(n)["crop0_sfr_patch_labels"], "reference", 5.0)
            for n in _cases_with("crop0_sfr_patch_labels")]
    mats += [sfr.sfr_matrix(_random_grid(rng, (6, 9), 3, True), "components", 5.0)]
    for s in mats:
        b = sfr.sfr_bias(s)
        assert b.dtype == np.float32 and b.shape == s.shape
        np.testing.assert_array_equal(b.astype(np.float16).astype(np.float32), b)
        assert b.max() == 1.0
        assert np.all(b[0] == 0) and np.all(b[:, 0] == 0)
        # it is the fp16 rounding of S / max S, nothing else
        np.testing.assert_allclose(b, s / s.max(), rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# gaussian_kernel_1d

def test_gaussian_kernel_std5_is_31():
    k = sfr.gaussian_kernel_1d(196, 5.0)
    assert k.shape == (31,) and k.dtype == np.float32
    assert abs(float(k.sum()) - 1.0) < 1e-6
    x = np.arange(31) - 15
    want = np.exp(-x ** 2 / 50.0)
    np.testing.assert_allclose(k, want / want.sum(), rtol=1e-5)
    assert k.argmax() == 15 and np.array_equal(k, k[::-1])


@pytest.mark.parametrize("n,std,size", [(1, 5.0, 1), (2, 5.0, 3), (9, 5.0, 9), (10, 5.0, 11),
                                        (30, 5.0, 31), (31, 5.0, 31), (1000, 5.0, 31),
                                        (100, 1.0, 7), (100, 0.5, 5), (100, 2.0, 13)])
def test_gaussian_kernel_size_capped_and_odd(n, std, size):
    # size = min(n, int(6 std + 1)), made odd by +1 (docs/method.md §6)
    k = sfr.gaussian_kernel_1d(n, std)
    assert k.shape == (size,)
    assert size % 2 == 1
    assert abs(float(k.sum()) - 1.0) < 1e-6


# ---- SFR step scheduling ----------------------------------------------------------------------

@pytest.mark.parametrize("windows, workers, expected", [
    (6, 16, (6, 3)), (1, 16, (1, 16)), (6, 2, (2, 1)), (16, 16, (16, 1)), (3, 4, (3, 2)),
    (1, 1, (1, 1))])
def test_sfr_schedule_keeps_every_thread_busy(windows, workers, expected):
    from resclip_deploy.pipeline import sfr_schedule
    in_flight, blocks = sfr_schedule(windows, workers)
    assert (in_flight, blocks) == expected
    assert in_flight * blocks >= min(workers, windows * workers)


def test_fewer_windows_than_cores_run_at_once(monkeypatch):
    """Six windows on 16 threads: all six in flight together, each PAMR split in 3 row blocks
    (the old loop ran them one after another: two busy cores)."""
    import threading
    import time

    from resclip_deploy import pipeline
    from resclip_deploy.params import CUSTOM
    active, peak, seen, lock = [0], [0], [], threading.Lock()

    def fake(logits, image, logit_scale, pool, blocks):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            seen.append((blocks, pool is not None))
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        h, w = image.shape[1:]
        return np.zeros((h, w), np.int64), np.ones((h, w), np.float32)
    monkeypatch.setattr(pipeline, "prepass_probs", fake)
    windows = np.zeros((6, 3, 64, 64), np.float32)
    step = pipeline.sfr_step(np.zeros((6, 2, 16), np.float32), windows, CUSTOM, 16, workers=16)
    assert peak[0] == 6 and seen == [(3, True)] * 6
    assert step.bias.shape == (6, 17, 17)


@pytest.mark.parametrize("k", [1, 3])
def test_sfr_step_is_the_same_on_any_number_of_threads(k):
    from resclip_deploy.pipeline import sfr_step
    from resclip_deploy.params import CUSTOM
    rng = np.random.default_rng(k)
    logits = rng.normal(size=(k, 5, 16)).astype(np.float32) * 0.1
    windows = rng.normal(size=(k, 3, 64, 64)).astype(np.float32)
    one = sfr_step(logits, windows, CUSTOM, 16, workers=1)
    many = sfr_step(logits, windows, CUSTOM, 16, workers=16)
    for name in ("prepass_argmax", "prepass_maxprob", "grids", "matrices", "bias"):
        np.testing.assert_array_equal(getattr(one, name), getattr(many, name))
