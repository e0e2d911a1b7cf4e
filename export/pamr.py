"""PAMR (pixel-adaptive mask refinement) as 16 shifted multiply-adds per iteration (SPEC §5).

The reference materialises (Q, 16, H, W) tensors; this computes the same sums from one replicate-
padded copy per iteration. Neighbour order: dilations in order, offsets (dy, dx) row-major.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def neighbours(x: torch.Tensor, dilations: tuple[int, ...], centre: bool) -> list[torch.Tensor]:
    """(B, C, H, W) -> the neighbour views at d·(dy, dx), replicate borders; with ``centre`` the
    3×3 neighbourhood of each dilation (centre included) instead of the 8 ring cells."""
    h, w = x.shape[-2:]
    pad = max(dilations)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)] if centre else OFFSETS
    return [_shifted(padded, pad, dy * d, dx * d, h, w) for d in dilations for dy, dx in offsets]


def pamr_affinity(image: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """(B, 3, H, W) guide image -> (B, K, H, W) affinities (K = 8 per dilation), softmax over K.

    σ = unbiased std over the 3×3 neighbourhoods of all dilations (centre counted in each);
    a_k = mean over channels of −|x − x_k| / (1e−8 + 0.1·σ).
    """
    std = torch.stack(neighbours(image, dilations, centre=True), dim=2).std(dim=2)
    ring = torch.stack(neighbours(image, dilations, centre=False), dim=2)   # (B, 3, K, H, W)
    aff = -(image[:, :, None] - ring).abs() / (1e-8 + 0.1 * std[:, :, None])
    return torch.softmax(aff.mean(dim=1), dim=1)


def pamr(mask: torch.Tensor, image: torch.Tensor, iterations: int,
         dilations: tuple[int, ...]) -> torch.Tensor:
    """Refine (B, Q, H, W) ``mask`` guided by ``image``: m ← Σ_k a_k · m(neighbour k)."""
    aff = pamr_affinity(image, dilations)
    for _ in range(iterations):
        nbs = neighbours(mask, dilations, centre=False)
        out = nbs[0] * aff[:, :1]
        for k in range(1, len(nbs)):
            out.addcmul_(nbs[k], aff[:, k:k + 1])   # in place: no (Q, H, W) temporaries
        mask = out
    return mask
