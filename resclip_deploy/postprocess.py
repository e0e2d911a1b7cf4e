"""From averaged query logits to class labels and probabilities (SPEC §2, output). numpy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .geometry import resize_bilinear


@dataclass
class Segmentation:
    """labels: (H0, W0) int32 class index; probs: (C, H0, W0) float32 summing to 1 over C."""

    labels: np.ndarray
    probs: np.ndarray
    class_names: tuple[str, ...]


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def class_probs(query_probs: np.ndarray, query_to_class: np.ndarray,
                num_classes: int) -> np.ndarray:
    """(Q, ...) query probabilities -> (C, ...) per class max over its synonyms."""
    out = np.zeros((num_classes, *query_probs.shape[1:]), dtype=query_probs.dtype)
    for q, c in enumerate(query_to_class):
        np.maximum(out[c], query_probs[q], out=out[c])
    return out


def labels_from_probs(probs: np.ndarray, prob_thd: float) -> np.ndarray:
    """(C, H, W) -> (H, W) int32 first argmax, 0 where the max probability < prob_thd."""
    labels = probs.argmax(axis=0).astype(np.int32)
    if prob_thd > 0:
        labels[probs.max(axis=0) < prob_thd] = 0
    return labels


def finalize(logits: np.ndarray, out_hw: tuple[int, int], query_to_class: np.ndarray,
             class_names: tuple[str, ...], logit_scale: float, prob_thd: float) -> Segmentation:
    """(Q, H, W) averaged cosine logits -> Segmentation at the original size ``out_hw``.

    Bilinear to ``out_hw``, softmax(logit_scale·x) over queries, max over synonyms, first argmax
    with the prob_thd rule, then renormalise the class probabilities to sum 1.
    """
    full = resize_bilinear(logits, out_hw)
    full *= np.float32(logit_scale)
    probs = class_probs(softmax(full, axis=0), np.asarray(query_to_class), len(class_names))
    labels = labels_from_probs(probs, prob_thd)
    probs /= probs.sum(axis=0, keepdims=True)
    return Segmentation(labels, probs, tuple(class_names))
