"""Semantic Feedback Refinement on CPU: patch labels and the SFR matrix (docs/method.md §5 end, §6).

numpy + OpenCV + scipy, no torch: the torch reference and the ONNX runtime call the same code
between their encoder and head steps. Grid index i = r·w + c (row-major).
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import correlate1d


def pixel_labels(argmax: np.ndarray, maxprob: np.ndarray, temp_thd: float) -> np.ndarray:
    """Pre-pass pixel labels: the argmax query, 0 where its probability < temp_thd."""
    return np.where(maxprob < np.float32(temp_thd), 0, argmax).astype(np.int64)


def patch_labels(labels: np.ndarray, patch: int, num_queries: int) -> np.ndarray:
    """(H, W) pixel labels -> (H//patch, W//patch) most frequent label per patch (ties: smallest).

    Rows/columns beyond patch·(H//patch), patch·(W//patch) are ignored.
    """
    gh, gw = labels.shape[0] // patch, labels.shape[1] // patch
    cells = labels[:gh * patch, :gw * patch].reshape(gh, patch, gw, patch)
    cell_id = np.arange(gh * gw).reshape(gh, 1, gw, 1)
    counts = np.bincount((cell_id * num_queries + cells).ravel(),
                         minlength=gh * gw * num_queries).reshape(gh * gw, num_queries)
    return counts.argmax(axis=1).reshape(gh, gw)


def _grid_coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(h * w)
    return idx // w, idx % w


def chebyshev_distances(h: int, w: int) -> np.ndarray:
    """(N, N) Chebyshev distance between grid cells."""
    r, c = _grid_coords(h, w)
    return np.maximum(np.abs(r[:, None] - r[None, :]), np.abs(c[:, None] - c[None, :]))


def torch_linspace01_f32(steps: int) -> np.ndarray:
    """torch.linspace(0, 1, steps) in float32, bit for bit.

    torch fills the first half as step·k and the second half as 1 - step·(steps-1-k), each with
    one rounding to float32 (float64 arithmetic is exact here, so one cast rounds once).
    """
    if steps == 1:
        return np.zeros(1, dtype=np.float32)
    step = np.float64(np.float32(1.0) / np.float32(steps - 1))
    k = np.arange(steps, dtype=np.float64)
    first = step * k
    second = 1.0 - step * (steps - 1 - k)
    return np.where(k < steps // 2, first, second).astype(np.float32)


def reference_connectivity(grid: np.ndarray) -> np.ndarray:
    """(N, N) bool: the authors' line-walk test for each ordered pair i -> j.

    Sample points p_k = round_half_even(s·(1 - t_k) + e·t_k) in float32, t = linspace(0, 1, D+1),
    D = max(h, w) - 1, for k = 0..d(i, j) only; valid iff every sample has the label of i.
    """
    h, w = grid.shape
    flat = grid.ravel()
    r, c = _grid_coords(h, w)
    d = chebyshev_distances(h, w)
    big_d = max(h, w) - 1
    t = torch_linspace01_f32(big_d + 1)
    rs, cs = r.astype(np.float32)[:, None], c.astype(np.float32)[:, None]
    re, ce = r.astype(np.float32)[None, :], c.astype(np.float32)[None, :]
    start_label = flat[:, None]
    valid = np.ones(d.shape, dtype=bool)
    for k in range(big_d + 1):
        tk = t[k]
        one_minus = np.float32(1) - tk
        pr = np.rint(rs * one_minus + re * tk).astype(np.int64)   # (N, N)
        pc = np.rint(cs * one_minus + ce * tk).astype(np.int64)
        same = grid[pr, pc] == start_label
        valid &= same | (k > d)
    return valid


def component_ids(grid: np.ndarray) -> np.ndarray:
    """(h, w) labels -> (h, w) int ids of 8-connected same-label components (OpenCV)."""
    ids = np.zeros(grid.shape, dtype=np.int64)
    offset = 0
    for label in np.unique(grid):
        mask = grid == label
        n, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        ids[mask] = comp[mask] + offset
        offset += n
    return ids


def component_connectivity(grid: np.ndarray) -> np.ndarray:
    """(N, N) bool: i and j lie in one 8-connected component of their label."""
    ids = component_ids(grid).ravel()
    return ids[:, None] == ids[None, :]


def gaussian_kernel_1d(n: int, std: float) -> np.ndarray:
    """Normalised 1-D Gaussian of odd size min(n, int(6·std + 1)) (+1 if even), float32."""
    size = min(n, int(6 * std + 1))
    size = size if size % 2 == 1 else size + 1
    x = (np.arange(size) - size // 2).astype(np.float32)
    k = np.exp(-(x ** 2) / np.float32(2 * std ** 2)).astype(np.float32)
    return k / k.sum()


def connectivity_mask(grid: np.ndarray, connectivity: str) -> np.ndarray:
    """(h, w) patch labels -> (N, N) bool same-entity test of the SFR matrix."""
    if connectivity == "reference":
        return reference_connectivity(grid)
    if connectivity == "components":
        return component_connectivity(grid)
    raise ValueError(f"unknown connectivity {connectivity!r}")


def sfr_matrix(grid: np.ndarray, connectivity: str, gaussian_std: float) -> np.ndarray:
    """(h, w) patch labels -> (N+1, N+1) float32 S with the named connectivity."""
    return masked_sfr_matrix(grid, connectivity_mask(grid, connectivity), gaussian_std)


def masked_sfr_matrix(grid: np.ndarray, connected: np.ndarray,
                      gaussian_std: float) -> np.ndarray:
    """(h, w) patch labels, (N, N) connectivity mask -> (N+1, N+1) float32 S, zero CLS row and
    column (docs/method.md §6).

    M = same label; same-label pairs that are not connected decay by exp(-d/D); each row is
    blurred along the flattened index (zero padding), then normalised to sum 1.
    """
    h, w = grid.shape
    n = h * w
    flat = grid.ravel()
    m = (flat[:, None] == flat[None, :]).astype(np.float32)
    big_d = max(h, w) - 1
    if big_d > 0:
        decay = np.exp(-chebyshev_distances(h, w).astype(np.float32) / np.float32(big_d))
        m = np.where(connected, m, m * decay.astype(np.float32))
    blurred = correlate1d(m, gaussian_kernel_1d(n, gaussian_std), axis=1, mode="constant",
                          cval=0.0)
    np.maximum(blurred, 0, out=blurred)
    blurred /= blurred.sum(axis=1, keepdims=True) + np.float32(1e-8)
    s = np.zeros((n + 1, n + 1), dtype=np.float32)
    s[1:, 1:] = blurred
    return s


def sfr_bias(s: np.ndarray) -> np.ndarray:
    """S -> fp16(S / max S) as float32, what the last block mixes in (docs/method.md §4 step 1).

    The fp16 rounding is the reference's, applied in fp32 runs too.
    """
    return (s / s.max()).astype(np.float16).astype(np.float32)
