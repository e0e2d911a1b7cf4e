"""ResCLIP on an open_clip ViT in torch: trunk with attention maps, RCS, the patched last block.

Each paper formula is one small function; the method only picks the base attention logits, and the
RCS/SFR mixing is :func:`blend` written once. Nothing branches on tensor values, so the same code
traces to ONNX. Device and dtype follow the inputs; there is no ``.cuda()``.

Shapes: B crops, T = N + 1 tokens (CLS first), D width, H heads of width d = D / H (64 for
OpenAI's ViTs, 80 for ViT-H-14, 88 for ViT-g-14, 104 for ViT-bigG-14), E embedding size,
Q text queries, (gh, gw) patch grid.

Precision follows the weights: with fp16 weights the matrix products run in fp16 while LayerNorm,
softmax, the RCS/SFR blends, the naclip window and the cosine logits stay in fp32 (the casts are
no-ops for fp32 weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resclip_deploy.geometry import CLIP_PIXEL_NORM, PixelNorm
from resclip_deploy.params import ResCLIPParams, rcs_blocks

# open_clip's OpenAI normalisation (0..1 units), which CLIP_PIXEL_NORM writes rounded.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def pixel_norm(visual: nn.Module) -> PixelNorm:
    """The model's own input normalisation in 0..255 units (open_clip's ``preprocess_cfg``;
    OpenAI's when the model has none). OpenAI's is given as the authors' configs round it."""
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean, std = tuple(cfg.get("mean", _OPENAI_MEAN)), tuple(cfg.get("std", _OPENAI_STD))
    if all(abs(a - b) < 1e-6 for a, b in zip(mean + std, _OPENAI_MEAN + _OPENAI_STD)):
        return CLIP_PIXEL_NORM
    return PixelNorm(tuple(255.0 * m for m in mean), tuple(255.0 * s for s in std))

def blend(a: torch.Tensor, b: torch.Tensor, tau: float, lam: float) -> torch.Tensor:
    """τ·((1−λ)·a + λ·b): RCS (on probabilities) and SFR (on logits) mixing."""
    return tau * ((1 - lam) * a + lam * b)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads).transpose(1, 2)   # (B, H, T, d/H)


