"""The SFR pre-pass on a CUDA device (numba-cuda): each PAMR iteration one pass over the masks.

ONNX Runtime's CUDA provider runs the pre-pass graph's nodes one kernel each: ~111 passes over
the (K, Q, h, w) masks per iteration where a stencil needs two (BENCHMARKS.md). Four kernels
compute what :func:`pipeline.prepass_step` computes on the CPU:

- ``affinity``: (K, 3, h, w) windows -> (K, 16, h, w) neighbour weights (:func:`pamr.affinities`);
- ``iterate``: one PAMR step. The first reads the (K, Q, gh·gw) logits and upsamples them where
  it reads them: the upsampled masks are never written;
- ``last``: the last step, times the logit scale, with each pixel's argmax query and softmax's
  largest probability (an online softmax over the queries): the refined masks are never written;
- ``vote``: ``temp_thd`` and the patch vote (:func:`sfr.pixel_labels`, :func:`sfr.patch_labels`).

Numbers. In fp32 the PAMR sums are the CPU kernel's (pamr_kernel): ((0 + a0·m0) + a1·m1) + ... in
neighbour order, with round-to-nearest multiplies and adds that the compiler may not fuse into
FMAs (``__fmul_rn``, ``__fadd_rn``): given the same upsampled masks, bit for bit. Three things
differ: the upsampling is half-pixel bilinear as OpenCV defines it (horizontal, then vertical,
separate roundings), but OpenCV's float resize (IPP) rounds ~0.3 % of values one ulp apart;
``expf`` (≤ 2 ulp) is not numpy's ``exp``; and the online softmax sums its terms in another order.
For fp16 bundles masks and weights are stored in fp16 between steps (half the bytes) and every
sum is fp32. tests/test_pamr_cuda.py measures each difference in numba's CUDA simulator.

Layout and the traffic model. One thread per pixel and block of queries, pixels fastest, so a
warp reads 32 neighbouring pixels of one neighbour: every mask value is read from memory once
per step (a neighbour 16 rows away was read by another block moments earlier and is served from
L2) and written once. :meth:`Plan.traffic` counts those bytes kernel by kernel.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import config, int32, int64

from .pamr import _WITH_CENTRE, OFFSETS

# numba.cuda (numba-cuda: the [gpu] extra), imported by kernels(): it takes 1.4 s to import,
# which the traffic model (Plan) does not need. A module global, because numba's simulator
# swaps the kernels' global ``cuda`` for its own while they run.
cuda: Any = None

# Threads per block of the pixel kernels: 4 warps.
THREADS = 128
# A step splits the queries into blocks until this many threads run (an H100 keeps 132 x 2048
# resident): more threads for a whole-image window, each reading the weights once per block.
TARGET_THREADS = 1 << 18
# The vote runs one block per patch, a thread per pixel: at most 1024 threads, patch ≤ 32.
MAX_PATCH = 32


def bilinear_tables(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Half-pixel bilinear from ``src`` cells to ``dst`` pixels along one axis, as OpenCV's
    INTER_LINEAR computes it: (dst, 2) int64 first and second source cell, (dst, 2) float32
    their weights. Source positions before the first cell or past the last take that cell."""
    f = ((np.arange(dst) + 0.5) * (src / dst) - 0.5).astype(np.float32)
    first = np.floor(f).astype(np.int64)
    f -= first.astype(np.float32)
    outside = (first < 0) | (first >= src - 1)
    f[outside] = 0
    first = np.clip(first, 0, src - 1)
    cells = np.stack([first, np.minimum(first + 1, src - 1)], axis=1)
    return cells, np.stack([np.float32(1) - f, f], axis=1).astype(np.float32)


