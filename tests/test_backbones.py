"""The reference against open_clip's own VisionTransformer forward, for several head widths.

For the standard block (method clip, RCS and SFR off, residual and MLP kept) ResCLIP's last block
is CLIP's own, so the reference's projected tokens must equal open_clip's tokens after its
transformer, ``ln_post`` and ``proj``. The check does not share our attention code, so a wrong
scale (e.g. a head width fixed at 64) shows here where export verification cannot see it.
"""

import pytest
import torch
from open_clip.transformer import VisionTransformer

from resclip_deploy.export.model import ResCLIPVisual
from resclip_deploy.params import ResCLIPParams


def tiny_visual(head_width: int, heads: int = 2, layers: int = 3) -> VisionTransformer:
    torch.manual_seed(head_width)
    visual = VisionTransformer(image_size=64, patch_size=16, width=head_width * heads,
                               layers=layers, heads=heads, mlp_ratio=4.0, output_dim=48,
                               output_tokens=True).eval()
    # Random init leaves attention close to uniform; sharper weights make the scale matter.
    with torch.no_grad():
        for blk in visual.transformer.resblocks:
            blk.attn.in_proj_weight.mul_(4.0)
    return visual


@pytest.mark.parametrize("head_width", [32, 64, 80])
def test_standard_block_equals_open_clip(head_width):
    visual = tiny_visual(head_width)
    assert visual.transformer.resblocks[0].attn.head_dim == head_width
    net = ResCLIPVisual(visual, ResCLIPParams(method="clip", rcs=False, sfr=False)).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens, rcs = net.encode(x)
        ours = net.project(tokens, rcs, net.window(x), None)
        pooled, patch_tokens = visual(x)        # open_clip: ln_post'd tokens, projected CLS
    assert rcs is None
    theirs = patch_tokens @ visual.proj
    assert ours.shape == (2, 1 + 16, 48)
    assert (ours[:, 1:] - theirs).abs().max().item() <= 1e-5
    assert (ours[:, 0] - pooled).abs().max().item() <= 1e-5

