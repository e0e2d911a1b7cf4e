"""GPU provider setup, built and checked without a GPU: TensorRT with CUDA behind it, fp16
engines for fp16 bundles, engine/timing caches, optimisation profiles from the bundle's
settings, CUDA options that keep fp32 parity, int8 bundles kept off GPUs."""

import hashlib
import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from resclip_deploy import geometry
from resclip_deploy.bundle import read_bundle
from resclip_deploy.errors import UserError
from resclip_deploy.runtime import providers
from resclip_deploy.runtime.providers import (CPU, CUDA, ORIENTATIONS, TRT, GpuOptions,
                                              fits, max_windows_per_run, output_tile,
                                              profile_options, profile_shapes, provider_options)


def test_tensorrt_options():
    gpu = GpuOptions(fp16=True, cache_dir="/c/abc",
                     profiles={"pixels": ((1, 3, 224, 224), (6, 3, 224, 224), (40, 3, 224, 224)),
                               "text": ((1, 64), (3, 64), (256, 64))})
    opts = provider_options(TRT, gpu)
    assert opts.pop("trt_engine_cache_path").startswith("/c/abc/")    # tests/test_gpu_sessions
    assert opts == {
        "trt_fp16_enable": "1", "trt_max_workspace_size": str(4 << 30),
        "trt_layer_norm_fp32_fallback": "1", "trt_engine_cache_enable": "1",
        "trt_timing_cache_enable": "1", "trt_timing_cache_path": "/c/abc",
        "trt_profile_min_shapes": "pixels:1x3x224x224,text:1x64",
        "trt_profile_opt_shapes": "pixels:6x3x224x224,text:3x64",
        "trt_profile_max_shapes": "pixels:40x3x224x224,text:256x64"}
    assert provider_options(TRT, GpuOptions())["trt_fp16_enable"] == "0"


def test_cuda_keeps_fp32_parity_and_does_not_search_per_shape():
    assert provider_options(CUDA, GpuOptions()) == {"use_tf32": "0",
                                                   "cudnn_conv_algo_search": "HEURISTIC"}
    assert provider_options(CUDA, GpuOptions(fp16=True))["use_tf32"] == "1"
    assert provider_options(CPU, GpuOptions(fp16=True)) == {}


def test_slide_profiles_from_the_bundle_settings(tiny_bundle):
    m = read_bundle(str(tiny_bundle)).manifest          # patch 32, width 128, 2 heads, 3 queries
    shapes = profile_shapes(m, ("pixels", "tokens", "rcs", "window", "sfr_bias", "text"))
    # 336x448 has 2x3 windows; the most per run: one 336x2048 image (2x18) = 36
    assert shapes["pixels"] == ((1, 3, 32, 32), (6, 3, 224, 224), (36, 3, 224, 224))
    assert shapes["tokens"] == ((1, 2, 128), (6, 50, 128), (36, 50, 128))
    assert shapes["rcs"] == ((1, 2, 2, 2), (6, 2, 50, 50), (36, 2, 50, 50))
    assert shapes["window"] == ((2, 2), (50, 50), (50, 50))
    # the text bank is an input (a --text-encoder bundle): any vocabulary size
    assert shapes["text"] == ((1, 64), (3, 64), (256, 64))
    assert profile_options(shapes)["trt_profile_opt_shapes"].startswith(
        "pixels:6x3x224x224,tokens:6x50x128,")
    assert profile_options({}) == {}


