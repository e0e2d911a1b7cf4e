"""Checkpoint loading: open_clip names + local files (torch, safetensors, wrapped), auto, and
open_clip model folders (local-dir:, hf-hub: from a hub cache the tests write)."""

import json
import time

import numpy as np
import open_clip
import pytest
import torch
from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

from conftest import FIXTURES, TINY, TINY_CFG
from resclip_deploy.bundle import file_sha256
from resclip_deploy.errors import UserError
from resclip_deploy.export.clip_loader import load_clip, load_clip_from_source
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


PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
WEIGHT_FILES = {"safetensors": HF_SAFE_WEIGHTS_NAME, "bin": HF_WEIGHTS_NAME}


def open_clip_dir(folder, cfg=TINY_CFG, model=None, weights="safetensors"):
    """A folder as open_clip's save_for_hf writes it (config in the hub format + weights); the
    model saved: ``model``, or a random one of ``cfg``."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    (folder / HF_CONFIG_NAME).write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": PREPROCESS}))
    if model is None:
        torch.manual_seed(0)
        model = open_clip.create_model(f"local-dir:{folder}", load_weights=False).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        save_file(sd, str(folder / HF_SAFE_WEIGHTS_NAME))
    elif weights == "bin":
        torch.save(sd, folder / HF_WEIGHTS_NAME)
    return model


def assert_same_model(loaded, model):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(x), model.encode_image(x))
    assert loaded.model.visual.preprocess_cfg["mean"] == PREPROCESS["mean"]
    assert loaded.tokenizer(["a photo of a cat"]).shape == (1, 77)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_local_dir_loads_exactly(tiny_files, tmp_path, weights):
    model, _ = tiny_files
    open_clip_dir(tmp_path / "m", model=model, weights=weights)
    loaded = load_clip(f"local-dir:{tmp_path / 'm'}")
    assert_same_model(loaded, model)
    assert loaded.source == {
        "model": f"local-dir:{tmp_path / 'm'}",
        "config_sha256": file_sha256(tmp_path / "m" / HF_CONFIG_NAME),
        "weights_file": WEIGHT_FILES[weights],
        "weights_sha256": file_sha256(tmp_path / "m" / WEIGHT_FILES[weights])}
    assert_same_model(load_clip_from_source(loaded.source), model)
    with pytest.raises(UserError, match="changed since the bundle was exported"):
        load_clip_from_source({**loaded.source, "weights_sha256": "0" * 64})


def _config_only(folder, cfg=TINY_CFG):
    open_clip_dir(folder, cfg, weights=None)


def _not_hub_format(folder):
    folder.mkdir()
    (folder / HF_CONFIG_NAME).write_text(json.dumps(TINY_CFG))  # the bare model config


AVG_POOL_CFG = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "pool_type": "avg"}}


@pytest.mark.parametrize("make, pretrained, message", [
    (lambda d: None, None, "no such folder"),
    (lambda d: d.mkdir(), None, f"has no {HF_CONFIG_NAME}"),
    (_config_only, None, "no weights next to it"),
    (_not_hub_format, None, "is not an open_clip model config (KeyError: 'model_cfg')"),
    (lambda d: _config_only(d, AVG_POOL_CFG), None,
     "'avg' pooling; ResCLIP needs a CLIP ViT with a class token"),
    (open_clip_dir, "openai", "carries its own weights; drop --pretrained openai"),
])
def test_local_dir_bad_folders(tmp_path, make, pretrained, message):
    make(tmp_path / "m")
    with pytest.raises(UserError, match="^[^\n]*$") as e:
        load_clip(f"local-dir:{tmp_path / 'm'}", pretrained)
    assert message in str(e.value) and str(tmp_path / "m") in str(e.value)


def test_custom_attention_blocks_are_refused(tmp_path):
    open_clip_dir(tmp_path, {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"],
                                                         "qk_norm": True}})
    with pytest.raises(UserError, match="CustomResidualAttentionBlock .*standard "
                                        "ResidualAttentionBlock with nn.MultiheadAttention"):
        load_clip(f"local-dir:{tmp_path}")


def test_plain_names_need_pretrained():
    with pytest.raises(UserError, match="^give the weights: --pretrained TAG_OR_FILE"):
        load_clip(TINY)


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face hub cache; huggingface_hub read both settings at import."""
    import huggingface_hub.constants as hub_constants
    cache = tmp_path / "hub"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.setenv(var, str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hf_hub_loads_from_the_local_cache(tiny_files, hub_cache):
    model, _ = tiny_files
    repo = hub_cache / "models--test-org--tiny-clip"
    open_clip_dir(repo / "snapshots" / COMMIT, model=model)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    loaded = load_clip("hf-hub:test-org/tiny-clip")
    assert_same_model(loaded, model)
    snapshot = repo / "snapshots" / COMMIT
    assert loaded.source == {"model": "hf-hub:test-org/tiny-clip", "revision": COMMIT,
                             "config_sha256": file_sha256(snapshot / HF_CONFIG_NAME),
                             "weights_file": HF_SAFE_WEIGHTS_NAME,
                             "weights_sha256": file_sha256(snapshot / HF_SAFE_WEIGHTS_NAME)}
    assert load_clip_from_source(loaded.source).source == loaded.source
    with pytest.raises(UserError, match="carries its own weights"):
        load_clip("hf-hub:test-org/tiny-clip", "laion2b_s34b_b88k")


def test_hf_hub_repo_not_in_the_cache_fails_at_once(hub_cache):
    start = time.perf_counter()
    with pytest.raises(UserError, match="^[^\n]*$") as e:
        load_clip("hf-hub:test-org/absent")
    assert time.perf_counter() - start < 5
    for needle in ("hf-hub:test-org/absent", "not in the local Hugging Face cache",
                   "hf download test-org/absent", "--model local-dir:DIR", "HF_HUB_CACHE"):
        assert needle in str(e.value), needle


# Head width 80, as ViT-H/14's (1280 / 16): the attention scale follows it.
W80_CFG = {**TINY_CFG, "vision_cfg": {"image_size": 224, "layers": 4, "width": 160,
                                      "head_width": 80, "patch_size": 32}}


@pytest.mark.slow
def test_cli_exports_and_segments_a_local_dir_model(tmp_path):
    import cv2
    from click.testing import CliRunner

    from resclip_deploy.cli import export_main, segment_main
    open_clip_dir(tmp_path / "w80", W80_CFG)
    runner = CliRunner()
    result = runner.invoke(export_main, ["--model", f"local-dir:{tmp_path / 'w80'}", "--classes",
                                         "cat,sofa,wall", "-o", str(tmp_path / "b"), "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["source"]["model"].startswith("local-dir:")
    assert manifest["model"]["heads"] == 2 and manifest["model"]["width"] == 160
    image = FIXTURES / "images" / "chelsea.png"
    result = runner.invoke(segment_main, [str(image), "--bundle", str(tmp_path / "b"), "-o",
                                          str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    labels = cv2.imread(str(tmp_path / "out" / "chelsea.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape[:2] == cv2.imread(str(image)).shape[:2]