def qkv(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """ln_1 output (B, T, D) -> q, k, v each (B, H, T, d), biases included."""
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return tuple(split_heads(t, attn.num_heads) for t in (q, k, v))


def layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm computed in fp32, returned in the input's dtype."""
    y = F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
    return y.to(x.dtype)


def attention_output(attn: nn.MultiheadAttention, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, T, T) weights, (B, H, T, d) values -> out_proj of the joined heads (B, T, D)."""
    y = (p.to(v.dtype) @ v).transpose(1, 2)                     # (B, T, H, d)
    return attn.out_proj(y.reshape(y.shape[0], y.shape[1], -1))


def base_logits(method: str, q: torch.Tensor, k: torch.Tensor) -> list[torch.Tensor]:
    """Last-block attention logits by method (docs/method.md §4); sclip has two matrices.

    The scale is 1/√d for the model's own head width d (q's last axis, a static size).
    """
    scale = q.shape[-1] ** -0.5
    if method == "naclip":
        return [(k @ k.transpose(-1, -2)).float() * scale]
    if method == "clearclip":
        return [(q @ q.transpose(-1, -2)).float() * scale]
    if method == "clip":
        return [((q * scale) @ k.transpose(-1, -2)).float()]
    if method == "sclip":
        return [(q @ q.transpose(-1, -2)).float() * scale,
                (k @ k.transpose(-1, -2)).float() * scale]
    raise ValueError(f"unknown method {method!r}")


def naclip_window(gh: int, gw: int, std: float, like: torch.Tensor) -> torch.Tensor:
    """Ω (T, T): exp(−((r_p−r_q)² + (c_p−c_q)²) / (2σ²)) over grid cells, zero CLS row/column.

    Built from aranges (no index arithmetic on a symbolic width) so it traces with dynamic grids.
    """
    rows = torch.arange(gh, device=like.device, dtype=torch.float32)
    cols = torch.arange(gw, device=like.device, dtype=torch.float32)
    r = rows[:, None].expand(gh, gw).reshape(-1)
    c = cols[None, :].expand(gh, gw).reshape(-1)
    dist2 = (r[:, None] - r[None, :]) ** 2 + (c[:, None] - c[None, :]) ** 2
    omega = torch.exp(-dist2 / (2 * std ** 2))
    return F.pad(omega, (1, 0, 1, 0))


def _cubic_taps(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cubic convolution weights (A = -0.75, torch's bicubic) of taps -1, 0, 1, 2 at offset t."""
    a = -0.75

    def near(x: torch.Tensor) -> torch.Tensor:
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def bicubic_matrix(n_out: int, n_in: int, scale: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of a 1-D bicubic resize, align_corners=False, by ``scale``.

    src = (i + 0.5) / scale − 0.5 (not clamped), taps clamped to the border, as torch's bicubic
    with a given scale factor; scale 1 gives the identity exactly.
    """
    i = torch.arange(n_out, dtype=torch.float64)
    src = (i + 0.5) / scale - 0.5
    x0 = torch.floor(src)
    cols = torch.arange(n_in, dtype=torch.float64)
    out = torch.zeros(n_out, n_in, dtype=torch.float64)
    for m, w in zip((-1, 0, 1, 2), _cubic_taps(src - x0)):
        idx = torch.clamp(x0 + m, 0, n_in - 1)
        out = out + w[:, None] * (idx[:, None] == cols[None, :]).to(torch.float64)
    return out


def _size_tensor(n: int) -> torch.Tensor:
    # A possibly symbolic size as a float64 tensor, without a Python branch on its value.
    return torch.arange(n, dtype=torch.float64).max() + 1


def resize_pos_embed(pos: torch.Tensor, grid: int, gh: int, gw: int) -> torch.Tensor:
    """(1 + g², D) table -> (1 + gh·gw, D) for a gh x gw patch grid (docs/method.md §3).

    The checkpoint grid keeps its table; any other grid is resized bicubically with scale
    ((gh+0.1)/g, (gw+0.1)/g), the reference's factor used as given (a size=(gh, gw) resize
    differs by ~1e-2). Written as two small matrix products so that it traces with symbolic
    sizes and no branch: the scale becomes exactly 1 on the checkpoint grid.
    """
    h, w = _size_tensor(gh), _size_tensor(gw)
    keep = ((h == grid) & (w == grid)).to(torch.float64)
    rows = bicubic_matrix(gh, grid, keep + (1 - keep) * (h + 0.1) / grid).to(pos.dtype)
    cols = bicubic_matrix(gw, grid, keep + (1 - keep) * (w + 0.1) / grid).to(pos.dtype)
    table = pos[1:].reshape(grid, grid, -1)
    table = torch.einsum("ih,hwd,jw->ijd", rows, table, cols)            # (gh, gw, D)
    return torch.cat([pos[:1], table.reshape(gh * gw, -1)], dim=0)


def embed(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, h, w) normalised crops -> ln_pre tokens (B, 1 + gh·gw, D)."""
    patch = visual.conv1.kernel_size[0]
    gh, gw = x.shape[-2] // patch, x.shape[-1] // patch
    grid = visual.grid_size[0]
    t = visual.conv1(x.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)   # (B, N, D)
    cls = visual.class_embedding.to(t.dtype).expand(t.shape[0], 1, -1)
    t = torch.cat([cls, t], dim=1)
    pos = resize_pos_embed(visual.positional_embedding.float(), grid, gh, gw).to(t.dtype)
    return layer_norm(visual.ln_pre, t + pos)