@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_profiles_cover_every_image_shape(tiny_bundle, mode):
    """Runs of images of any size and aspect ratio fall inside the profiles of their orientation
    (a whole-image graph has a session per orientation), so TensorRT never meets a shape its
    engine was not built for: the image alone or with others of its size up to the most windows
    a run takes, its output in tiles of at most output_tile a side."""
    m = read_bundle(str(tiny_bundle)).manifest
    m = m.replace(params=m.params.replace(mode=mode))
    names = ("pixels", "tokens", "rcs", "frames", "prepass_logits", "patch_labels", "connected",
             "logits", "rows", "cols", "prob_thd")
    profiles = {o: profile_shapes(m, names, o) for o in ORIENTATIONS}
    assert "prob_thd" not in profiles["landscape"]       # a scalar: nothing dynamic
    most, tile = max_windows_per_run(m), output_tile(m)
    q = len(m.vocabulary.queries)
    rng = np.random.default_rng(0)
    sizes = [(300, 451), (1080, 1920), (1920, 1080), (50, 4000), (4000, 50), (224, 224)] + [
        tuple(rng.integers(40, 5000, size=2)) for _ in range(200)]
    p = m.params
    for h0, w0 in sizes:
        h, w = geometry.keep_ratio_size(h0, w0, p.short_side, p.long_side_max)
        if min(h, w) < m.model.patch:
            continue                       # refused before any graph runs
        boxes = geometry.window_boxes(h, w, p.mode, p.crop, p.stride)
        y1, y2, x1, x2 = boxes[0]
        gh, gw = (y2 - y1) // m.model.patch, (x2 - x1) // m.model.patch
        n, t = gh * gw, 1 + gh * gw
        ny, nx = len(np.unique(boxes[:, 0])), len(np.unique(boxes[:, 2]))
        assert len(boxes) <= most, (h0, w0)
        for k in (len(boxes), most // len(boxes) * len(boxes)):
            run = {"pixels": (k, 3, y2 - y1, x2 - x1), "tokens": (k, t, m.model.width),
                   "rcs": (k, m.model.heads, t, t), "frames": (k, y2 - y1, x2 - x1, 3),
                   "prepass_logits": (k, q, n), "patch_labels": (k, gh, gw),
                   "connected": (k, n, n), "logits": (k, q, n),
                   "rows": (min(h0, tile), ny, gh), "cols": (min(w0, tile), nx, gw)}
            assert any(fits(profiles[o], run) for o in ORIENTATIONS), (h0, w0, k, run)


REAL_SESSION = ort.InferenceSession


class FakeGpuSession:
    """A real CPU session that reports the providers it was asked for, as if they bound."""

    requested = []

    def __init__(self, path, options, providers, **kwargs):
        self.requested.append((path, providers))
        self._real = REAL_SESSION(path, options, providers=[CPU])
        self._names = [p if isinstance(p, str) else p[0] for p in providers]

    def get_providers(self):
        return self._names

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_tensorrt_sessions_get_cuda_behind_them_and_their_options(tiny_bundle, tmp_path,
                                                                  monkeypatch):
    from resclip_deploy.runtime.segmenter import Segmenter
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(providers.ort, "InferenceSession", FakeGpuSession)
    FakeGpuSession.requested = []
    seg = Segmenter.from_bundle(str(tiny_bundle), device="tensorrt", cache_dir=str(tmp_path))
    manifest = seg.bundle.manifest
    # the two bundle graphs and the stage graphs of the GPU plan (output: labels, +probs)
    assert len(FakeGpuSession.requested) == 7
    assert sorted(seg.sessions) == ["encoder", "head", "normalise", "output", "output_probs",
                                    "prepass", "sfr_matrix"]
    for path, chain in FakeGpuSession.requested:
        if isinstance(path, bytes) and onnx.load_from_string(path).graph.name != "prepass":
            # the small stage graphs run on CUDA, which takes any shape (no profile limits)
            assert [p for p, _ in chain] == [CUDA, CPU]
            assert dict(chain[0][1])["use_tf32"] == "0"
            continue
        assert [p for p, _ in chain] == [TRT, CUDA, CPU]
        trt, cuda = dict(chain[0][1]), dict(chain[1][1])
        if isinstance(path, bytes):                  # the pre-pass graph, built at load
            graph = hashlib.sha256(path).hexdigest()
            assert trt["trt_fp16_enable"] == "0"     # stage graphs choose their precision
            assert trt["trt_profile_max_shapes"]     # every dynamic input has a profile
        else:
            name = next(g for g, e in manifest.graphs.items() if path.endswith(e.file))
            graph = manifest.files[manifest.graphs[name].file].sha256
            first = "pixels" if name == "encoder" else "tokens"
            assert trt["trt_profile_max_shapes"].startswith(
                f"{first}:{max_windows_per_run(manifest)}x")
        engine = {k: v for k, v in trt.items() if "cache" not in k}
        folder = providers.engine_folder(str(tmp_path), graph, engine)
        assert trt["trt_engine_cache_path"] == folder and os.path.isdir(folder)
        assert trt["trt_fp16_enable"] == "0" and cuda["use_tf32"] == "0"
    assert seg.device_type == "cuda"
    assert seg.plan["prepass"] == "graph" and seg.plan["connectivity"] == "numpy"


def test_auto_puts_cuda_behind_tensorrt(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(providers.ort, "InferenceSession", FakeGpuSession)
    FakeGpuSession.requested = []
    path = str(tiny_bundle / "head.onnx")
    session = providers.create_session(path, "auto", None, GpuOptions(cache_dir=str(tmp_path)))
    assert session.get_providers() == [TRT, CUDA, CPU]


@pytest.fixture
def int8_labelled(tiny_bundle, tmp_path):
    """The tiny bundle with its manifest saying int8 (the precision check reads only that)."""
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["precision"] = "int8"
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_int8_bundles_are_refused_on_a_gpu(int8_labelled, device):
    from resclip_deploy.runtime.segmenter import Segmenter
    with pytest.raises(UserError, match="int8 bundle runs on CPUs only.*--precision fp16"):
        Segmenter.from_bundle(str(int8_labelled), device=device)


def test_int8_bundles_stay_on_the_cpu_with_auto(int8_labelled, monkeypatch):
    from resclip_deploy.runtime.segmenter import Segmenter
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(providers.ort, "InferenceSession", FakeGpuSession)
    FakeGpuSession.requested = []
    seg = Segmenter.from_bundle(str(int8_labelled), device="auto")
    assert seg.device_type == "cpu"
    assert all([p if isinstance(p, str) else p[0] for p in chain] == [CPU]
               for _, chain in FakeGpuSession.requested)
