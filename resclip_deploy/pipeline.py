"""The per-image flow shared by the torch reference and the ONNX runtime (numpy only).

Networks differ (torch modules or ONNX sessions); everything around them is here: resize,
windows, the SFR step between the two network halves, upsampling, merging and the output.
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from . import geometry, sfr
from .errors import cpus
from .prepass import refined_scores
from .params import PAMR_DILATIONS, PAMR_ITERATIONS, ResCLIPParams
from .postprocess import Segmentation, finalize
from .vocab import Vocabulary


def prepass_probs(logits: np.ndarray, image: np.ndarray, logit_scale: float,
                  pool: Optional[ThreadPoolExecutor], blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """SFR pre-pass of one window (docs/method.md §5): (Q, gh, gw) logits, (3, h, w) normalised
    window -> (h, w) int64 argmax query and (h, w) float32 its probability.

    Bilinear to the window size, PAMR guided by the window, softmax(logit_scale·x) over queries.
    PAMR runs as ``blocks`` parallel tasks on ``pool`` when given: how a single window
    (whole-image mode) uses every core.
    """
    h, w = image.shape[1:]
    best, z = refined_scores(logits.transpose(1, 2, 0), image, PAMR_DILATIONS, PAMR_ITERATIONS,
                             logit_scale, pool, blocks)
    # softmax's largest value is exp(0) / Σ exp(s·(z − max)): argmax and max probability without
    # normalising the (h·w, Q) array.
    np.exp(z, out=z)
    return best.reshape(h, w), (np.float32(1) / z.sum(axis=1)).reshape(h, w)


@dataclass
class SFRStep:
    """CPU part of SFR for K windows: prepass_argmax / prepass_maxprob (K, h, w), grids
    (K, gh, gw) patch labels, matrices (K, T, T) S, bias (K, T, T) float32 fp16-rounded S/max S
    for the last block."""

    prepass_argmax: np.ndarray
    prepass_maxprob: np.ndarray
    grids: np.ndarray
    matrices: np.ndarray
    bias: np.ndarray


def sfr_schedule(windows: int, workers: int) -> tuple[int, int]:
    """(windows in flight, PAMR tasks per window) for ``windows`` windows on ``workers``
    threads: every thread busy whatever the count.

    As many windows as threads or more: one whole window per thread (fastest: nothing to join).
    Fewer (e.g. 6 windows on 16 cores, or one whole-image window): all windows at once, each
    split into ⌈workers / windows⌉ tasks.
    """
    if windows >= workers:
        return workers, 1
    return windows, -(-workers // windows)


def prepass_step(prepass_logits: np.ndarray, windows: np.ndarray, params: ResCLIPParams,
                 patch: int, workers: Optional[int] = None,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(K, Q, N) pre-pass logits, (K, 3, h, w) windows -> pre-pass argmax and max probability
    (K, h, w), patch labels (K, gh, gw).

    ``workers``: threads for PAMR (default: one per CPU core), scheduled by
    :func:`sfr_schedule`.
    """
    k, q = prepass_logits.shape[:2]
    gh, gw = windows.shape[2] // patch, windows.shape[3] // patch
    grids = prepass_logits.reshape(k, q, gh, gw)
    workers = workers or cpus()
    in_flight, blocks = sfr_schedule(k, workers)
    # Windows run on their own threads, which only wait while their PAMR tasks run on the
    # shared pool: a window never waits for a pool thread held by another window (no deadlock).
    with ThreadPoolExecutor(max_workers=workers) as rows, \
            ThreadPoolExecutor(max_workers=in_flight) as outer:
        pool = rows if blocks > 1 else None
        pre = list(outer.map(lambda i: prepass_probs(grids[i], windows[i], params.logit_scale,
                                                     pool, blocks), range(k)))
    argmax = np.stack([a for a, _ in pre])
    maxprob = np.stack([m for _, m in pre])
    labels = sfr.pixel_labels(argmax, maxprob, params.temp_thd)
    return argmax, maxprob, np.stack([sfr.patch_labels(lab, patch, q) for lab in labels])


