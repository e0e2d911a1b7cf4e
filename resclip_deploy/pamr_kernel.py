"""The SFR pre-pass's refinement as a compiled kernel (numba): bilinear upsampling into a layout
of its own, PAMR's iterations, and softmax's exponent; the same sums in the same order as
:func:`prepass.refined_scores`' scipy path, so the results are bit-identical; on one 224 x 224
window with 150 queries that path takes 0.43x scipy's time on one core, 0.31x on two.

Why a layout of its own. Every neighbour of a pixel lies 8 or 16 pixels away in each axis, so
away from the borders pixel (y, x) only ever reads pixels with its own (y mod 8, x mod 8). The
kernel stores the mask as those 64 residue sub-grids (each with the replicate-padded border as a
two-cell halo), where the 16 neighbours become ±1 and ±2 cells of one small sub-grid: the rows a
pixel reads stay in L1 cache instead of streaming 33 image rows of the whole (h·w, Q) mask from
L3, which is what bounds scipy's sparse product. Queries go 16 at a time (one AVX-512 register,
two AVX2 registers), every step of one block of 16 (upsampling, all iterations) before the next:
a block's two buffers (2 x 4 MB for a 224 x 224 window) stay in cache and blocks run on threads
without a join. Four neighbouring cells are computed together, so a vector loaded once serves
every one of them that reads it (36 loads for 4 cells instead of 64). Each output is
((0 + a0·m0) + a1·m1) + ... in neighbour order with separate multiplies and adds, exactly as
scipy's CSR product forms it (AMD Zen 4 runs the adds beside the multiplies: a fused
multiply-add, which would end the bit-identity, measured the same best time).
"""

from __future__ import annotations

import functools
from concurrent.futures import Executor
from typing import Optional

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .pamr import OFFSETS, QUERY_BLOCK, upsampled_block

