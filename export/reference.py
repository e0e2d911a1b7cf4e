"""The torch reference pipeline: image -> labels and probabilities, exactly as
docs/method.md describes.

Torch runs the networks (trunk, SFR pre-pass with PAMR, last block); the CPU steps shared with the
ONNX runtime (geometry, SFR matrix, output) come from :mod:`resclip_deploy`. All windows of an
image run as one batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from resclip_deploy.errors import UserError
from resclip_deploy.params import ResCLIPParams
from resclip_deploy.pipeline import Timings, segment_image, sfr_step
from resclip_deploy.postprocess import Segmentation
from resclip_deploy.vocab import Vocabulary

from .clip_loader import LoadedCLIP, load_clip
from .model import ResCLIPVisual
from .text import text_bank

log = logging.getLogger("resclip_deploy")


@dataclass
class WindowOutputs:
    """Per-window results of one batch of K windows (h x w pixels, gh x gw patches, T = N + 1).

    logits: (K, Q, gh, gw) final cosine logits.
    rcs: (K, heads, T, T) RCS map; prepass_argmax / prepass_maxprob: (K, h, w) SFR pre-pass query
    argmax and its probability; patch_labels: (K, gh, gw); sfr_matrix: (K, T, T) S before the
    division by its max. Disabled parts are None.
    """

    logits: np.ndarray
    rcs: Optional[np.ndarray] = None
    prepass_argmax: Optional[np.ndarray] = None
    prepass_maxprob: Optional[np.ndarray] = None
    patch_labels: Optional[np.ndarray] = None
    sfr_matrix: Optional[np.ndarray] = None


class ReferenceSegmenter:
    """ResCLIP in torch on an open_clip ViT. ``device``/``dtype`` place the network; CPU steps
    run in numpy float32."""

    def __init__(self, visual: torch.nn.Module, text_features: np.ndarray, vocab: Vocabulary,
                 params: ResCLIPParams, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        if text_features.shape[0] != len(vocab.queries):
            raise ValueError(f"{text_features.shape[0]} text features for "
                             f"{len(vocab.queries)} queries")
        self.net = ResCLIPVisual(visual, params).to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        # a copy: the caller's array may be read-only (a memory-mapped bank) or change later
        self.text = torch.tensor(text_features, device=self.device, dtype=dtype)
        self.vocab, self.params = vocab, params
        self.patch, self.rcs_blocks, self.norm = self.net.patch, self.net.rcs_blocks, self.net.norm

    @classmethod
    def from_clip(cls, clip: LoadedCLIP, vocab: Vocabulary, params: ResCLIPParams,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  progress: Optional[Callable[[int, int], None]] = None) -> "ReferenceSegmenter":
        clip.model.to(device)
        bank = text_bank(clip.model, clip.tokenizer, vocab.queries, progress=progress)
        return cls(clip.model.visual, bank, vocab, params, device, dtype)

    def _numpy(self, t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
        return None if t is None else t.float().cpu().numpy()

    @torch.inference_mode()
    def window_outputs(self, windows: np.ndarray) -> WindowOutputs:
        """(K, 3, h, w) normalised windows of one size -> :class:`WindowOutputs`."""
        x = torch.tensor(windows, device=self.device, dtype=self.dtype)     # may be read-only
        gh, gw = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        tokens, rcs = self.net.encode(x)
        window = self.net.window(x)
        out = WindowOutputs(logits=np.empty(0), rcs=self._numpy(rcs))
        sfr_bias = None
        if self.params.sfr:
            pre_logits = self._numpy(self.net.head(tokens, rcs, window, None, self.text))
            step = sfr_step(pre_logits, windows, self.params, self.patch)
            sfr_bias = torch.from_numpy(step.bias).to(self.device, self.dtype)
            out.prepass_argmax, out.prepass_maxprob = step.prepass_argmax, step.prepass_maxprob
            out.patch_labels, out.sfr_matrix = step.grids, step.matrices
        logits = self.net.head(tokens, rcs, window, sfr_bias, self.text)
        out.logits = self._numpy(logits).reshape(x.shape[0], -1, gh, gw)
        return out

    def segment(self, rgb: np.ndarray, with_probs: bool = True) -> Segmentation:
        """RGB uint8 (H0, W0, 3) -> Segmentation at (H0, W0)."""
        def run(windows: np.ndarray, times: Timings) -> np.ndarray:
            with times("network"):
                logits = self.window_outputs(windows).logits
            return logits.reshape(windows.shape[0], logits.shape[1], -1)
        return segment_image(rgb, self.params, self.patch, self.norm, self.vocab, run,
                             with_probs)


def torch_device(device: str) -> str:
    """A --device value for the torch reference: 'auto' is CUDA when torch sees a GPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu")
    return device


def reference_segmenter(model_name: str, pretrained: Optional[str], vocab: Vocabulary,
                        params: ResCLIPParams, device: str = "auto") -> ReferenceSegmenter:
    """``resclip-segment --reference``: load the model (open_clip name, hf-hub:, local-dir: or
    a file), build its text bank and place it on ``device``."""
    device = torch_device(device)
    clip = load_clip(model_name, pretrained)
    log.info("text bank: %d queries x 80 templates", len(vocab.queries))
    start = time.perf_counter()
    segmenter = ReferenceSegmenter.from_clip(clip, vocab, params, device=device)
    log.info("text bank built in %.1f s", time.perf_counter() - start)
    return segmenter
