"""The torch reference: each switch matters, batching is exact, and the pieces agree with
independent (literal, slow) implementations of the reference code's formulas."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import case_by_name, case_image, load_case
from resclip_deploy.io import read_image
from resclip_deploy.params import METHODS, PRESETS
from resclip_deploy.vocab import preset_vocabulary


@pytest.fixture(scope="module")
def chelsea_case():
    case = case_by_name("ade20k_chelsea")
    return case, load_case(case)


def segmenter(clip, ref, **changes):
    from resclip_deploy.export.reference import ReferenceSegmenter
    params = PRESETS["ade20k"][0].replace(**{"connectivity": "reference", **changes})
    return ReferenceSegmenter(clip.model.visual, ref["query_features"],
                              preset_vocabulary("ade20k"), params)


def window_logits(clip, ref, **changes):
    return segmenter(clip, ref, **changes).window_outputs(ref["crop0_input"]).logits[0]


def test_each_switch_changes_the_output(fixture_clip, chelsea_case):
    _, ref = chelsea_case
    base = window_logits(fixture_clip, ref)
    variants = {f"method={m}": dict(method=m) for m in METHODS if m != "naclip"}
    variants.update({"no rcs": dict(rcs=False), "no sfr": dict(sfr=False),
                     "components": dict(connectivity="components")})
    for name, changes in variants.items():
        other = window_logits(fixture_clip, ref, **changes)
        assert np.abs(other - base).max() > 1e-3, name


def test_components_and_reference_differ_on_the_fixture_grid(fixture_clip, chelsea_case):
    _, ref = chelsea_case
    a = segmenter(fixture_clip, ref).window_outputs(ref["crop0_input"])
    b = segmenter(fixture_clip, ref, connectivity="components").window_outputs(
        ref["crop0_input"])
    np.testing.assert_array_equal(a.patch_labels, b.patch_labels)
    assert np.abs(a.sfr_matrix - b.sfr_matrix).max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_two_equals_two_singles(method, fixture_clip, chelsea_case):
    case, ref = chelsea_case
    seg = segmenter(fixture_clip, ref, method=method)
    from resclip_deploy import geometry
    x = geometry.preprocess(read_image(str(case_image(case))), 336, 2048, geometry.CLIP_PIXEL_NORM)
    boxes = geometry.window_boxes(*x.shape[1:], "slide", 224, 112)[[0, 5]]
    windows = geometry.crop_batch(x, boxes)
    both = seg.window_outputs(windows)
    for i in range(2):
        one = seg.window_outputs(windows[i:i + 1])
        np.testing.assert_array_equal(both.patch_labels[i], one.patch_labels[0])
        np.testing.assert_allclose(both.logits[i], one.logits[0], rtol=0, atol=1e-5)


def test_whole_mode_odd_size_keeps_the_original_size(fixture_clip, chelsea_case):
    _, ref = chelsea_case
    seg = segmenter(fixture_clip, ref, mode="whole")
    rgb = np.random.default_rng(0).integers(0, 256, (97, 301, 3), dtype=np.uint8)
    out = seg.segment(rgb)
    assert out.labels.shape == (97, 301)
    assert out.probs.shape == (150, 97, 301)
    np.testing.assert_allclose(out.probs.sum(axis=0), 1, atol=1e-5)


def literal_pamr(image, mask, iterations, dilations):
    """The reference PAMR, written as the original: conv kernels, (Q, K, H, W) tensors."""
    def shift_kernel(centre_weight, neighbour_weight, with_centre):
        positions = [(i, j) for i in range(3) for j in range(3) if with_centre or (i, j) != (1, 1)]
        w = torch.zeros(len(positions), 1, 3, 3)
        for n, (i, j) in enumerate(positions):
            w[n, 0, 1, 1] += centre_weight
            w[n, 0, i, j] += neighbour_weight
        return w

    def local(x, kernel):
        b, k, h, w = x.shape
        x = x.reshape(b * k, 1, h, w)
        outs = [F.conv2d(F.pad(x, [d] * 4, mode="replicate"), kernel, dilation=d)
                for d in dilations]
        return torch.cat(outs, 1).reshape(b, k, -1, h, w)

    std_kernel = shift_kernel(0, 1, with_centre=True)
    std = local(image, std_kernel).std(2, keepdim=True)
    aff = -local(image, shift_kernel(1, -1, with_centre=False)).abs() / (1e-8 + 0.1 * std)
    aff = F.softmax(aff.mean(1, keepdim=True), 2)
    copy = shift_kernel(0, 1, with_centre=False)
    for _ in range(iterations):
        mask = (local(mask, copy) * aff).sum(2)
    return mask


@pytest.mark.parametrize("hw", [(40, 56), (224, 224), (12, 70)])
def test_pamr_equals_the_literal_reference(hw):
    from resclip_deploy.pamr import affinity_matrix, pamr
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, *hw, generator=g)
    mask = torch.randn(1, 5, *hw, generator=g)
    theirs = literal_pamr(image, mask, 10, (8, 16))[0].numpy()
    flat = mask[0].numpy().reshape(5, -1).T                      # (HW, Q)
    affinity = affinity_matrix(image[0].numpy(), (8, 16))
    ours = pamr(flat, affinity, 10).T.reshape(5, *hw)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    with ThreadPoolExecutor(3) as pool:      # row blocks in threads: the same numbers exactly
        threaded = pamr(flat, affinity, 10, pool, blocks=3).T.reshape(5, *hw)
    np.testing.assert_array_equal(threaded, ours)


def test_pos_embed_resize_equals_torch_bicubic_by_scale_factor():
    from resclip_deploy.export.model import resize_pos_embed
    pos = torch.randn(197, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(resize_pos_embed(pos, 14, 14, 14), pos, rtol=0, atol=0)
    for gh, gw in [(21, 31), (7, 28), (14, 21), (3, 5)]:
        table = pos[1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
        table = F.interpolate(table, scale_factor=((gh + 0.1) / 14, (gw + 0.1) / 14),
                              mode="bicubic", align_corners=False, recompute_scale_factor=False)
        expected = torch.cat([pos[:1], table.permute(0, 2, 3, 1).reshape(-1, 32)])
        torch.testing.assert_close(resize_pos_embed(pos, 14, gh, gw), expected, rtol=0,
                                   atol=2e-5)


def literal_window(gh, gw, std):
    """The reference's Ω: a (2gh-1, 2gw-1) Gaussian from linspace, convolved with one-hots."""
    c = 1 / (std * np.sqrt(2))
    ks = [torch.linspace(-(n - 1) / 2 * c, (-(n - 1) / 2 + n - 1) * c, n)
          for n in (2 * gh - 1, 2 * gw - 1)]
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    m = torch.einsum("ij,kl->ijkl", torch.eye(gh), torch.eye(gw)).permute(0, 3, 1, 2)
    out = F.conv2d(m.reshape(-1, gh, gw).unsqueeze(1), window[None, None], padding="same")
    return F.pad(out.reshape(gh * gw, gh * gw), (1, 0, 1, 0))


@pytest.mark.parametrize("grid", [(14, 14), (21, 31), (3, 9)])
def test_naclip_window_equals_the_literal_reference(grid):
    from resclip_deploy.export.model import naclip_window
    ours = naclip_window(*grid, 5.0, torch.zeros(()))
    torch.testing.assert_close(ours, literal_window(*grid, 5.0), rtol=0, atol=1e-5)


def test_text_context_truncation_is_exact(fixture_clip):
    from resclip_deploy.export.text import encode_text_prefix, tokenize
    from resclip_deploy.textbank import token_lengths
    tokens = tokenize(fixture_clip.tokenizer, ["a photo of a cat.", "a tattoo of the sky."])
    full = fixture_clip.model.encode_text(torch.from_numpy(tokens))
    cut = encode_text_prefix(fixture_clip.model,
                             torch.from_numpy(tokens[:, :int(token_lengths(tokens).max())]))
    torch.testing.assert_close(cut, full, rtol=0, atol=1e-5)