def trunk(visual: nn.Module, x: torch.Tensor,
          rcs_blocks: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocks 0..L−2 as standard pre-LN blocks.

    Returns the tokens entering the last block (B, T, D) and the RCS map R (B, H, T, T): the
    element-wise mean of the softmaxed attention maps of ``rcs_blocks`` (None when empty).
    """
    kept = []
    for i, blk in enumerate(visual.transformer.resblocks[:-1]):
        q, k, v = qkv(blk.attn, layer_norm(blk.ln_1, x))
        p = torch.softmax(((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).float(), dim=-1)
        x = x + blk.ls_1(attention_output(blk.attn, p, v))
        x = x + blk.ls_2(blk.mlp(layer_norm(blk.ln_2, x)))
        if i in rcs_blocks:
            kept.append(p)
    # A running sum, not stack().mean(): the stacked copy of L·T² maps cost ONNX Runtime a
    # 4-way Concat that took longer than the four maps' additions.
    rcs = sum(kept[1:], kept[0]) / len(kept) if kept else None
    return x, rcs


def last_block_attention(method: str, q: torch.Tensor, k: torch.Tensor,
                         window: torch.Tensor | None, sfr: torch.Tensor | None, sfr_tau: float,
                         sfr_lambda: float, rcs: torch.Tensor | None, rcs_tau: float,
                         rcs_lambda: float) -> torch.Tensor:
    """Attention weights of the patched last block (B, H, T, T), docs/method.md §4 steps 1–4.

    window: (T, T) naclip Ω (None for other methods); sfr: (B, T, T) fp16-rounded S/max S, or
    None; rcs: (B, H, T, T) RCS map, or None.
    """
    logits = base_logits(method, q, k)
    if sfr is not None:
        logits = [blend(a, sfr[:, None], sfr_tau, sfr_lambda) for a in logits]
    if window is not None:
        logits = [a + window for a in logits]
    p = sum(torch.softmax(a, dim=-1) for a in logits)
    if rcs is not None:
        p = blend(p, rcs, rcs_tau, rcs_lambda)
    return p


def last_block(visual: nn.Module, x: torch.Tensor, p_fn, residual: bool) -> torch.Tensor:
    """Last block with attention weights from ``p_fn(q, k)`` -> projected tokens (B, T, E).

    Without residual (naclip, clearclip) the block output is the attention output alone.
    """
    blk = visual.transformer.resblocks[-1]
    x = x.to(visual.proj.dtype)
    q, k, v = qkv(blk.attn, layer_norm(blk.ln_1, x))
    y = blk.ls_1(attention_output(blk.attn, p_fn(q, k), v))
    if residual:
        y = x + y
        y = y + blk.ls_2(blk.mlp(layer_norm(blk.ln_2, y)))
    return layer_norm(visual.ln_post, y) @ visual.proj


def cosine_logits(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(B, T, E) projected tokens, (Q, E) unit text features -> (B, Q, N) patch cosine logits."""
    return (F.normalize(tokens[:, 1:].float(), dim=-1) @ text.float().t()).transpose(1, 2)


class ResCLIPVisual(nn.Module):
    """ResCLIP's visual side as named steps; the torch reference and the ONNX graphs call these.

    encode: trunk + RCS map; window: naclip Ω; head: patched last block -> cosine logits (the
    SFR pre-pass is the head without S; its PAMR and labels run on CPU, resclip_deploy.pipeline).
    """

    def __init__(self, visual: nn.Module, params: ResCLIPParams):
        super().__init__()
        self.visual, self.params = visual, params
        self.patch = int(visual.conv1.kernel_size[0])
        self.norm = pixel_norm(visual)
        depth = len(visual.transformer.resblocks)
        self.rcs_blocks = rcs_blocks(params.rcs_layers, depth) if params.rcs else ()

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return trunk(self.visual, embed(self.visual, pixels), self.rcs_blocks)

    def window(self, pixels: torch.Tensor) -> torch.Tensor | None:
        if self.params.method != "naclip":
            return None
        gh, gw = pixels.shape[-2] // self.patch, pixels.shape[-1] // self.patch
        return naclip_window(gh, gw, self.params.gaussian_std, pixels)

    def project(self, tokens: torch.Tensor, rcs: torch.Tensor | None,
                window: torch.Tensor | None, sfr: torch.Tensor | None) -> torch.Tensor:
        """The patched last block -> projected tokens (B, T, E), CLS first."""
        p = self.params
        attention = lambda q, k: last_block_attention(  # noqa: E731
            p.method, q, k, window, sfr, p.sfr_tau, p.sfr_lambda, rcs, p.rcs_tau, p.rcs_lambda)
        return last_block(self.visual, tokens, attention, p.residual_last_block)

    def head(self, tokens: torch.Tensor, rcs: torch.Tensor | None, window: torch.Tensor | None,
             sfr: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        """-> (B, Q, N) cosine logits of the patch tokens."""
        return cosine_logits(self.project(tokens, rcs, window, sfr), text)
