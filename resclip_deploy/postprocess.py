"""From averaged query logits to class labels and probabilities (docs/method.md §2.6). numpy only.

Works channel-last, (H, W, Q), so each pixel's queries are contiguous. Large outputs are made in
query chunks (aligned to classes) so memory stays within a budget however big the image is;
small ones take a single chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .geometry import resize_bilinear_hwc

# Working memory for the full-resolution output, beyond the results themselves: the resized
# logits of one query chunk; per-pixel reductions then run in row bands of about BAND_BYTES.
OUTPUT_BUDGET_BYTES = 256 << 20
BAND_BYTES = 16 << 20


@dataclass
class Segmentation:
    """labels: (H0, W0) int32 class index; probs: (C, H0, W0) float32 summing to 1 over C (None
    when not asked for); timings: seconds per stage."""

    labels: np.ndarray
    probs: Optional[np.ndarray]
    class_names: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)


def class_starts(query_to_class: np.ndarray) -> np.ndarray:
    """First query of each class; queries must be grouped by class (a Vocabulary's are)."""
    q2c = np.asarray(query_to_class)
    assert np.all(np.diff(q2c) >= 0), "queries must be ordered by class"
    return np.flatnonzero(np.r_[True, q2c[1:] != q2c[:-1]])


def query_chunks(starts: np.ndarray, num_queries: int, max_queries: int) -> list[tuple[int, int]]:
    """Split [0, Q) at class starts into runs of at most ``max_queries`` (a class that alone is
    larger keeps a run of its own)."""
    bounds = [*(int(b) for b in starts), num_queries]
    chunks, begin = [], 0
    for prev, end in zip(bounds[:-1], bounds[1:]):
        if end - begin > max_queries and prev > begin:
            chunks.append((begin, prev))
            begin = prev
    chunks.append((begin, num_queries))
    return chunks


def finalize(canvas: np.ndarray, out_hw: tuple[int, int], query_to_class: np.ndarray,
             class_names: tuple[str, ...], logit_scale: float, prob_thd: float,
             with_probs: bool = True, budget: int = OUTPUT_BUDGET_BYTES) -> Segmentation:
    """(H, W, Q) averaged cosine logits -> Segmentation at the original size ``out_hw``.

    Bilinear to ``out_hw``, softmax(logit_scale·x) over queries, max over each class's synonyms,
    first argmax, label 0 where the best class probability < prob_thd, then the class
    probabilities renormalised to sum 1.
    """
    h0, w0 = out_hw
    q = canvas.shape[2]
    starts = class_starts(query_to_class)
    num_classes = len(class_names)
    chunks = query_chunks(starts, q, max(1, budget // (h0 * w0 * 4)))
    scale = np.float32(logit_scale)

    def scaled(c0: int, c1: int) -> np.ndarray:
        part = canvas[:, :, c0:c1]
        if part.shape[:2] == tuple(out_hw):
            return part * scale
        part = resize_bilinear_hwc(part, out_hw)
        part *= scale
        return part

    cached = scaled(0, q) if len(chunks) == 1 else None
    # Without probabilities or a threshold, labels need no softmax: exp is monotonic.
    softmax = with_probs or prob_thd > 0
    if softmax:
        peak = cached.max(axis=2) if cached is not None else scaled(*chunks[0]).max(axis=2)
        for c0, c1 in chunks[1:]:
            np.maximum(peak, scaled(c0, c1).max(axis=2), out=peak)
    total = np.zeros((h0, w0), dtype=np.float32)
    best = np.full((h0, w0), -np.inf, dtype=np.float32)
    labels = np.zeros((h0, w0), dtype=np.int32)
    probs = np.empty((num_classes, h0, w0), dtype=np.float32) if with_probs else None
    for c0, c1 in chunks:
        z = cached if cached is not None else scaled(c0, c1)
        local = starts[(starts >= c0) & (starts < c1)] - c0
        first = int(np.searchsorted(starts, c0 + local[0]))
        band = max(1, BAND_BYTES // (w0 * (c1 - c0) * 4))
        for r0 in range(0, h0, band):
            rows = slice(r0, r0 + band)
            _reduce_band(z[rows], local, first, peak[rows] if softmax else None, total[rows],
                         best[rows], labels[rows],
                         None if probs is None else probs[:, rows])
    if prob_thd > 0:
        labels[best / total < np.float32(prob_thd)] = 0
    if probs is not None:
        probs /= total
        probs /= probs.sum(axis=0, keepdims=True)
    return Segmentation(labels, probs, tuple(class_names))


def _reduce_band(z: np.ndarray, local_starts: np.ndarray, first: int,
                 peak: Optional[np.ndarray], total: np.ndarray, best: np.ndarray,
                 labels: np.ndarray, probs: Optional[np.ndarray]) -> None:
    """One row band of one query chunk, in place: softmax numerators (when ``peak`` is given),
    max over each class's synonyms, running best class. z: (rows, W0, chunk) scaled logits."""
    if peak is not None:
        z -= peak[:, :, None]
        np.exp(z, out=z)
        total += z.sum(axis=2)
    # (rows, W0, classes): max over each class's synonyms (nothing to do without synonyms)
    cls = z if len(local_starts) == z.shape[2] else np.maximum.reduceat(z, local_starts, axis=2)
    arg = cls.argmax(axis=2)
    top = np.take_along_axis(cls, arg[:, :, None], axis=2)[:, :, 0]
    better = top > best                     # strict: an earlier chunk keeps its ties
    np.copyto(labels, arg + first, where=better, casting="unsafe")
    np.copyto(best, top, where=better)
    if probs is not None:
        probs[first:first + cls.shape[2]] = cls.transpose(2, 0, 1)
