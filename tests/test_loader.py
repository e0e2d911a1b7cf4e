"""Checkpoint loading: open_clip names + local files (torch, safetensors, wrapped), auto."""

import numpy as np
import open_clip
import pytest
import torch

from conftest import FIXTURES, TINY
from resclip_deploy.errors import UserError
from resclip_deploy.export.clip_loader import load_clip
from resclip_deploy.export.reference import ReferenceSegmenter
from resclip_deploy.io import read_image
from resclip_deploy.params import CUSTOM
from resclip_deploy.vocab import parse_class_list

@pytest.mark.parametrize("kind", ["pt", "safetensors", "wrapped"])
def test_open_clip_checkpoint_files_load_exactly(tiny_files, kind):
    model, files = tiny_files
    loaded = load_clip(TINY, str(files[kind]))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(x), model.encode_image(x))
    assert loaded.source["sha256"] and loaded.source["model"] == TINY


def test_segmenting_with_a_4_block_patch_32_model(tiny_files):
    _, files = tiny_files
    clip = load_clip(TINY, str(files["pt"]))
    vocab = parse_class_list("cat|kitten,sofa,wall")
    seg = ReferenceSegmenter.from_clip(clip, vocab, CUSTOM)
    assert seg.rcs_blocks == (2,) and seg.patch == 32
    out = seg.segment(read_image(str(FIXTURES / "images" / "chelsea.png")))
    assert out.labels.shape == (300, 451) and out.probs.shape == (3, 300, 451)
    assert set(np.unique(out.labels)) <= {0, 1, 2}


def test_auto_infers_the_fixture_architecture():
    clip = load_clip("auto", str(FIXTURES / "parity" / "weights" / "rand-vit16-w192.pt"))
    visual = clip.model.visual
    assert visual.conv1.kernel_size == (16, 16) and visual.conv1.out_channels == 192
    assert len(visual.transformer.resblocks) == 12
    assert isinstance(visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


def test_unknown_model_name(tiny_files):
    _, files = tiny_files
    with pytest.raises(UserError, match="unknown open_clip model 'ViT-Q-99'"):
        load_clip("ViT-Q-99", str(files["pt"]))


def test_auto_needs_a_file():
    with pytest.raises(UserError, match="--model auto"):
        load_clip("auto", "openai")
