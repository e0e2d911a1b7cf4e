"""The per-image flow shared by the torch reference and the ONNX runtime (numpy only).

Networks differ (torch modules or ONNX sessions); everything around them is here: resize,
windows, the SFR step between the two network halves, upsampling, merging and the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import geometry, sfr
from .params import ResCLIPParams
from .postprocess import Segmentation, finalize
from .vocab import Vocabulary


@dataclass
class SFRStep:
    """CPU part of SFR for K windows: grids (K, gh, gw) patch labels, matrices (K, T, T) S,
    bias (K, T, T) float32 fp16-rounded S/max S for the last block."""

    grids: np.ndarray
    matrices: np.ndarray
    bias: np.ndarray


def sfr_step(argmax: np.ndarray, maxprob: np.ndarray, params: ResCLIPParams, patch: int,
             num_queries: int) -> SFRStep:
    """(K, h, w) pre-pass argmax query and probability -> :class:`SFRStep`."""
    labels = sfr.pixel_labels(argmax, maxprob, params.temp_thd)
    grids = np.stack([sfr.patch_labels(lab, patch, num_queries) for lab in labels])
    mats = np.stack([sfr.sfr_matrix(g, params.connectivity, params.gaussian_std) for g in grids])
    return SFRStep(grids, mats, np.stack([sfr.sfr_bias(m) for m in mats]))


def segment_image(rgb: np.ndarray, params: ResCLIPParams, patch: int, vocab: Vocabulary,
                  run_windows: Callable[[np.ndarray], np.ndarray]) -> Segmentation:
    """RGB uint8 (H0, W0, 3) -> Segmentation at (H0, W0).

    ``run_windows``: (K, 3, h, w) normalised windows -> (K, Q, gh·gw) cosine logits.
    """
    x = geometry.preprocess(rgb, params.short_side, params.long_side_max)
    geometry.check_input_size(x.shape[1:], patch)
    boxes = geometry.window_boxes(x.shape[1], x.shape[2], params.mode, params.crop, params.stride)
    windows = geometry.crop_batch(x, boxes)
    h, w = windows.shape[-2:]
    logits = run_windows(windows)
    k, q = logits.shape[:2]
    grid = logits.reshape(k, q, h // patch, w // patch)
    up = np.stack([geometry.resize_bilinear(g, (h, w)) for g in grid])
    merged = geometry.merge_windows(up, boxes, x.shape[1:])
    return finalize(merged, rgb.shape[:2], np.array(vocab.query_to_class), vocab.class_names,
                    params.logit_scale, params.prob_thd)
