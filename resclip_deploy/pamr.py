"""PAMR (pixel-adaptive mask refinement) of the SFR pre-pass on CPU (SPEC §5). numpy + scipy.

Each iteration sets every pixel's mask to the affinity-weighted sum of its 16 neighbours, the same
weights for every query. That is one sparse (HW x HW) matrix with 16 entries per row applied to a
(HW, Q) matrix: scipy runs it as one fused pass per iteration (no (Q, 16, H, W) tensors, which
made the reference spend 96 % of its time here), and releases the GIL so windows run in parallel.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

# Neighbour offsets (dy, dx) of one dilation, row-major without the centre.
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_WITH_CENTRE = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def neighbour_index(h: int, w: int, dilations: tuple[int, ...],
                    offsets: tuple[tuple[int, int], ...]) -> np.ndarray:
    """(K, h·w) flat index of each pixel's neighbour at d·(dy, dx), borders replicated."""
    y, x = np.divmod(np.arange(h * w), w)
    return np.stack([np.clip(y + dy * d, 0, h - 1) * w + np.clip(x + dx * d, 0, w - 1)
                     for d in dilations for dy, dx in offsets])


def affinity_matrix(image: np.ndarray, dilations: tuple[int, ...]) -> sp.csr_matrix:
    """(3, h, w) guide image -> (h·w, h·w) float32 CSR matrix, rows = softmax affinities.

    σ: unbiased std over the 3x3 neighbourhoods of all dilations (centre in each), per channel;
    a_k = mean over channels of −|x − x_k| / (1e−8 + 0.1·σ); softmax over the 16 neighbours.
    """
    _, h, w = image.shape
    flat = image.reshape(3, -1).astype(np.float32)
    std = flat[:, neighbour_index(h, w, dilations, _WITH_CENTRE)].std(axis=1, ddof=1)
    ring = neighbour_index(h, w, dilations, OFFSETS)                        # (K, HW)
    scale = np.float32(1e-8) + np.float32(0.1) * std[:, None]
    aff = -np.abs(flat[:, None, :] - flat[:, ring]) / scale
    aff = aff.mean(axis=0)                                                  # (K, HW)
    aff = np.exp(aff - aff.max(axis=0, keepdims=True))
    aff /= aff.sum(axis=0, keepdims=True)
    n = h * w
    rows = np.broadcast_to(np.arange(n), ring.shape)
    # Border neighbours that coincide are summed: the same total weight on the same pixel.
    return sp.csr_matrix((aff.ravel(), (rows.ravel(), ring.ravel())), shape=(n, n),
                         dtype=np.float32)


def pamr(mask: np.ndarray, affinity: sp.csr_matrix, iterations: int) -> np.ndarray:
    """(h·w, Q) float32 mask -> refined mask after ``iterations`` affinity steps."""
    for _ in range(iterations):
        mask = affinity @ mask
    return mask