def sfr_step(prepass_logits: np.ndarray, windows: np.ndarray, params: ResCLIPParams,
             patch: int, workers: Optional[int] = None) -> SFRStep:
    """(K, Q, N) pre-pass logits, (K, 3, h, w) windows -> :class:`SFRStep`, all in numpy."""
    argmax, maxprob, patches = prepass_step(prepass_logits, windows, params, patch, workers)
    mats = np.stack([sfr.sfr_matrix(g, params.connectivity, params.gaussian_std)
                     for g in patches])
    return SFRStep(argmax, maxprob, patches, mats, np.stack([sfr.sfr_bias(m) for m in mats]))


class Timings(dict):
    """Seconds per named stage; ``with times("encoder"): ...`` adds to a stage."""

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[stage] = self.get(stage, 0.0) + time.perf_counter() - start


WindowRunner = Callable[[np.ndarray, Timings], np.ndarray]


@dataclass
class Prepared:
    """One image ready for the networks: windows (K, 3, h, w) float32 of the normalised input,
    or (K, h, w, 3) uint8 crops of the resized image when a graph normalises them."""

    windows: np.ndarray
    boxes: np.ndarray
    input_hw: tuple[int, int]
    image_hw: tuple[int, int]

    @property
    def window_hw(self) -> tuple[int, int]:
        shape = self.windows.shape
        return (shape[1], shape[2]) if self.windows.dtype == np.uint8 else (shape[2], shape[3])


def prepare(rgb: np.ndarray, params: ResCLIPParams, patch: int,
            norm: Optional[geometry.PixelNorm]) -> Prepared:
    """RGB uint8 (H0, W0, 3) -> resized, normalised windows (docs/method.md §2.1, §2.2);
    ``norm=None``: uint8 crops, normalised later by the ``normalise`` graph."""
    resized = geometry.resize_input(rgb, params.short_side, params.long_side_max)
    hw = resized.shape[:2]
    geometry.check_input_size(hw, patch)
    boxes = geometry.window_boxes(hw[0], hw[1], params.mode, params.crop, params.stride)
    if norm is None:
        crops = np.stack([resized[y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    else:
        crops = geometry.crop_batch(geometry.normalise(resized, norm), boxes)
    return Prepared(crops, boxes, hw, rgb.shape[:2])


def output_numpy(prepared: Prepared, logits: np.ndarray, params: ResCLIPParams, patch: int,
           vocab: Vocabulary, with_probs: bool, times: Timings) -> Segmentation:
    """(K, Q, gh·gw) window logits -> Segmentation at the original size."""
    with times("merge"):
        k, q = logits.shape[:2]
        gh, gw = (side // patch for side in prepared.window_hw)
        grids = logits.transpose(0, 2, 1).reshape(k, gh, gw, q)
        canvas = geometry.merge_windows(grids, prepared.boxes, prepared.input_hw)
    with times("output"):
        seg = finalize(canvas, prepared.image_hw, np.array(vocab.query_to_class),
                       vocab.class_names, params.logit_scale, params.prob_thd, with_probs)
    seg.timings = dict(times)
    return seg


def segment_image(rgb: np.ndarray, params: ResCLIPParams, patch: int, norm: geometry.PixelNorm,
                  vocab: Vocabulary, run_windows: WindowRunner,
                  with_probs: bool = True) -> Segmentation:
    """RGB uint8 (H0, W0, 3) -> Segmentation at (H0, W0), with per-stage timings.

    ``run_windows``: (K, 3, h, w) normalised windows, timings -> (K, Q, gh·gw) cosine logits.
    """
    times = Timings()
    with times("preprocess"):
        prepared = prepare(rgb, params, patch, norm)
    logits = run_windows(prepared.windows, times)
    return output_numpy(prepared, logits, params, patch, vocab, with_probs, times)