LANES = QUERY_BLOCK  # queries per block: one vector of the kernel
HALO = 2            # cells of padding around each residue sub-grid (dilation 16 = 2 cells)
STEP = 8            # the smaller dilation: residues are taken mod 8
CELLS = 4           # output cells per kernel step (8 spills registers: 25 % slower)
DILATIONS = (8, 16)  # what the kernel is built for (PAMR's); prepass.refined_scores checks
# Each neighbour as (sub-grid rows, cells) away: a compile-time constant of the kernel, so that
# the cells of one step share the vectors they read.
NEIGHBOURS = tuple((dy * d // STEP, dx * d // STEP) for d in DILATIONS for dy, dx in OFFSETS)


@functools.lru_cache(maxsize=16)
def layout(h: int, w: int) -> dict[str, np.ndarray]:
    """Index tables of the residue layout of an (h, w) window (see the module docstring).

    cols: cells per sub-grid row; cell_pixel: the image pixel each cell holds (clamped: a halo
    cell holds a border pixel); pixel_cell: the cell of each pixel; real_cells / real_pixel:
    the cells that hold pixels, in order (the order of the affinity rows), and their pixels;
    runs: (first cell, count) of those cells along each sub-grid row; halo / halo_src: halo
    cells and the cell they copy.
    """
    pad = HALO * STEP
    rows, cols = -(-(h + 2 * pad) // STEP), -(-(w + 2 * pad) // STEP)
    # an odd row length: sub-grid rows 2 KB apart would share L1 cache sets (7 % slower)
    cols += 1 - cols % 2
    s, i, j = np.meshgrid(np.arange(STEP * STEP), np.arange(rows), np.arange(cols), indexing="ij")
    y = s // STEP + STEP * i - pad
    x = s % STEP + STEP * j - pad
    read = (y < h + pad) & (x < w + pad)              # cells some pixel reads
    real = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    cell_pixel = (np.clip(y, 0, h - 1) * w + np.clip(x, 0, w - 1)).ravel()
    real_cells = np.flatnonzero(real.ravel())          # sub-grid, row, column order
    pixel_cell = np.empty(h * w, np.int64)
    pixel_cell[cell_pixel[real_cells]] = real_cells
    halo = np.flatnonzero((read & ~real).ravel())
    # real cells come in runs along sub-grid rows
    starts = real_cells[np.r_[True, np.diff(real_cells) != 1]]
    counts = np.diff(np.r_[np.flatnonzero(np.r_[True, np.diff(real_cells) != 1]),
                           len(real_cells)])
    return {"cells": np.int64(rows * cols * STEP * STEP), "cols": np.int64(cols),
            "cell_pixel": cell_pixel, "pixel_cell": pixel_cell,
            "real_cells": real_cells, "real_pixel": cell_pixel[real_cells],
            "runs": np.stack([starts, counts], axis=1).astype(np.int64),
            "halo": halo, "halo_src": pixel_cell[cell_pixel[halo]]}


@intrinsic
def _cells(typingctx, dst, src, weights, cell, row, cols, count):
    """dst[cell + c] = Σ_k weights[row + c, k] · src[cell + c + NEIGHBOURS[k]] for c < count
    (a literal): 16-lane vectors, multiply then add, k in order; each source vector loaded
    once for all the cells that read it."""
    if not isinstance(count, types.IntegerLiteral):
        return None                     # numba then asks again with the literal
    n = count.literal_value
    sig = types.void(dst, src, weights, cell, row, cols, count)

    def codegen(context, builder, signature, args):
        dst_v, src_v, w_v, cell_v, row_v, cols_v, _ = args
        vec = ir.VectorType(ir.FloatType(), LANES)
        i64 = ir.IntType(64)
        dst_p, src_p, w_p = (context.make_array(t)(context, builder, v).data
                             for t, v in zip(signature.args[:3], (dst_v, src_v, w_v)))
        dst_p, src_p = (builder.bitcast(p, vec.as_pointer()) for p in (dst_p, src_p))
        splat = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
        row_start: dict[int, ir.Value] = {}
        loaded: dict[tuple[int, int], ir.Value] = {}

        def source(dy: int, dx: int) -> ir.Value:
            if dy not in row_start:
                row_start[dy] = builder.add(cell_v, builder.mul(cols_v, ir.Constant(i64, dy)))
            if (dy, dx) not in loaded:
                at = builder.add(row_start[dy], ir.Constant(i64, dx))
                loaded[dy, dx] = builder.load(builder.gep(src_p, [at]), align=4)
            return loaded[dy, dx]

        acc = [ir.Constant(vec, [0.0] * LANES)] * n
        first = builder.mul(row_v, ir.Constant(i64, len(NEIGHBOURS)))
        for k, (dy, dx) in enumerate(NEIGHBOURS):
            for c in range(n):
                wi = builder.add(first, ir.Constant(i64, c * len(NEIGHBOURS) + k))
                a = builder.load(builder.gep(w_p, [wi]))
                a = builder.shuffle_vector(builder.insert_element(ir.Constant(vec, None), a,
                                                                  ir.Constant(i64, 0)),
                                           ir.Constant(vec, None), splat)
                acc[c] = builder.fadd(acc[c], builder.fmul(a, source(dy, c + dx)))
        for c in range(n):
            at = builder.add(cell_v, ir.Constant(i64, c))
            builder.store(acc[c], builder.gep(dst_p, [at]), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def _iterate(src, dst, weights, runs, cols, halo, halo_src, iterations):
    """All iterations for one block of 16 queries; -> the buffer holding the result."""
    for _ in range(iterations):
        row = 0
        for r in range(runs.shape[0]):
            start, count = runs[r, 0], runs[r, 1]
            j = 0
            while j + CELLS <= count:
                _cells(dst, src, weights, start + j, row, cols, CELLS)
                j += CELLS
                row += CELLS
            while j < count:
                _cells(dst, src, weights, start + j, row, cols, 1)
                j += 1
                row += 1
        for t in range(halo.shape[0]):
            dst[halo[t]] = dst[halo_src[t]]
        src, dst = dst, src
    return src


@njit(nogil=True, cache=True)
def _refine(block, up, real_cells, real_pixel, weights, runs, cols, halo, halo_src,
            iterations):
    """One block: its (h·w, 16) upsampled queries into their cells, then all iterations, the
    result left in ``block``."""
    for i in range(real_cells.shape[0]):
        c, p = real_cells[i], real_pixel[i]
        for lane in range(LANES):
            block[c, lane] = up[p, lane]
    for t in range(halo.shape[0]):
        block[halo[t]] = block[halo_src[t]]
    result = _iterate(block, np.empty_like(block), weights, runs, cols, halo, halo_src,
                      iterations)
    if iterations % 2:
        block[:] = result


@njit(nogil=True, cache=True)
def _scaled(blocks, scale, z, start, stop, cells, pixels):
    """Real cells start..stop-1 (in cell order, which reads the blocks in sequence) into their
    pixels' rows of z, times scale."""
    q = z.shape[1]
    for i in range(start, stop):
        c = cells[i]
        row = z[pixels[i]]
        for b in range(blocks.shape[0]):
            for lane in range(min(LANES, q - b * LANES)):
                row[b * LANES + lane] = blocks[b, c, lane] * scale


@njit(nogil=True, cache=True)
def _weights(affinities, real_pixel):
    """(K, h, w) affinities -> (real cells, K) in cell order."""
    k = affinities.shape[0]
    flat = affinities.reshape(k, -1)
    out = np.empty((real_pixel.shape[0], k), np.float32)
    for i in range(real_pixel.shape[0]):
        for j in range(k):
            out[i, j] = flat[j, real_pixel[i]]
    return out


def scaled_refinement(grid: np.ndarray, affinities: np.ndarray, iterations: int, scale: float,
                      pool: Optional[Executor] = None, tasks: int = 1) -> np.ndarray:
    """(gh, gw, Q) float32 logits, (K, h, w) float32 neighbour affinities of DILATIONS ->
    (h·w, Q) float32 scale · PAMR(bilinear(logits)), for :func:`prepass.refined_scores`.

    With a ``pool``, the work runs as ``tasks`` parallel tasks: blocks of 16 queries (each is
    upsampled and does every iteration, so there is no join between them), then pixels.
    """
    _, h, w = affinities.shape
    q = grid.shape[2]
    t = layout(h, w)
    weights = _weights(np.ascontiguousarray(affinities, dtype=np.float32), t["real_pixel"])
    blocks = np.empty((-(-q // LANES), int(t["cells"]), LANES), np.float32)
    tasks = max(1, tasks) if pool is not None else 1

    def each(fn, items):
        if tasks == 1:
            return [fn(i) for i in items]
        return list(pool.map(fn, items))

    def block(b: int) -> None:
        _refine(blocks[b], upsampled_block(grid, b * LANES, (h, w)), t["real_cells"],
                t["real_pixel"], weights, t["runs"], t["cols"], t["halo"], t["halo_src"],
                iterations)

    each(block, range(len(blocks)))
    z = np.empty((h * w, q), np.float32)
    bounds = np.linspace(0, h * w, tasks + 1).astype(np.int64)
    each(lambda s: _scaled(blocks, np.float32(scale), z, s[0], s[1], t["real_cells"],
                           t["real_pixel"]), zip(bounds[:-1], bounds[1:]))
    return z