def bilinear(grid: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(..., gh, gw) float32 -> (..., h, w): the kernels' upsampling in numpy (the tests hold
    the kernels and OpenCV to it)."""
    (ry, wy), (rx, wx) = bilinear_tables(grid.shape[-2], hw[0]), bilinear_tables(grid.shape[-1],
                                                                               hw[1])
    rows = grid[..., rx[:, 0]] * wx[:, 0] + grid[..., rx[:, 1]] * wx[:, 1]
    return rows[..., ry[:, 0], :] * wy[:, 0, None] + rows[..., ry[:, 1], :] * wy[:, 1, None]


@dataclass(frozen=True)
class Plan:
    """One pre-pass run: K windows of h x w pixels, Q queries on a gh x gw patch grid."""

    windows: int
    queries: int
    hw: tuple[int, int]
    grid_hw: tuple[int, int]
    iterations: int
    patch: int
    half: bool = False        # masks and weights stored in fp16
    neighbours: int = 16
    target_threads: int = TARGET_THREADS

    @property
    def dtype(self) -> type:
        return np.float16 if self.half else np.float32

    @property
    def query_blocks(self) -> int:
        """Blocks of queries one step splits into (each block reads the weights once)."""
        pixels = self.windows * self.hw[0] * self.hw[1]
        return max(1, min(self.queries, -(-self.target_threads // pixels)))

    @property
    def mask_buffers(self) -> int:
        """Masks written between the first and the last step, alternating."""
        return min(2, max(0, self.iterations - 1))

    def traffic(self) -> dict[str, int]:
        """Bytes each kernel reads and writes in device memory, from its access pattern (each
        value once; neighbours re-read from cache), summed over the steps."""
        k, q, (h, w), (gh, gw) = self.windows, self.queries, self.hw, self.grid_hw
        size = np.dtype(self.dtype).itemsize
        pixels, masks = k * h * w, k * q * h * w * size
        weights = k * self.neighbours * h * w * size
        logits = k * q * gh * gw * 4
        steps = [logits if i == 0 else masks for i in range(self.iterations)]
        out = {"affinity": pixels * 3 * 4 + weights if self.iterations else 0}
        middle = steps[:-1]
        out["iterate"] = sum(read + weights * self.query_blocks + masks for read in middle)
        last_read = steps[-1] if steps else logits
        out["last"] = last_read + (weights if steps else 0) + pixels * (8 + 4)
        voted = k * (h // self.patch) * (w // self.patch)
        out["vote"] = voted * self.patch ** 2 * (8 + 4) + voted * 8
        return out


@functools.lru_cache(maxsize=8)
def kernels(dilations: tuple[int, ...], patch: int) -> Any:
    """The four kernels for PAMR's ``dilations`` (neighbour offsets in :data:`pamr.OFFSETS`
    order, compile-time constants) and a ``patch``-pixel vote."""
    global cuda
    from numba import cuda
    from numba.cuda import libdevice
    if config.ENABLE_CUDASIM:
        # numba's simulator runs the kernels as Python on numpy scalars, where a * b and a + b
        # are already rounded one at a time (libdevice's functions are stubs there).
        def _mul(a, b):
            return a * b

        def _add(a, b):
            return a + b

        _exp, _sqrt = np.exp, np.sqrt
    else:
        _mul, _add = libdevice.fmul_rn, libdevice.fadd_rn
        _exp, _sqrt = math.exp, math.sqrt
    ring = np.array([(dy * d, dx * d) for d in dilations for dy, dx in OFFSETS], np.int64)
    around = np.array([(dy * d, dx * d) for d in dilations for dy, dx in _WITH_CENTRE],
                      np.int64)
    n, s, cells = len(ring), len(around), patch * patch
    if not 1 <= patch <= MAX_PATCH:
        raise ValueError(f"patch {patch}: the vote kernel takes 1 to {MAX_PATCH} pixels")

    @cuda.jit(device=True)
    def neighbourhood(weights, b, y, x, a, ny, nx):
        """The pixel's weights and its neighbours' rows and columns, borders replicated."""
        h, w = weights.shape[2], weights.shape[3]
        for j in range(n):
            a[j] = np.float32(weights[b, j, y, x])
            ny[j] = min(max(y + ring[j, 0], 0), h - 1)
            nx[j] = min(max(x + ring[j, 1], 0), w - 1)

    @cuda.jit(device=True)
    def upsampled(grid, b, q, y, x, ry, wy, rx, wx):
        """The bilinear mask at (y, x) from the (K, Q, gh, gw) logits: rows, then columns."""
        top, bottom, left, right = ry[y, 0], ry[y, 1], rx[x, 0], rx[x, 1]
        r0 = _add(_mul(grid[b, q, top, left], wx[x, 0]), _mul(grid[b, q, top, right], wx[x, 1]))
        r1 = _add(_mul(grid[b, q, bottom, left], wx[x, 0]),
                  _mul(grid[b, q, bottom, right], wx[x, 1]))
        return _add(_mul(r0, wy[y, 0]), _mul(r1, wy[y, 1]))

    @cuda.jit(device=True)
    def refined(grid, src, from_grid, b, q, a, ny, nx, ry, wy, rx, wx):
        """One PAMR step at a pixel: Σ a_j · m(neighbour j) in neighbour order, from 0."""
        acc = np.float32(0)
        for j in range(n):
            if from_grid:
                m = upsampled(grid, b, q, ny[j], nx[j], ry, wy, rx, wx)
            else:
                m = np.float32(src[b, q, ny[j], nx[j]])
            acc = _add(acc, _mul(a[j], m))
        return acc

    @cuda.jit
    def affinity(image, weights):
        """(K, 3, h, w) float32 -> (K, n, h, w) softmax affinities, as pamr.affinities sums
        them: σ over the 3x3 neighbourhoods of every dilation, channel means, softmax."""
        i = cuda.grid(1)
        k, h, w = image.shape[0], image.shape[2], image.shape[3]
        if i >= k * h * w:
            return
        b, p = i // (h * w), i % (h * w)
        y, x = p // w, p % w
        scale = cuda.local.array(3, np.float32)
        sample = cuda.local.array(s, np.float32)
        for c in range(3):
            total = np.float32(0)
            for t in range(s):
                sample[t] = image[b, c, min(max(y + around[t, 0], 0), h - 1),
                                  min(max(x + around[t, 1], 0), w - 1)]
                total = _add(total, sample[t])
            mean = total / np.float32(s)
            var = np.float32(0)
            for t in range(s):
                var = _add(var, _mul(sample[t] - mean, sample[t] - mean))
            var = var / np.float32(s - 1)
            scale[c] = _add(np.float32(1e-8), _mul(np.float32(0.1), _sqrt(var)))
        logit = cuda.local.array(n, np.float32)
        peak = np.float32(-np.inf)
        for j in range(n):
            yj, xj = min(max(y + ring[j, 0], 0), h - 1), min(max(x + ring[j, 1], 0), w - 1)
            acc = -abs(image[b, 0, y, x] - image[b, 0, yj, xj]) / scale[0]
            for c in range(1, 3):
                acc = _add(acc, -abs(image[b, c, y, x] - image[b, c, yj, xj]) / scale[c])
            logit[j] = acc / np.float32(3)
            peak = max(peak, logit[j])
        total = np.float32(0)
        for j in range(n):
            logit[j] = _exp(logit[j] - peak)
            total = logit[j] if j == 0 else _add(total, logit[j])
        for j in range(n):
            weights[b, j, y, x] = logit[j] / total

    @cuda.jit
    def iterate(grid, src, from_grid, weights, dst, ry, wy, rx, wx):
        """One PAMR step into ``dst`` (K, Q, h, w); grid y: window and block of queries."""
        p = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        k, q, h, w = dst.shape
        if p >= h * w:
            return
        blocks = cuda.gridDim.y // k
        b, block = cuda.blockIdx.y // blocks, cuda.blockIdx.y % blocks
        per = -(-q // blocks)
        y, x = p // w, p % w
        a = cuda.local.array(n, np.float32)
        ny = cuda.local.array(n, int64)
        nx = cuda.local.array(n, int64)
        neighbourhood(weights, b, y, x, a, ny, nx)
        for c in range(block * per, min(q, (block + 1) * per)):
            dst[b, c, y, x] = refined(grid, src, from_grid, b, c, a, ny, nx, ry, wy, rx, wx)

    @cuda.jit
    def last(grid, src, from_grid, steps, weights, scale, argmax, maxprob, ry, wy, rx, wx):
        """The last step (none when ``steps`` is 0: then the upsampled logits) times ``scale``:
        each pixel's first largest query and 1 / Σ exp(z − max), the softmax's largest
        probability, summed online (rescaled when the maximum moves)."""
        i = cuda.grid(1)
        k, h, w = argmax.shape
        if i >= k * h * w:
            return
        b, p = i // (h * w), i % (h * w)
        y, x = p // w, p % w
        a = cuda.local.array(n, np.float32)
        ny = cuda.local.array(n, int64)
        nx = cuda.local.array(n, int64)
        if steps:
            neighbourhood(weights, b, y, x, a, ny, nx)
        best, peak, total = 0, np.float32(0), np.float32(0)
        for c in range(grid.shape[1]):
            if steps:
                m = refined(grid, src, from_grid, b, c, a, ny, nx, ry, wy, rx, wx)
            else:                           # no PAMR step: the upsampled logits themselves
                m = upsampled(grid, b, c, y, x, ry, wy, rx, wx)
            z = _mul(m, scale)
            if c == 0:
                peak, total = z, np.float32(1)
            elif z > peak:
                total = _add(_mul(total, _exp(peak - z)), np.float32(1))
                best, peak = c, z
            else:
                total = _add(total, _exp(z - peak))
        argmax[b, y, x] = best
        maxprob[b, y, x] = np.float32(1) / total

    @cuda.jit
    def vote(argmax, maxprob, temp_thd, labels):
        """One block per patch, a thread per pixel: the most frequent pixel label (0 where the
        probability < temp_thd), the smallest on ties."""
        k, gh, gw = labels.shape
        b, cell = cuda.blockIdx.x // (gh * gw), cuda.blockIdx.x % (gh * gw)
        t = cuda.threadIdx.x
        y, x = (cell // gw) * patch + t // patch, (cell % gw) * patch + t % patch
        own = cuda.shared.array(cells, int64)
        counts = cuda.shared.array(cells, int32)
        own[t] = 0 if maxprob[b, y, x] < temp_thd else argmax[b, y, x]
        cuda.syncthreads()
        count = 0
        for j in range(cells):
            if own[j] == own[t]:
                count += 1
        counts[t] = count
        cuda.syncthreads()
        if t == 0:
            best, most = own[0], counts[0]
            for j in range(1, cells):
                if counts[j] > most or (counts[j] == most and own[j] < best):
                    best, most = own[j], counts[j]
            labels[b, cell // gw, cell % gw] = best

    return Kernels(affinity, iterate, last, vote)


@dataclass(frozen=True)
class Kernels:
    affinity: Any
    iterate: Any
    last: Any
    vote: Any


def run(kernels_: Kernels, plan: Plan, logits: Any, windows: Any, out: tuple[Any, Any, Any],
        scratch: tuple[Any, ...], tables: tuple[Any, ...], scale: float, temp_thd: float,
        stream: Any) -> None:
    """Launch the pre-pass on ``stream`` (nothing waits for it here).

    logits (K, Q, gh, gw) float32 and windows (K, 3, h, w) float32: device arrays (numpy in the
    simulator); out: argmax (K, h, w) int64, maxprob (K, h, w) float32, patch labels
    (K, gh', gw') int64 (h // patch, w // patch); scratch: the (K, 16, h, w) weights and
    :attr:`Plan.mask_buffers` (K, Q, h, w) masks of :attr:`Plan.dtype`; tables:
    :func:`bilinear_tables` of rows and columns (ry, wy, rx, wx) on the device.
    """
    argmax, maxprob, labels = out
    weights, masks = scratch[0], scratch[1:]
    k, (h, w) = plan.windows, plan.hw
    pixels = -(-k * h * w // THREADS)
    if plan.iterations:
        kernels_.affinity[pixels, THREADS, stream](windows, weights)
    src, from_grid = weights, 1            # weights: a placeholder the first step never reads
    for i in range(plan.iterations - 1):
        dst = masks[i % 2]
        kernels_.iterate[(-(-h * w // THREADS), k * plan.query_blocks), THREADS, stream](
            logits, src, from_grid, weights, dst, *tables)
        src, from_grid = dst, 0
    kernels_.last[pixels, THREADS, stream](logits, src, from_grid, min(1, plan.iterations),
                                           weights, np.float32(scale), argmax, maxprob, *tables)
    if labels.size:
        kernels_.vote[labels.size, plan.patch ** 2, stream](argmax, maxprob,
                                                            np.float32(temp_thd), labels)
