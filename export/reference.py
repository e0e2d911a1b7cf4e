"""The torch reference pipeline: image -> labels and probabilities, exactly as SPEC.md computes.

Torch runs the networks (trunk, SFR pre-pass with PAMR, last block); the CPU steps shared with the
ONNX runtime (geometry, SFR matrix, output) come from :mod:`resclip_deploy`. All windows of an
image run as one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from resclip_deploy import geometry, sfr
from resclip_deploy.params import PAMR_DILATIONS, PAMR_ITERATIONS, ResCLIPParams, rcs_blocks
from resclip_deploy.postprocess import Segmentation, finalize
from resclip_deploy.vocab import Vocabulary

from . import model as M
from .clip_loader import LoadedCLIP
from .pamr import pamr
from .text import text_bank


@dataclass
class WindowOutputs:
    """Per-window results of one batch of K windows (h x w pixels, gh x gw patches, T = N + 1).

    logits: (K, Q, gh, gw) final cosine logits; tokens: (K, T, E) final projected tokens.
    rcs: (K, heads, T, T) RCS map; prepass_argmax / prepass_maxprob: (K, h, w) SFR pre-pass query
    argmax and its probability; patch_labels: (K, gh, gw); sfr_matrix: (K, T, T) S before the
    division by its max. Disabled parts are None.
    """

    logits: np.ndarray
    tokens: np.ndarray
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
        self.visual = visual.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.text = torch.from_numpy(text_features).to(self.device, dtype)
        self.vocab, self.params = vocab, params
        self.patch = int(self.visual.conv1.kernel_size[0])
        depth = len(self.visual.transformer.resblocks)
        self.rcs_blocks = rcs_blocks(params.rcs_layers, depth) if params.rcs else ()

    @classmethod
    def from_clip(cls, clip: LoadedCLIP, vocab: Vocabulary, params: ResCLIPParams,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  progress: Optional[Callable[[int, int], None]] = None) -> "ReferenceSegmenter":
        clip.model.to(device)
        bank = text_bank(clip.model, clip.tokenizer, vocab.queries, progress=progress)
        return cls(clip.model.visual, bank, vocab, params, device, dtype)

    def _attention(self, gh: int, gw: int, sfr_bias: Optional[torch.Tensor],
                   rcs: Optional[torch.Tensor]):
        p = self.params
        return lambda q, k: M.last_block_attention(
            p.method, q, k, gh, gw, p.gaussian_std, sfr_bias, p.sfr_tau, p.sfr_lambda,
            rcs, p.rcs_tau, p.rcs_lambda)

    def _prepass_labels(self, x: torch.Tensor, t: torch.Tensor, rcs: Optional[torch.Tensor],
                        gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
        """SFR pre-pass (SPEC §5): last block without S -> logits -> PAMR -> softmax.

        Returns (K, h, w) argmax query and its probability. PAMR runs one window at a time to
        bound memory at (Q, h, w) tensors.
        """
        p = self.params
        tokens = M.last_block(self.visual, t, self._attention(gh, gw, None, rcs),
                              p.residual_last_block)
        logits = M.patch_logits(tokens, self.text, gh, gw)
        argmaxes, maxprobs = [], []
        for i in range(x.shape[0]):
            up = F.interpolate(logits[i:i + 1], size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
            refined = pamr(up, x[i:i + 1], PAMR_ITERATIONS, PAMR_DILATIONS)
            maxprob, argmax = torch.softmax(refined * p.logit_scale, dim=1).max(dim=1)
            argmaxes.append(argmax[0].cpu().numpy())
            maxprobs.append(maxprob[0].float().cpu().numpy())
        return np.stack(argmaxes), np.stack(maxprobs)

    @torch.inference_mode()
    def forward_windows(self, windows: np.ndarray) -> WindowOutputs:
        """(K, 3, h, w) normalised windows of one size -> :class:`WindowOutputs`."""
        p = self.params
        x = torch.from_numpy(windows).to(self.device, self.dtype)
        gh, gw = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        t, rcs = M.trunk(self.visual, M.embed(self.visual, x), self.rcs_blocks)
        out = WindowOutputs(logits=np.empty(0), tokens=np.empty(0))
        sfr_bias = None
        if p.sfr:
            argmax, maxprob = self._prepass_labels(x, t, rcs, gh, gw)
            labels = sfr.pixel_labels(argmax, maxprob, p.temp_thd)
            grids = np.stack([sfr.patch_labels(lab, self.patch, len(self.vocab.queries))
                              for lab in labels])
            mats = np.stack([sfr.sfr_matrix(g, p.connectivity, p.gaussian_std) for g in grids])
            sfr_bias = torch.from_numpy(np.stack([sfr.sfr_bias(s) for s in mats]))
            sfr_bias = sfr_bias.to(self.device, self.dtype)
            out.prepass_argmax, out.prepass_maxprob = argmax, maxprob
            out.patch_labels, out.sfr_matrix = grids, mats
        tokens = M.last_block(self.visual, t, self._attention(gh, gw, sfr_bias, rcs),
                              p.residual_last_block)
        out.logits = M.patch_logits(tokens, self.text, gh, gw).float().cpu().numpy()
        out.tokens = tokens.float().cpu().numpy()
        out.rcs = None if rcs is None else rcs.float().cpu().numpy()
        return out

    def segment(self, rgb: np.ndarray) -> Segmentation:
        """RGB uint8 (H0, W0, 3) -> Segmentation at (H0, W0)."""
        p = self.params
        x = geometry.preprocess(rgb, p.short_side, p.long_side_max)
        geometry.check_input_size(x.shape[1:], self.patch)
        boxes = geometry.window_boxes(x.shape[1], x.shape[2], p.mode, p.crop, p.stride)
        windows = geometry.crop_batch(x, boxes)
        logits = self.forward_windows(windows).logits
        size = windows.shape[-2:]
        merged = geometry.merge_windows(
            np.stack([geometry.resize_bilinear(w, size) for w in logits]), boxes, x.shape[1:])
        return finalize(merged, rgb.shape[:2], np.array(self.vocab.query_to_class),
                        self.vocab.class_names, p.logit_scale, p.prob_thd)
