"""The SFR pre-pass's PAMR on the CPU, from the patch logits to softmax's exponent: the compiled
kernel (pamr_kernel, numba) where it can run, scipy's sparse product (pamr) otherwise, with the
same numbers. Here, not in pamr.py, because the kernel is built on pamr's pieces."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, Optional

import numpy as np

from .pamr import QUERY_BLOCK, affinities, as_matrix, pamr, upsampled_block


def compiled_kernel() -> Any:
    """The pamr_kernel module, or None where numba cannot be imported."""
    try:
        from . import pamr_kernel
    except ImportError:
        return None
    return pamr_kernel


def refined_scores(grid: np.ndarray, image: np.ndarray, dilations: tuple[int, ...],
                   iterations: int, scale: float, pool: Optional[Executor] = None,
                   tasks: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(gh, gw, Q) float32 logits guided by the (3, h, w) image -> (h·w,) int64 argmax query
    and (h·w, Q) float32 scores: the logits upsampled bilinearly to (h, w), refined by PAMR,
    times ``scale``, minus each pixel's maximum (softmax's exponent, all ≤ 0).

    The compiled kernel (pamr_kernel) computes it; scipy's :func:`pamr` gives the same numbers
    where numba is missing. ``tasks``: parallel tasks on ``pool``.
    """
    h, w = image.shape[1:]
    aff = affinities(image, dilations)
    kernel = compiled_kernel()
    if kernel is not None and tuple(dilations) == kernel.DILATIONS:
        z = kernel.scaled_refinement(grid, aff, iterations, scale, pool, tasks)
    else:
        q = grid.shape[2]
        up = np.concatenate([upsampled_block(grid, b, (h, w))
                             for b in range(0, q, QUERY_BLOCK)], axis=1)[:, :q]
        z = pamr(np.ascontiguousarray(up), as_matrix(aff, dilations), iterations, pool, tasks)
        z *= np.float32(scale)
    best = z.argmax(axis=1)
    z -= np.take_along_axis(z, best[:, None], axis=1)
    return best, z
