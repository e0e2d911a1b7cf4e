"""GPU sessions as GPU users expect them, checked without a GPU: 'auto' falls back graph by graph
to CUDA when TensorRT refuses one and says why in ONNX Runtime's own words, fp16 engines keep
LayerNorm in fp32, engine caches are keyed by graph and options, TF32 on TensorRT is reported,
the CUDA libraries of pip's nvidia packages are preloaded, and on a GPU only labels come down
unless probabilities are read."""

import logging

import numpy as np
import onnxruntime as ort
import pytest

from resclip_deploy.errors import UserError
from resclip_deploy.runtime import providers
from resclip_deploy.runtime.providers import CPU, CUDA, TRT, GpuOptions, provider_options

REAL_SESSION = ort.InferenceSession


class PickyGpuSession:
    """A real CPU session that reports the providers it was asked for, except that TensorRT
    refuses the graphs named in ``refuse`` as ONNX Runtime does: an error logged from C++ (on
    file descriptor 2) and an exception."""

    refuse: tuple = ()
    made: list = []

    def __init__(self, path, options, providers, **kwargs):
        names = [p if isinstance(p, str) else p[0] for p in providers]
        if names[0] == TRT and any(n in str(path) for n in self.refuse):
            import os
            os.write(2, b"\x1b[1;31m2026-01-01 00:00:00.0 [E:onnxruntime:Default, "
                        b"tensorrt_execution_provider.cc:2510 Compile] [TensorRT EP] Error "
                        b"Code 4: kOPT values for profile 0 violate shape constraints\x1b[m\n")
            raise RuntimeError("TensorRT EP failed to create engine from network")
        self._real = REAL_SESSION(path, options, providers=[CPU])
        self._names = names
        self.made.append((path, providers))

    def get_providers(self):
        return self._names

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def picky_gpu(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    monkeypatch.setattr(providers.ort, "InferenceSession", PickyGpuSession)
    monkeypatch.setattr(providers, "_preloaded", True)
    PickyGpuSession.made = []
    return PickyGpuSession


def test_auto_falls_back_to_cuda_per_graph_and_quotes_tensorrt(tiny_bundle, tmp_path, picky_gpu,
                                                               caplog):
    from resclip_deploy.runtime.segmenter import Segmenter
    picky_gpu.refuse = ("head.onnx",)
    with caplog.at_level(logging.WARNING, logger="resclip_deploy"):
        seg = Segmenter.from_bundle(str(tiny_bundle), device="auto", cache_dir=str(tmp_path))
    assert seg.sessions["head"].get_providers() == [CUDA, CPU]
    assert seg.sessions["encoder"].get_providers()[0] == TRT      # the others keep TensorRT
    assert seg.sessions["prepass"].get_providers()[0] == TRT
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "head.onnx: TensorrtExecutionProvider did not start" in warning
    assert "kOPT values for profile 0 violate shape constraints" in warning
    assert "running on CUDAExecutionProvider" in warning


def test_explicit_tensorrt_refusal_is_an_error_with_the_reason(tiny_bundle, picky_gpu):
    from resclip_deploy.runtime.segmenter import Segmenter
    picky_gpu.refuse = ("head.onnx",)
    with pytest.raises(UserError) as err:
        Segmenter.from_bundle(str(tiny_bundle), device="tensorrt")
    text = str(err.value)
    assert "TensorrtExecutionProvider did not start for head.onnx" in text
    assert "violate shape constraints" in text and "failed to create engine" in text
    assert "\x1b" not in text and "tensorrt_execution_provider.cc" not in text


def test_reasons_are_the_error_lines_without_source_places():
    log_text = ("\x1b[1;31m2026-12-07 21:27:08.98 [E:onnxruntime:Default, provider_bridge_ort.cc:"
                "2458 operator()] /onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc"
                ":2043 onnxruntime::Provider& onnxruntime::ProviderLibrary::Get() "
                "[ONNXRuntimeError] : 1 : FAIL : Failed to load library libx.so with error: "
                "libcublasLt.so.13: cannot open shared object file\x1b[m\n"
                "2026-12-07 21:27:08.99 [I:onnxruntime:Default, x.cc:1 f] all fine\n")
    assert providers._reasons(log_text) == ("Failed to load library libx.so with error: "
                                            "libcublasLt.so.13: cannot open shared object file")


def test_stderr_is_restored_after_a_caught_block(capfd):
    import os
    with providers._stderr_caught() as said:
        os.write(2, b"inside\n")
    os.write(2, b"after\n")
    assert said.getvalue() == "inside\n"
    assert capfd.readouterr().err == "after\n"


def test_fp16_engines_keep_layer_norm_in_fp32():
    assert provider_options(TRT, GpuOptions(fp16=True))["trt_layer_norm_fp32_fallback"] == "1"
    assert "trt_layer_norm_fp32_fallback" not in provider_options(TRT, GpuOptions())


def test_engine_folders_are_keyed_by_graph_and_options(tmp_path):
    def folder(**kw):
        gpu = GpuOptions(cache_dir=str(tmp_path), **{"graph": "a" * 64, **kw})
        opts = provider_options(TRT, gpu)
        assert opts["trt_timing_cache_path"] == str(tmp_path)     # timings shared by graphs
        return opts["trt_engine_cache_path"]
    base = folder()
    assert base == folder() and base.startswith(str(tmp_path))
    assert folder(graph="b" * 64) != base
    assert folder(fp16=True) != base


def test_stage_graph_options_prepass_fp16_only_for_fp16_bundles(tiny_bundle, tmp_path,
                                                                picky_gpu):
    """Under TensorRT the pre-pass gets an engine, fp16 for fp16 bundles (TensorRT would run
    its fp16 loop in fp32 without the flag); the other stage graphs run on CUDA."""
    import dataclasses

    from resclip_deploy.bundle import read_bundle
    from resclip_deploy.runtime import sessions
    manifest = read_bundle(str(tiny_bundle)).manifest
    picky_gpu.refuse = ()
    for precision in ("fp32", "fp16"):
        m = dataclasses.replace(manifest, precision=precision)
        for stage in ("prepass", "sfr_matrix", "output"):
            picky_gpu.made = []
            sessions.stage_session(stage, m, m.params, m.vocabulary, "tensorrt", None,
                                   str(tmp_path), None)
            first, options = picky_gpu.made[0][1][0]
            if stage != "prepass":               # the small stage graphs run on CUDA
                assert first == CUDA, stage
                continue
            assert first == TRT
            assert options["trt_fp16_enable"] == ("1" if precision == "fp16" else "0")


def test_tensorrt_precision_is_reported_with_the_providers(tiny_bundle, picky_gpu):
    from resclip_deploy.runtime.segmenter import Segmenter
    picky_gpu.refuse = ()
    seg = Segmenter.from_bundle(str(tiny_bundle), device="tensorrt")
    assert seg.providers["encoder"][0] == f"{TRT} (fp32 engine, TF32 allowed)"
    assert seg.providers["encoder"][1:] == [CUDA, CPU]


def test_gpu_libraries_are_preloaded_once_before_the_first_gpu_session(monkeypatch, tiny_bundle):
    calls = []
    monkeypatch.setattr(providers, "_preloaded", False)
    monkeypatch.setattr(ort, "preload_dlls", lambda: (calls.append(1), print("no nvidia libs")),
                        raising=False)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    providers.create_session(str(tiny_bundle / "head.onnx"), "auto", None)
    assert calls == []                               # no GPU provider installed: nothing to load
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(providers.ort, "InferenceSession", PickyGpuSession)
    for _ in range(2):
        providers.create_session(str(tiny_bundle / "head.onnx"), "auto", None)
    assert calls == [1]


def test_fused_chain_gets_profiles_and_a_cache(bundle_for, tmp_path, picky_gpu):
    from conftest import case_by_name

    from resclip_deploy.runtime import fused
    picky_gpu.refuse = ()
    bundle = bundle_for(case_by_name("ade20k_chelsea"))      # a text bank inside the graphs
    session, manifest = fused.fused_session(str(bundle), "tensorrt", cache_dir=str(tmp_path))
    trt = dict(picky_gpu.made[-1][1][0][1])
    assert trt["trt_engine_cache_path"].startswith(str(tmp_path))
    for name in ("frames", "rows", "cols"):
        assert f"{name}:" in trt["trt_profile_max_shapes"]
    assert session.get_providers()[0] == TRT


def test_on_a_gpu_only_labels_come_down_until_probs_are_read(tiny_bundle):
    """finish() on a GPU segmenter (the device type set after the graphs ran on the CPU provider,
    whose output runs bind host memory either way): labels only cross, probabilities come from
    one output-graph run when first read, equal to those asked for at once."""
    from resclip_deploy.runtime.segmenter import DeferredProbs, Segmenter
    seg = Segmenter.from_bundle(str(tiny_bundle), device="cpu", stages={"all": "gpu"})
    rgb = np.random.default_rng(0).integers(0, 255, (300, 451, 3), dtype=np.uint8)
    prepared = seg.prepare(rgb)
    logits, _ = seg.forward_windows(prepared.windows)
    eager = seg.finish([prepared], logits, True)[0]
    assert eager.probs is not None and not isinstance(eager, DeferredProbs)
    seg.device_type = "cuda"
    before = seg.io.to_host
    lazy = seg.finish([prepared], logits)[0]
    assert isinstance(lazy, DeferredProbs) and "pending" in repr(lazy)
    assert seg.io.to_host - before == lazy.labels.size       # labels only, uint8 on the way
    np.testing.assert_array_equal(lazy.labels, eager.labels)
    np.testing.assert_array_equal(lazy.probs, eager.probs)
    assert seg.io.to_host - before == lazy.labels.size * 2 + eager.probs.nbytes
    assert seg.finish([prepared], logits, False)[0].probs is None


def test_whole_mode_tensorrt_graphs_get_a_session_per_orientation(tiny_bundle, picky_gpu):
    """ONNX Runtime's TensorRT provider runs profile 0 only: a whole-image graph gets a landscape
    session at load and a portrait one, with the transposed profile, when a portrait run first
    comes; a landscape run never makes it."""
    import dataclasses

    from resclip_deploy.bundle import read_bundle
    manifest = read_bundle(str(tiny_bundle)).manifest
    manifest = dataclasses.replace(manifest, params=manifest.params.replace(mode="whole"))
    picky_gpu.refuse = ()
    session = providers.graph_session(str(tiny_bundle / "encoder.onnx"), "tensorrt", None,
                                      manifest, ("pixels",), "e" * 64)
    assert isinstance(session, providers.ProfiledSessions)
    assert len(picky_gpu.made) == 1
    landscape = dict(picky_gpu.made[0][1][0][1])["trt_profile_max_shapes"]
    assert session.for_shapes({"pixels": (1, 3, 224, 640)}) is session.primary
    assert len(picky_gpu.made) == 1
    portrait = session.for_shapes({"pixels": (1, 3, 640, 224)})
    assert portrait is not session.primary and len(picky_gpu.made) == 2
    assert session.for_shapes({"pixels": (2, 3, 480, 224)}) is portrait
    h, w = (int(v) for v in landscape.split("x")[-2:])
    assert dict(picky_gpu.made[1][1][0][1])["trt_profile_max_shapes"].endswith(f"{w}x{h}")
    assert h < w
    # slide mode: the windows are crop x crop either way, one session
    slide = providers.graph_session(str(tiny_bundle / "encoder.onnx"), "tensorrt", None,
                                    read_bundle(str(tiny_bundle)).manifest, ("pixels",), "e" * 64)
    assert not isinstance(slide, providers.ProfiledSessions)


def test_runs_go_to_the_session_whose_profile_holds_them(tiny_bundle):
    from resclip_deploy.runtime.segmenter import Segmenter
    seg = Segmenter.from_bundle(str(tiny_bundle), device="cpu")
    made = []

    def portrait():
        made.append(1)
        return seg.sessions["encoder"].primary
    wide = {"pixels": ((1, 3, 32, 32), (1, 3, 64, 224), (8, 3, 64, 512))}
    tall = {"pixels": ((1, 3, 32, 32), (1, 3, 224, 64), (8, 3, 512, 64))}
    seg.sessions["encoder"] = providers.ProfiledSessions(seg.sessions["encoder"], portrait,
                                                         {"landscape": wide, "portrait": tall})
    rgb = np.random.default_rng(0).integers(0, 255, (100, 300, 3), dtype=np.uint8)
    seg.segment(rgb, with_probs=False)                     # 224x224 windows: in neither
    assert made == []
    seg.run_graph("encoder", {"pixels": np.zeros((1, 3, 224, 64), np.float32)})
    assert made == [1]
