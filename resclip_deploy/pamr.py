"""PAMR (pixel-adaptive mask refinement) of the SFR pre-pass on CPU (docs/method.md §5).

Each iteration sets every pixel's mask to the affinity-weighted sum of its 16 neighbours, the same
weights for every query. That is one sparse (HW x HW) matrix with 16 entries per row applied to a
(HW, Q) matrix: :func:`pamr` runs it with scipy as one fused pass per iteration (no (Q, 16, H, W)
tensors, which made the reference spend 96 % of its time here). The compiled kernel of
pamr_kernel.py (numba) runs the same sums, bit for bit; prepass.py chooses between them.
"""

from __future__ import annotations

import functools
from concurrent.futures import Executor
from typing import Optional

import numpy as np
import scipy.sparse as sp

from .geometry import resize_bilinear_hwc

# Neighbour offsets (dy, dx) of one dilation, row-major without the centre.
OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
# Queries upsampled (and refined by the kernel) together: one AVX-512 vector
QUERY_BLOCK = 16
_WITH_CENTRE = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def neighbour_index(h: int, w: int, dilations: tuple[int, ...],
                    offsets: tuple[tuple[int, int], ...]) -> np.ndarray:
    """(K, h·w) flat index of each pixel's neighbour at d·(dy, dx), borders replicated."""
    y, x = np.divmod(np.arange(h * w), w)
    return np.stack([np.clip(y + dy * d, 0, h - 1) * w + np.clip(x + dx * d, 0, w - 1)
                     for d in dilations for dy, dx in offsets])


@functools.lru_cache(maxsize=8)
def _ring_structure(h: int, w: int, dilations: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """CSR column indices and row pointers of the affinity matrix: 16 entries per row, in
    neighbour order. Border neighbours that coincide stay separate entries; a product sums them."""
    ring = neighbour_index(h, w, dilations, OFFSETS)                       # (K, HW)
    indices = np.ascontiguousarray(ring.T).ravel().astype(np.int32)
    indptr = np.arange(0, ring.size + 1, ring.shape[0], dtype=np.int32)
    return indices, indptr


def _shifted(padded: np.ndarray, pad: int, dy: int, dx: int, h: int, w: int) -> np.ndarray:
    return padded[:, pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def affinities(image: np.ndarray, dilations: tuple[int, ...]) -> np.ndarray:
    """(3, h, w) guide image -> (K, h, w) float32 softmax affinities of the K neighbours
    (:func:`neighbour_index` order).

    σ: unbiased std over the 3x3 neighbourhoods of all dilations (centre in each), per channel;
    a_k = mean over channels of −|x − x_k| / (1e−8 + 0.1·σ); softmax over the 16 neighbours.
    Neighbours are slices of one replicate-padded copy.
    """
    _, h, w = image.shape
    x = image.astype(np.float32)
    pad = max(dilations)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    samples = [_shifted(padded, pad, dy * d, dx * d, h, w)
               for d in dilations for dy, dx in _WITH_CENTRE]
    mean = sum(samples) / np.float32(len(samples))
    var = sum((s - mean) ** 2 for s in samples) / np.float32(len(samples) - 1)
    scale = np.float32(1e-8) + np.float32(0.1) * np.sqrt(var)
    aff = np.stack([(-np.abs(x - _shifted(padded, pad, dy * d, dx * d, h, w)) / scale)
                    .mean(axis=0) for d in dilations for dy, dx in OFFSETS])   # (K, h, w)
    aff = np.exp(aff - aff.max(axis=0, keepdims=True))
    aff /= aff.sum(axis=0, keepdims=True)
    return aff


def affinity_matrix(image: np.ndarray, dilations: tuple[int, ...]) -> sp.csr_matrix:
    """(3, h, w) guide image -> (h·w, h·w) float32 CSR matrix, rows = :func:`affinities`."""
    return as_matrix(affinities(image, dilations), dilations)


def as_matrix(aff: np.ndarray, dilations: tuple[int, ...]) -> sp.csr_matrix:
    """(K, h, w) affinities -> the (h·w, h·w) CSR matrix with them as rows."""
    _, h, w = aff.shape
    indices, indptr = _ring_structure(h, w, tuple(dilations))
    n = h * w
    data = np.ascontiguousarray(aff.reshape(len(aff), n).T).ravel()
    return sp.csr_matrix((data, indices, indptr), shape=(n, n))


def _row_block(m: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows start..stop-1 of a CSR matrix as views of its arrays (scipy's slicing copies them)."""
    lo, hi = m.indptr[start], m.indptr[stop]
    return sp.csr_matrix((m.data[lo:hi], m.indices[lo:hi], m.indptr[start:stop + 1] - lo),
                         shape=(stop - start, m.shape[1]), copy=False)


def pamr(mask: np.ndarray, affinity: sp.csr_matrix, iterations: int,
         pool: Optional[Executor] = None, blocks: int = 1) -> np.ndarray:
    """(h·w, Q) float32 mask -> refined mask after ``iterations`` affinity steps.

    With a ``pool``, each step runs as ``blocks`` row blocks in parallel (scipy releases the
    GIL); rows, not query columns, so every block keeps the full Q-wide inner loop.
    """
    n = affinity.shape[0]
    bounds = np.linspace(0, n, max(1, blocks) + 1).astype(int)
    rows = [(a, b, _row_block(affinity, a, b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    for _ in range(iterations):
        if pool is None or len(rows) == 1:
            mask = affinity @ mask
            continue
        out = np.empty_like(mask)

        def step(part: tuple, src: np.ndarray = mask, dst: np.ndarray = out) -> None:
            dst[part[0]:part[1]] = part[2] @ src

        list(pool.map(step, rows))
        mask = out
    return mask


def upsampled_block(grid: np.ndarray, first: int, hw: tuple[int, int]) -> np.ndarray:
    """Queries first..first+15 of the (gh, gw, Q) logits, bilinear to (h, w) -> (h·w, 16)
    float32, zero past Q. Always 16 channels: OpenCV resizes 1, 3 or 4 channels on paths of
    their own whose roundings differ, so the kernel's blocks and the whole array would not
    agree bit for bit."""
    part = grid[:, :, first:first + QUERY_BLOCK]
    if part.shape[2] < QUERY_BLOCK:
        part = np.pad(part, ((0, 0), (0, 0), (0, QUERY_BLOCK - part.shape[2])))
    return resize_bilinear_hwc(part, hw).reshape(hw[0] * hw[1], QUERY_BLOCK)
